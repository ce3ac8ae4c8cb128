"""What `train_step.py` feeds both sides: its batches (cases), the random XLM-R-base model, and the FLOP count.

Cases (a batch of texts, built once by the parent and handed to both sides in a file, so
both see identical texts):

- `xquad`: cross-lingual triplets from XQuAD-R (English question, German gold sentence,
  another German sentence of its paragraph as the negative), no passage text twice.
- `mlqa-hybrid`: one batch of minihbt's own hybrid sampler on MLQA-R, as `train.py` draws
  it (`HBTSampler(examples, triplets, sampler="hybrid", alpha=0.5, seed=0, max_negatives=1)`,
  batch `index` of epoch 0); a negative the sampler drops (it repeated a passage of the
  batch) is simply absent, so some triplets have no negative.
- `xquad-long`: triplets whose texts fill the token limits (question + context as the
  query, two whole contexts as each passage), for the GPU run.

Real-token FLOPs of one training step (forward + backward):

    6 N sum_i n_i + 12 L H sum_i n_i^2

over every text i of the step (queries and passages), n_i its real tokens after
truncation, N the non-embedding parameters (encoder layers: weights, biases, LayerNorms),
L layers, H hidden size. 6 N per token is the matmul work of forward (2 N) and backward
(4 N); 12 L H n per token is attention's two n x n x H products (QK^T and PV, 4 n^2 H a
layer forward) times 3 for forward + backward. Padding, embedding look-ups, pooling and
the loss are not counted: this is the useful work a step must do, whatever it pads.
"""
import json
import math
import os


def xquad_triplets(n, data_dir, q_lang="en", p_lang="de"):
    """(question in q_lang, gold sentence in p_lang, another sentence of that paragraph),
    no passage text used twice (as minihbt's samplers guarantee, so both losses see the same
    candidates: minihbt masks duplicated passages, the plain PyTorch loss would not)."""
    def load(lang):
        with open(os.path.join(data_dir, f"{lang}.json"), encoding="utf-8") as f:
            return json.load(f)["data"]

    def gold(p, qa):
        start = qa["answers"][0]["answer_start"]
        for i, (b, e) in enumerate(p["sentence_breaks"]):
            if b <= start <= e:
                return i
        return None
    qd, pd = load(q_lang), load(p_lang)
    out, used = [], set()
    for qa_art, p_art in zip(qd, pd):
        for qp, pp in zip(qa_art["paragraphs"], p_art["paragraphs"]):
            qa_by_id = {qa["id"]: qa for qa in pp["qas"]}
            for qa in qp["qas"]:
                if qa["id"] not in qa_by_id or len(pp["sentences"]) < 2:
                    continue
                g = gold(pp, qa_by_id[qa["id"]])
                if g is None:
                    continue
                pos, neg = pp["sentences"][g], pp["sentences"][(g + 1) % len(pp["sentences"])]
                if pos in used or neg in used:
                    continue
                used.update((pos, neg))
                out.append((qa["question"], pos, neg))
                if len(out) == n:
                    return out
    return out


def long_triplets(n, data_dir, q_lang="en", p_lang="de"):
    """n triplets whose texts fill the token limits: (question + its context in q_lang, the
    contexts of paragraphs i and i + 1 in p_lang, the same two in the other order); no text twice."""
    def load(lang):
        with open(os.path.join(data_dir, f"{lang}.json"), encoding="utf-8") as f:
            return [p for art in json.load(f)["data"] for p in art["paragraphs"]]
    qp, pp = load(q_lang), load(p_lang)
    out = []
    for i in range(0, len(qp) - 1, 2):                      # paragraphs i and i + 1: no context used twice
        a, b = pp[i]["context"], pp[i + 1]["context"]             # two contexts each: > 128 tokens
        out.append((qp[i]["qas"][0]["question"] + " " + qp[i]["context"], a + " " + b, b + " " + a))
        if len(out) == n:
            break
    return out


def mlqa_hybrid_batch(n, data_dir, index):
    """Batch `index` of epoch 0 of minihbt's hybrid sampler over `data_dir`: (triplets, description)."""
    from minihbt.data import read_training_data
    from minihbt.sampler import HBTSampler
    examples, _ = read_training_data(data_dir)
    sampler = HBTSampler(examples, n, sampler="hybrid", alpha=0.5, seed=0, max_negatives=1)
    if index >= len(sampler):
        raise ValueError(f"--mlqa-batch {index}: epoch 0 has only {len(sampler)} batches of {n}")
    batch = sampler.batches(0)[index]
    kind = "X-X, " + batch.lang if batch.kind == "xx" else "X-Y"
    about = (f"MLQA-R, minihbt's hybrid sampler (alpha 0.5, seed 0, max 1 negative), batch {index} of epoch 0 "
             f"({kind})")
    return [(t.query, t.positive, list(t.negatives)) for t in batch.triplets], about


