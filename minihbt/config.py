"""Model configuration, read from a Hugging Face `config.json`.

Two families share one encoder: XLM-R / RoBERTa and BERT (LaBSE, multilingual-E5).
What differs between them is collected here as plain fields, so the model code never
branches on the model name:

| field            | RoBERTa / XLM-R                         | BERT                 |
|------------------|-----------------------------------------|----------------------|
| position ids     | cumsum(ids != pad) * (ids != pad) + pad | 0 .. T-1             |
| layer_norm_eps   | 1e-5                                    | 1e-12                |
| type_vocab_size  | 1                                       | 2                    |
| key prefix       | `roberta.`                              | `bert.`              |
"""
import json
import os
from dataclasses import dataclass, asdict

FAMILIES = {"xlm-roberta": "roberta", "roberta": "roberta", "bert": "bert"}
REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings")                  # config.json must give them; positive integers


class ConfigError(ValueError):
    """config.json is missing, unreadable, or asks for something minihbt does not support."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @property
    def family(self):
        """'roberta' (XLM-R, RoBERTa) or 'bert' (BERT, LaBSE, multilingual-E5)."""
        return FAMILIES[self.model_type]

    @property
    def max_length(self):
        """Longest sequence the position table allows (RoBERTa positions start at pad_id + 1)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.family == "roberta" else 0)

    def length_problem(self, length):
        """None when a truncation length fits the position table, else what a length must be."""
        if length <= self.max_length:
            return None
        return f"an integer in [2, {self.max_length}] for this model ({self.max_length} positions)"

    @classmethod
    def from_dict(cls, d, source="config.json"):
        def need(field):
            if field not in d:
                raise ConfigError(f"{source}: missing required field {field!r}")
            return d[field]

        model_type = need("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(f"{source}: unsupported model_type {model_type!r} "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"{source}: unsupported hidden_act {act!r} (only 'gelu', the exact erf form, is supported)")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ConfigError(f"{source}: unsupported position_embedding_type {pos!r} (only 'absolute' is supported)")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ConfigError(f"{source}: is_decoder/add_cross_attention are not supported (encoders only)")
        defaults_eps = 1e-5 if FAMILIES[model_type] == "roberta" else 1e-12
        cfg = cls(
            model_type=model_type,
            **{name: int(need(name)) for name in REQUIRED_SIZES},
            type_vocab_size=int(d.get("type_vocab_size", 2)),
            layer_norm_eps=float(d.get("layer_norm_eps", defaults_eps)),
            pad_token_id=int(d.get("pad_token_id", 1 if FAMILIES[model_type] == "roberta" else 0) or 0),
            hidden_act=act,
            hidden_dropout_prob=float(d.get("hidden_dropout_prob", 0.1)),
            attention_probs_dropout_prob=float(d.get("attention_probs_dropout_prob", 0.1)),
        )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                              f"num_attention_heads {cfg.num_attention_heads}")
        for f in REQUIRED_SIZES + ("type_vocab_size",):
            if getattr(cfg, f) <= 0:
                raise ConfigError(f"{source}: field {f!r} must be positive, got {getattr(cfg, f)}")
        return cfg

    @classmethod
    def from_file(cls, path):
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config.json not found")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=path)

    def to_dict(self):
        return asdict(self)
