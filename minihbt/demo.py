"""The built-in demo: HBT's effect on a synthetic parallel world, in a couple of minutes on a CPU.

The world (synthetic, generated from a seed; no real language in it):
- a set of entities and relations, and a fact table: (entity, relation) -> value entity;
- a few artificial languages, each with its own vocabulary (every entity, relation and
  function word gets a different made-up word in every language, built from that
  language's own syllables) and its own word order;
- for each entity, a paragraph per language: one sentence per relation stating the fact;
  for a fact, a question per language asking for the value ("which <relation> of <entity>?").
Questions sharing a fact are parallel across languages, like XQuAD-R's. Most facts' questions
are training data; the rest are held out for evaluation (their sentences stay in the
candidate pool, as every sentence of every paragraph does in LAReQA).

Because the vocabularies are disjoint, nothing but cross-lingual training signal can tell
the model that two words in two languages mean the same thing. A tiny XLM-R-shaped encoder
is trained from scratch three times, with `xx`, `xy` and `hybrid` batches, and evaluated
with minihbt's evaluation code: X-X batches learn each language alone and leave the
languages unaligned (low Cr. and Mul. mAP, large language bias), X-Y batches align them,
hybrid batches align too; whether hybrid keeps more monolingual quality than X-Y is what
the seeds' spread decides (README.md).
"""
import os
import time
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from . import cli, encode, load_model
from .cli import AT_LEAST_1, setting
from .config import ModelConfig
from .data import load_lareqa
from .evaluation import evaluate
from .files import write_json
from .training import TrainSettings, train
from .weights import expected_shapes, save_weights

DEMO_STEPS = 300
DEMO_SEEDS = "0"
DESCRIPTION = "4 artificial languages with disjoint vocabularies and word orders, 48 entities x 5 relations"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "query:", "passage:", "?", "."]
# each language: its own consonants and vowels (so its words look like no other's) and word order
LANGUAGE_SOUNDS = [("ptk", "aiu"), ("bdg", "eo"), ("mnl", "aou"), ("szr", "ie"), ("fvh", "uy")]
ORDERS = [("E", "R", "is", "V"), ("R", "E", "V", "is"), ("V", "is", "E", "R"), ("is", "E", "V", "R"),
          ("E", "V", "R", "is")]
QUESTION_ORDERS = [("which", "R", "of", "E"), ("E", "of", "R", "which"), ("R", "which", "E", "of"),
                   ("of", "E", "which", "R"), ("which", "E", "R", "of")]


def make_world(seed=0, n_languages=4, n_entities=48, n_relations=5, eval_fraction=0.2):
    """The languages, their vocabularies, the facts and the train/eval split (a dict)."""
    rng = np.random.default_rng(seed)
    concepts = [f"E{i}" for i in range(n_entities)] + [f"R{j}" for j in range(n_relations)] + ["is", "which", "of"]
    languages = [f"q{chr(ord('a') + k)}" for k in range(n_languages)]   # qa..qt: ISO 639 codes for local use
    vocab, used = {}, set()
    for k, lang in enumerate(languages):
        cons, vows = LANGUAGE_SOUNDS[k % len(LANGUAGE_SOUNDS)]
        vocab[lang] = {}
        for c in concepts:
            while True:
                word = "".join(rng.choice(list(cons)) + rng.choice(list(vows)) for _ in range(3)) + str(k)
                if word not in used:
                    break
            used.add(word)
            vocab[lang][c] = word
    values = rng.integers(0, n_entities, size=(n_entities, n_relations))
    facts = [(e, r) for e in range(n_entities) for r in range(n_relations)]
    held_out = set(map(tuple, rng.permutation(facts)[: int(eval_fraction * len(facts))].tolist()))
    return {"seed": seed, "languages": languages, "vocab": vocab, "values": values.tolist(),
            "n_entities": n_entities, "n_relations": n_relations, "held_out": sorted(held_out)}


