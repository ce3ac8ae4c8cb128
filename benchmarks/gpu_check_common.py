"""What the stages of the GPU check share: where the inputs are, the per-stage record, the
random XLM-R-base model and the tolerance comparisons.

Inputs that cannot be committed travel to the device machine with the run tool's `carry`:
    weights/xlmr-tokenizer/   the XLM-R tokenizer (tokenizer.json, 17 MB) of multilingual-e5-small
    data/xquad-r-en-de/       XQuAD-R en.json and de.json (1.4 MB)
(`python benchmarks/gpu_check.py prepare` fills both from ../shared). Where either is
missing the stages still run, on stand-ins that they name in their record: the tiny test
fixture's tokenizer, and synthetic XQuAD-format paragraphs.
"""
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)                       # this checkout's minihbt, whatever is installed

from minihbt.files import write_json  # noqa: E402,F401  (gpu_check.py imports it from here)

SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared"))
TOKENIZER_DIR = os.path.join(ROOT, "weights", "xlmr-tokenizer")
DATA_DIR = os.path.join(ROOT, "data", "xquad-r-en-de")
TINY_XLMR = os.path.join(ROOT, "tests", "fixtures", "tiny-xlmr")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DATA_FILES = ("en.json", "de.json", "LICENSE")
XLMR_BASE = {"vocab_size": 250002, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 514, "type_vocab_size": 1,
             "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
             "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02}
# smoke runs build the random model through the same code with these sizes in place of XLM-R base's
SMOKE_SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


REPORT = "gpu_check.json"


def update_report(out, stage, fields):
    """Merge `fields` into stage `stage` of OUT/gpu_check.json (written atomically; one
    stage runs at a time, so read-modify-write is safe). The file is current after every
    change, so a run cut off at any point still returns what it had measured."""
    path = os.path.join(out, REPORT)
    report = {"stages": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    report["stages"].setdefault(str(stage), {}).update(fields)
    write_json(path, report)
    return report


class StageRecord:
    """The figures, checks and notes of one stage, saved into OUT/gpu_check.json after every change."""

    def __init__(self, out, stage, name):
        self.out, self.stage = out, stage
        self.data = {"name": name, "figures": {}, "checks": [], "notes": []}
        self.save()

    def figure(self, key, value):
        self.data["figures"][key] = value
        self.save()

    def note(self, text):
        print(f"  note: {text}")
        self.data["notes"].append(text)
        self.save()

    def check(self, name, passed, value, tolerance):
        """A pass/fail check with the measured value and the stated tolerance or target."""
        self.data["checks"].append({"name": name, "passed": bool(passed), "value": value, "tolerance": tolerance})
        print(f"  check {'PASS' if passed else 'FAIL'}: {name}: {value} (tolerance/target: {tolerance})")
        self.save()

    def needs_gpu(self, name, why):
        """A part of the stage not run here because it needs a GPU: recorded as such, neither
        passed nor failed (the PyTorch sides on the tests' CuPy stand-in)."""
        self.data.setdefault("needs_gpu", []).append({"name": name, "reason": why})
        print(f"  needs a GPU: {name}: {why}")
        self.save()

    def save(self):
        update_report(self.out, self.stage, self.data)


def torch_needs_gpu(device):
    """Why the PyTorch side of a comparison on `device` cannot run here, or None where it can. On
    the tests' CuPy stand-in (tests/fake_cupy: NumPy behind CuPy's API) there is no GPU, and
    minihbt's side is not on one either. With a real CuPy the PyTorch side runs as always (a
    torch without CUDA then fails its checks: that machine has a GPU)."""
    if device != "cuda":
        return None
    import cupy
    if not getattr(cupy, "STAND_IN", False):
        return None
    import torch
    return (f"CuPy is the tests' stand-in (tests/fake_cupy), there is no GPU here "
            f"(torch {torch.__version__}, CUDA {'available' if torch.cuda.is_available() else 'not available'})")


def find_tokenizer():
    """(directory holding tokenizer.json, what it is): the carried XLM-R tokenizer, else the
    tiny fixture's (enough to run; token counts then differ from XLM-R's)."""
    if os.path.exists(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        return TOKENIZER_DIR, "XLM-R tokenizer of multilingual-e5-small (weights/xlmr-tokenizer)"
    return TINY_XLMR, ("stand-in: the tiny fixture's tokenizer (weights/xlmr-tokenizer was not carried; "
                       "token counts are not XLM-R's)")


def find_xquad(work):
    """(directory with en.json and de.json in XQuAD-R format, what it is): the carried copy,
    ../shared's, else synthetic paragraphs written under `work`."""
    for path, what in ((DATA_DIR, "XQuAD-R en/de (data/xquad-r-en-de)"),
                       (os.path.join(SHARED, "data", "xquad-r"), "XQuAD-R en/de (../shared)")):
        if all(os.path.exists(os.path.join(path, f"{lang}.json")) for lang in ("en", "de")):
            return path, what
    out = os.path.join(work, "synthetic-xquad")
    if not os.path.exists(os.path.join(out, "de.json")):
        synthetic_xquad(out)
    return out, "stand-in: synthetic XQuAD-format paragraphs (data/xquad-r-en-de was not carried)"


def synthetic_xquad(out_dir, paragraphs=240, sentences=6, words=30, seed=0):
    """en.json and de.json in XQuAD-R's layout (context, sentences, sentence_breaks, qas),
    made of random words from a fixed list: long enough to fill 32-token queries and
    128-token passages."""
    import numpy as np
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    for lang in ("en", "de"):
        vocab = [f"{lang}{w}" for w in ("alpha beta gamma delta river stone light north house field garden "
                                        "market winter summer letter number city bridge").split()]
        paras = []
        for i in range(paragraphs):
            sents = [" ".join(rng.choice(vocab, words)) + "." for _ in range(sentences)]
            context, breaks = "", []
            for s in sents:
                start = len(context) + (1 if context else 0)
                context = (context + " " + s) if context else s
                breaks.append([start, len(context)])
            question = " ".join(rng.choice(vocab, 12)) + "?"
            paras.append({"context": context, "sentences": sents, "sentence_breaks": breaks,
                          "qas": [{"id": f"q{i}", "question": question,
                                   "answers": [{"answer_start": 0, "text": sents[0].split()[0]}]}]})
        write_json(os.path.join(out_dir, f"{lang}.json"), {"data": [{"title": "synthetic", "paragraphs": paras}]})


def build_random_xlmr(out, tokenizer_dir, smoke=False):
    """A random-weight XLM-R-base checkpoint (HF layout, initialised by transformers: normal
    0.02 weights, unit LayerNorms), with the tokenizer files of tokenizer_dir; made once per
    run under `out`'s name and renamed into place when complete. Smoke runs use SMOKE_SHAPE."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel
    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = XLMRobertaConfig(**{**XLMR_BASE, **(SMOKE_SHAPE if smoke else {})})
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    XLMRobertaModel(config, add_pooling_layer=True).save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), tmp)
    os.replace(tmp, out)
    print(f"  built {os.path.basename(out)} ({config.num_hidden_layers} layers, hidden {config.hidden_size}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return out


def xlmr_base(work, tokenizer_dir, smoke=False):
    """The run's random XLM-R base (a small one for smoke runs), built on first use."""
    return build_random_xlmr(os.path.join(work, "xlmr-smoke-random" if smoke else "xlmr-base-random"),
                             tokenizer_dir, smoke)


def long_triplets(n, data_dir, q_lang="en", p_lang="de"):
    """n triplets whose texts fill 32-token queries and 128-token passages (the GPU batch of
    benchmarks/train_step.py): (question + its context in q_lang, the contexts of paragraphs
    i and i + 1 in p_lang, the same two in the other order); no text twice."""
    def paragraphs(lang):
        with open(os.path.join(data_dir, f"{lang}.json"), encoding="utf-8") as f:
            return [p for art in json.load(f)["data"] for p in art["paragraphs"]]
    qp, pp = paragraphs(q_lang), paragraphs(p_lang)
    out = []
    for i in range(0, min(len(qp), len(pp)) - 1, 2):
        a, b = pp[i]["context"], pp[i + 1]["context"]
        out.append((qp[i]["qas"][0]["question"] + " " + qp[i]["context"], a + " " + b, b + " " + a))
        if len(out) == n:
            break
    return out


def load_model_with(model_dir, device, tf32=False, fused=False):
    """minihbt.load_model with the GPU switches asked for: (model, None), or (None, why not)
    where this minihbt's load_model has no such parameter (the switches moved)."""
    import inspect
    import minihbt
    accepted = inspect.signature(minihbt.load_model).parameters
    switches = {"tf32": tf32, "fused_kernels": fused}
    missing = [k for k, on in switches.items() if on and k not in accepted]
    if missing:
        return None, f"minihbt.load_model has no {', '.join(missing)} parameter"
    kwargs = {k: v for k, v in switches.items() if k in accepted}
    return minihbt.load_model(model_dir, device=device, pooling="mean", **kwargs), None


def optim_module():
    """The module with minihbt's AdamW and clip_grad_norm: rowgrad (this checkout) or optim (before it)."""
    try:
        from minihbt import rowgrad as optim
    except ImportError:
        from minihbt import optim
    return optim


def optimizer_for(model, lr, weight_decay=0.01):
    """minihbt's AdamW over the model's trainable tensors, on the model's device."""
    import inspect
    AdamW = optim_module().AdamW
    params = {k: model.params[k] for k in model.trainable_names()}
    where = ({"backend": model.backend} if "backend" in inspect.signature(AdamW).parameters else {"xp": model.xp})
    return AdamW(params, lr=lr, weight_decay=weight_decay, **where)


def clip_gradients(model, grads, max_norm):
    """minihbt's clip_grad_norm, whichever of its signatures this checkout has."""
    import inspect
    clip_grad_norm = optim_module().clip_grad_norm
    first = next(iter(inspect.signature(clip_grad_norm).parameters))
    return clip_grad_norm(grads, max_norm) if first == "grads" else clip_grad_norm(model.xp, grads, max_norm)


def synchronize(model):
    """Wait for the GPU's queued work (a no-op on the CPU), so that a timer sees it."""
    if model.xp.__name__ == "cupy":
        model.xp.cuda.runtime.deviceSynchronize()


def xquad_texts(data_dir, n):
    """n passages: the sentences of en.json then de.json, repeated as needed."""
    sents = []
    for lang in ("en", "de"):
        with open(os.path.join(data_dir, f"{lang}.json"), encoding="utf-8") as f:
            sents += [s for art in json.load(f)["data"] for p in art["paragraphs"] for s in p["sentences"]]
    return [sents[i % len(sents)] for i in range(n)]


def relative_error(a, b, floor=1.0):
    """max |a - b| / max(floor, max |b|) over two arrays (or scalars), as a float."""
    import numpy as np
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(floor, float(np.abs(b).max()))) if b.size else 0.0


def gpu_memory_mb(xp):
    """Bytes CuPy's default memory pool holds, in MB (None on NumPy)."""
    import numpy as np
    return None if xp is np else xp.get_default_memory_pool().total_bytes() / 2 ** 20