def build_batch(case, n, args):
    """The batch of `case` as a dict of texts (no prefixes) and limits; ValueError if it cannot be built."""
    if case == "mlqa-hybrid":
        triplets, about = mlqa_hybrid_batch(n, args.mlqa_data, args.mlqa_batch)
    elif case == "xquad":
        triplets = [(q, p, [neg]) for q, p, neg in xquad_triplets(n, args.data)]
        about = "XQuAD-R, English question, German gold sentence, another German sentence of its paragraph"
    else:
        triplets = [(q, p, [neg]) for q, p, neg in long_triplets(n, args.data)]
        about = "XQuAD-R, question + context as the query, two whole contexts as each passage"
    if len(triplets) < n:
        raise ValueError(f"--triplets {n}: the {case} case can build only {len(triplets)} triplets from its data")
    batch = {"case": case, "about": about, "queries": [t[0] for t in triplets],
             "positives": [t[1] for t in triplets], "negatives": [t[2] for t in triplets],
             "max_query_length": args.query_len, "max_passage_length": args.passage_len[case]}
    candidates = candidate_texts(batch)
    if len(set(candidates)) != len(candidates) or len(set(batch["queries"])) != n:
        raise ValueError(f"the {case} batch repeats a text: minihbt would mask the duplicate and the PyTorch "
                         f"peer would not, so the two steps would not compute the same loss")
    return batch


def candidate_texts(batch):
    """Candidate columns in minihbt's order: every positive, then every triplet's negatives."""
    return batch["positives"] + [x for negs in batch["negatives"] for x in negs]


def token_lengths(model_dir, batch):
    """Real tokens of each query and each candidate (with the E5 prefixes), as minihbt tokenizes."""
    from minihbt.tokenizer import Tokenizer
    tok = Tokenizer(os.path.join(model_dir, "tokenizer.json"))
    q, _ = tok.encode(["query: " + t for t in batch["queries"]], max_length=batch["max_query_length"])
    c, _ = tok.encode(["passage: " + t for t in candidate_texts(batch)], max_length=batch["max_passage_length"])
    return [len(x) for x in q], [len(x) for x in c]


def non_embedding_parameters(model_dir):
    """Parameters of the encoder layers (embeddings and the unused pooler excluded)."""
    from safetensors import safe_open
    with safe_open(os.path.join(model_dir, "model.safetensors"), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                   if ".embeddings." not in "." + k and "pooler" not in k)


def step_flops(config, n_nonembed, lengths):
    """Real-token FLOPs of forward + backward over texts of `lengths` tokens: 6 N sum n + 12 L H sum n^2."""
    L, H = config["num_hidden_layers"], config["hidden_size"]
    return 6 * n_nonembed * sum(lengths) + 12 * L * H * sum(n * n for n in lengths)


def padded_flops(config, n_nonembed, q_lengths, c_lengths):
    """The same count had every position of the two padded batches been a real token."""
    return sum(step_flops(config, n_nonembed, [max(ls)] * len(ls)) for ls in (q_lengths, c_lengths))


XLMR_BASE = {"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "vocab_size": 250002,
             "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
             "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1,
             "bos_token_id": 0, "eos_token_id": 2, "position_embedding_type": "absolute", "initializer_range": 0.02}


def build_xlmr_base(out_dir, tokenizer_dir, seed=0):
    """A random-weight XLM-R-base checkpoint (HF layout) with the XLM-R tokenizer of tokenizer_dir."""
    import numpy as np
    from safetensors.numpy import save_file
    from minihbt.files import atomic_path, copy_file, write_json
    c = XLMR_BASE
    H, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    t = {"embeddings.word_embeddings.weight": normal(V, H),
         "embeddings.position_embeddings.weight": normal(c["max_position_embeddings"], H),
         "embeddings.token_type_embeddings.weight": normal(1, H),
         "embeddings.LayerNorm.weight": np.ones(H, np.float32), "embeddings.LayerNorm.bias": np.zeros(H, np.float32),
         "pooler.dense.weight": normal(H, H), "pooler.dense.bias": np.zeros(H, np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                             "attention.self.value": (H, H), "attention.output.dense": (H, H),
                             "intermediate.dense": (F, H), "output.dense": (H, F)}.items():
            t[p + name + ".weight"] = normal(o, n)
            t[p + name + ".bias"] = np.zeros(o, np.float32)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = np.ones(H, np.float32)
            t[p + ln + ".bias"] = np.zeros(H, np.float32)
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file(t, tmp, metadata={"format": "pt"})
    write_json(os.path.join(out_dir, "config.json"), c, indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            copy_file(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