def _say(world, lang, order, e, r, v=None):
    words = world["vocab"][lang]
    slots = {"E": words[f"E{e}"], "R": words[f"R{r}"], "V": words[f"E{v}"] if v is not None else None,
             "is": words["is"], "which": words["which"], "of": words["of"]}
    return " ".join(slots[s] for s in order)


def lareqa_files(world, out_dir, split):
    """Write the world as LAReQA-format files `{out_dir}/{lang}.json` (sentences with their
    breaks; questions of the `split`, "train" or "eval", with ids shared across languages)."""
    os.makedirs(out_dir, exist_ok=True)
    held_out = set(map(tuple, world["held_out"]))
    for k, lang in enumerate(world["languages"]):
        order, q_order = ORDERS[k % len(ORDERS)], QUESTION_ORDERS[k % len(QUESTION_ORDERS)]
        paragraphs = []
        for e in range(world["n_entities"]):
            sentences, breaks, qas, pos = [], [], [], 0
            for r in range(world["n_relations"]):
                s = _say(world, lang, order, e, r, world["values"][e][r]) + " ."
                sentences.append(s)
                breaks.append([pos, pos + len(s)])
                if ((e, r) in held_out) == (split == "eval"):
                    qas.append({"id": f"fact-{e}-{r}", "question": _say(world, lang, q_order, e, r) + " ?",
                                "answers": [{"answer_start": pos, "text": s}]})
                pos += len(s) + 1
            paragraphs.append({"context": " ".join(sentences), "sentences": sentences, "sentence_breaks": breaks,
                               "qas": qas})
        write_json(os.path.join(out_dir, f"{lang}.json"), {"data": [{"title": "synthetic", "paragraphs": paragraphs}]},
                   indent=None)
    return out_dir


def make_model(world, out_dir, seed=0, hidden=64, layers=2, heads=4, ffn=128):
    """A randomly initialised XLM-R-shaped encoder (Hugging Face layout) with a word-level
    tokenizer over the world's vocabulary. Initialisation as transformers': N(0, 0.02)
    weights, zero biases, unit LayerNorm."""
    words = SPECIALS + sorted({w for lang in world["languages"] for w in world["vocab"][lang].values()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta", "vocab_size": len(words),
              "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": ffn, "hidden_act": "gelu", "max_position_embeddings": 32, "type_vocab_size": 1,
              "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    write_json(os.path.join(out_dir, "config.json"), config, indent=1)
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in expected_shapes(ModelConfig.from_dict(config)).items():
        if "LayerNorm.weight" in name:
            params[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            params[name] = np.zeros(shape, np.float32)
        else:
            params[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    save_weights(params, os.path.join(out_dir, "model.safetensors"))
    return out_dir


def run(out_dir, seeds=(0,), steps=DEMO_STEPS, batch_size=32, samplers=("xx", "xy", "hybrid"), lr=3e-3, log=print,
        **world_options):
    """Build the world, train one model per sampler (minihbt.training), evaluate; returns
    {seed: {sampler: results}}."""
    table = {}
    for seed in seeds:
        world = make_world(seed, **world_options)
        base = os.path.join(out_dir, f"seed{seed}")
        train_dir = lareqa_files(world, os.path.join(base, "data", "train"), "train")
        eval_dir = lareqa_files(world, os.path.join(base, "data", "eval"), "eval")
        init = make_model(world, os.path.join(base, "init"), seed=seed)
        rs = load_lareqa(eval_dir, name="synthetic")
        table[seed] = {}
        for sampler in samplers:
            log(f"seed {seed} {sampler:6s}  training {steps} steps ...")
            t0 = time.perf_counter()
            settings = TrainSettings(model=init, train=[train_dir], sampler=sampler, batch_size=batch_size,
                                     steps=steps, lr=lr, warmup=steps // 10, max_negatives=1, seed=seed, save_every=0,
                                     out=os.path.join(base, sampler), quiet=True)
            model = load_model(train(settings, overwrite=True).path)
            q = {l: encode(model, [t for _, t in rs.queries[l]], kind="query") for l in rs.languages}
            c = encode(model, rs.cand_text, kind="passage")
            r = table[seed][sampler] = evaluate(rs, q, c)
            log(f"seed {seed} {sampler:6s}  Mo. {r['mono']['map']:.3f}  Cr. {r['cross']['map']:.3f}  "
                f"Mul. {r['multi']['map']:.3f}  bias {r['bias']['rank_distance']:6.1f}  "
                f"({time.perf_counter() - t0:.0f} s)")
    return table


def format_table(table):
    """Markdown table of Mo./Cr./Mul. mAP and bias per seed and sampler."""
    lines = ["| seed | batches | Mo. mAP | Cr. mAP | Mul. mAP | bias (rank distance) |", "|---|---|---|---|---|---|"]
    for seed, rows in table.items():
        for sampler, r in rows.items():
            lines.append(f"| {seed} | {sampler} | {r['mono']['map']:.3f} | {r['cross']['map']:.3f} | "
                         f"{r['multi']['map']:.3f} | {r['bias']['rank_distance']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the entry point

@dataclass
class DemoSettings:
    """The demo's flags; train.py's others are refused (the demo would ignore them)."""
    demo: bool = setting(False, "run the demo (also what `python train.py` alone does)")
    demo_seeds: str = setting(DEMO_SEEDS, "comma-separated world/model seeds, distinct integers >= 0", metavar="SEEDS")
    steps: int = setting(DEMO_STEPS, "training steps per model", accepted=AT_LEAST_1)
    out: str = setting(os.path.join("runs", "demo"), "folder for the worlds, models and runs; rerunning replaces "
                                                     "them", metavar="DIR")


def parse_seeds(text, problems):
    """--demo-seeds "0,1,2" -> [0, 1, 2]; anything else is a problem."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() for item in items) or len(set(map(int, items))) < len(items):
        problems.add(f"--demo-seeds {text}: expected distinct integers >= 0 separated by commas, e.g. 0,1,2")
        return []
    return [int(item) for item in items]


@cli.program("train.py")
def main(argv):
    """`python train.py [--demo] [--demo-seeds 0,1,2] [--steps N] [--out DIR]`: train three tiny
    models per seed and print their table. Training flags
    are refused: the demo would ignore them."""
    ap = cli.parser("train.py --demo", "The built-in demo: HBT's effect on a synthetic parallel world (see "
                                       "minihbt/demo.py).", DemoSettings)
    ap.allow_abbrev = False                                 # --step is train.py's --steps only if written out
    namespace, rest = ap.parse_known_args(argv)
    problems = cli.Problems()
    args = cli.build_settings(DemoSettings, vars(namespace), {}, problems)
    for item in rest:
        if item.startswith("-"):
            problems.add(f"{item.split('=')[0]}: not used by the demo, which takes only --demo-seeds, --steps and "
                         "--out (leave out --demo to train a model of your own)")
    if rest and not any(item.startswith("-") for item in rest):
        problems.add(f"unexpected argument {rest[0]!r}: the demo takes only --demo-seeds, --steps and --out")
    seeds = parse_seeds(args.demo_seeds, problems)
    problems.stop_if_any()
    cli.make_folder("--out", args.out, problems)
    problems.stop_if_any()
    print(f"minihbt demo: a synthetic parallel world ({DESCRIPTION}); a tiny XLM-R-shaped encoder trained from "
          f"scratch for {args.steps} steps with each batch type, then evaluated (runs in {args.out}/)")
    t0 = time.perf_counter()
    table = run(args.out, seeds=seeds, steps=args.steps)
    print()
    print(format_table(table))
    print(f"\n{time.perf_counter() - t0:.0f} s. X-X batches leave the languages unaligned (low Cr./Mul. mAP, large "
          "bias); X-Y and hybrid batches align them and keep most of X-X's Mo. quality (see README.md for "
          "what three seeds show). Real data: see README.md.")
    return table
