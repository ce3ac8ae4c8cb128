"""`python -m minihbt.check export` and `step`: the golden bundle of one training step is what
step.loss_and_grads and step.train_step compute; `step` passes a bundle against itself and
names the first tensor out of tolerance; bad input is one line with exit status 2. With torch,
the two example implementations (examples/torch_reference.py, a plain PyTorch + transformers
step, and examples/sentence_transformers_mnrl.py, sentence-transformers' MNRL) pass, and
mistakes injected into the PyTorch one are named at the tensor where they first show, on
float64 bundles (float32 rounding hides several of them).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minihbt
from minihbt import step as plain
from minihbt.check import __main__ as dispatcher
from minihbt.check import bundle, export_cmd, step_cmd
from minihbt.batchlog import sampler_batches
from minihbt.data import read_training_data
from minihbt.encoder import WORD_TABLE
from minihbt.files import sha256_file
from minihbt.sampler import HBTSampler
from conftest import TINY
from fixtures.spec import TRIPLETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
# One negative each, no repeated text: a batch sentence-transformers' MNRL can express.
CLEAN = [("Where is the nearest train station?", "Der nächste Bahnhof ist zwei Straßen entfernt.",
          ["Die Katze sitzt auf der Matte."]),
         ("¿Dónde está la estación de tren más cercana?", "最近的火车站在哪里？", ["猫坐在垫子上。"]),
         ("Кошка сидит на коврике?", "The cat sat on the mat.", ["Paris is the capital of France."]),
         ("أين أقرب محطة قطار؟", "En yakın tren istasyonu nerede?", ["Con mèo ngồi trên tấm thảm."])]
BATCHES = {"triplets": TRIPLETS, "clean": CLEAN}


def run(main, argv, capsys):
    """(exit status, stdout, stderr) of a program's main."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def write_batch(path, triplets):
    with open(path, "w", encoding="utf-8") as f:
        for q, p, negs in triplets:
            f.write(json.dumps({"query": q, "positive": p, "negatives": list(negs)}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def make_bundle(tmp_path_factory):
    """make_bundle(model, dtype, batch, *flags) -> a bundle folder, each written once."""
    made = {}

    def make(model, dtype="float64", batch="triplets", *flags):
        key = (model, dtype, batch, flags)
        if key not in made:
            folder = tmp_path_factory.mktemp("bundle")
            argv = ["--model", TINY.get(model, model), "--dtype", dtype, "--out", str(folder / "b"),
                    "--batch", write_batch(folder / "batch.jsonl", BATCHES[batch]), *flags]
            assert export_cmd.main(argv) == 0
            made[key] = str(folder / "b")
        return made[key]
    return make


def tensors(path):
    return {k: v for f in bundle.FILES.values() for k, v in load_file(os.path.join(path, f)).items()}


def manifest_of(path):
    with open(os.path.join(path, bundle.MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def split(triplets):
    return [t[0] for t in triplets], [t[1] for t in triplets], [list(t[2]) for t in triplets]


def close(a, b, tol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


# ----------------------------------------------------------------------------- (a) the bundle

@pytest.mark.parametrize("kind", ["xlmr", "bert"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_manifest_and_tensors(make_bundle, kind, dtype):
    path = make_bundle(kind, dtype)
    m, t = manifest_of(path), tensors(path)
    assert m["format"] == bundle.FORMAT and m["format_version"] == bundle.FORMAT_VERSION
    assert m["created_by"]["minihbt"] == minihbt.__version__ and m["dtype"] == dtype
    assert m["model"]["sha256"] == {"model.safetensors": sha256_file(os.path.join(TINY[kind], "model.safetensors"))}
    s = m["settings"]
    assert (s["query_prefix"], s["passage_prefix"], s["pooling"], s["candidates"]) == ("query: ", "passage: ", "mean",
                                                                                       "inbatch")
    assert s["betas"] == [0.9, 0.999] and s["eps"] == 1e-8 and s["max_grad_norm"] == 1.0 and s["dropout"] is False
    assert set(m["tolerances"]["float32"]) == set(m["tolerance_why"]) == set(bundle.TOLERANCES)
    assert m["tolerances"]["float32"]["updated"] == 2 * s["lr"] and m["tolerances"]["float64"]["tokens"] == 0
    names = [e["name"] for e in m["tensors"]]
    assert set(names) == set(t) and [e["phase"] for e in m["tensors"]] == sorted(
        (e["phase"] for e in m["tensors"]), key=["forward", "backward", "update"].index)
    assert names.index("grad/query/encoder.layer.1.output") < names.index("grad/encoder.layer.1.output.dense.weight") \
        < names.index("grad/query/encoder.layer.0.output") < names.index("grad/encoder.layer.0.output.dense.weight")
    B, M = len(TRIPLETS), len(TRIPLETS) + sum(len(x[2]) for x in TRIPLETS)
    assert t["query/input_ids"].shape[0] == B and t["passage/attention_mask"].shape[0] == M
    assert t["scores"].shape == t["mask"].shape == t["grad/scores"].shape == (B, M) and t["loss"].shape == ()
    assert t["passage/encoder.layer.1.output"].dtype == np.dtype(dtype) and t["query/input_ids"].dtype == np.int64
    rows = t[bundle.WORD_ROWS]
    assert np.array_equal(rows, np.unique(np.r_[t["query/input_ids"].ravel(), t["passage/input_ids"].ravel()]))
    assert t["grad/" + WORD_TABLE].shape == t["updated/" + WORD_TABLE].shape == (len(rows), 32)
    assert "grad/pooler.dense.weight" not in t and not any(n.startswith("updated/pooler") for n in t)
    with open(os.path.join(path, bundle.BATCH), encoding="utf-8") as f:
        assert [(d["query"], d["positive"], tuple(d["negatives"])) for d in map(json.loads, f)] == \
            [(q, p, tuple(n)) for q, p, n in TRIPLETS]


@pytest.mark.parametrize("kind,dtype,flags", [("xlmr", "float64", ()), ("bert", "float64", ()),
                                              ("xlmr", "float32", ()), ("bert", "float32", ()),
                                              ("xlmr", "float64", ("--symmetric",)),
                                              ("bert", "float64", ("--candidates", "paper", "--pooling", "cls")),
                                              ("bert", "float64", ("--pooling", "pooler", "--max-passage-len", "9"))])
def test_the_bundle_is_step_loss_and_grads(make_bundle, kind, dtype, flags):
    """The exporter's loss and every gradient equal step.loss_and_grads (1e-12 in float64)."""
    t = tensors(make_bundle(kind, dtype, "triplets", *flags))
    m = manifest_of(make_bundle(kind, dtype, "triplets", *flags))
    s = m["settings"]
    model = minihbt.load_model(TINY[kind], dtype=dtype, pooling=s["pooling"])
    loss, grads = plain.loss_and_grads(model, *split(TRIPLETS), temperature=s["temperature"],
                                       candidates=s["candidates"], symmetric=s["symmetric"],
                                       max_query_length=s["max_query_length"],
                                       max_passage_length=s["max_passage_length"])
    tol = 1e-12 if dtype == "float64" else 1e-6
    assert close(t["loss"], loss, tol)
    assert sorted(m["trained"]) == sorted(model.trainable_names()) == sorted(
        n[len("grad/"):] for n in t if n.startswith("grad/") and n[len("grad/"):] in model.params)
    for name in m["trained"]:
        g = grads[name]
        if name == WORD_TABLE:
            rows = t[bundle.WORD_ROWS]
            assert not np.delete(g, rows, axis=0).any()
            g = g[rows]
        assert close(t["grad/" + name], g, tol), name
    q, c = t["query/normalized"], t["passage/normalized"]      # the scores' gradient is the embeddings'
    assert close(t["grad/scores"] @ c / s["temperature"], t["grad/query/normalized"], tol)
    assert close(t["grad/scores"].T @ q / s["temperature"], t["grad/passage/normalized"], tol)


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_the_update_is_step_train_step(make_bundle, kind):
    """With clipping engaged (max norm 0.5) and lr 1e-3: the bundle's parameters after the step
    are step.train_step's; the word table's other rows are only decayed."""
    flags = ("--lr", "1e-3", "--max-grad-norm", "0.5")
    t = tensors(make_bundle(kind, "float64", "triplets", *flags))
    model = minihbt.load_model(TINY[kind], dtype="float64")
    before = model.params[WORD_TABLE].copy()
    opt = plain.AdamW({k: model.params[k] for k in model.trainable_names()}, lr=1e-3)
    loss, norm = plain.train_step(model, opt, *split(TRIPLETS), max_grad_norm=0.5, max_passage_length=256,
                                  max_query_length=64)
    assert norm > 0.5 and close(t["grad_norm"], norm, 1e-12) and close(t["loss"], loss, 1e-12)
    for name in model.trainable_names():
        p = model.params[name]
        if name == WORD_TABLE:
            rows = t[bundle.WORD_ROWS]
            assert close(np.delete(p, rows, axis=0), np.delete(before, rows, axis=0) * (1 - 1e-3 * 0.01), 1e-15)
            p = p[rows]
        assert close(t["updated/" + name], p, 1e-12), name


def test_a_clipping_bug_shows_in_float64_only(make_bundle, tmp_path, capsys):
    """AdamW's first step moves each entry by about lr whatever the gradient's scale: an update
    without clipping passes a float32 bundle (2 lr) and is named at the first update in float64."""
    for dtype, verdict in (("float32", 0), ("float64", 1)):
        path = make_bundle("xlmr", dtype)
        model = minihbt.load_model(TINY["xlmr"], dtype=dtype)
        names = [n for n in model.trainable_names() if n != WORD_TABLE]
        opt = plain.AdamW({k: model.params[k] for k in model.trainable_names()}, lr=3e-5)
        plain.train_step(model, opt, *split(TRIPLETS), max_grad_norm=0, max_query_length=64, max_passage_length=128)
        save_file({"updated/" + n: np.ascontiguousarray(model.params[n]) for n in names}, str(tmp_path / f"{dtype}.st"))
        status, out, _ = run(step_cmd.main, [path, str(tmp_path / f"{dtype}.st")], capsys)
        assert status == verdict, out
        if verdict:
            assert first_divergence(out).startswith("updated/"), out
        else:
            assert first_divergence(out) is None and "verdict: OK" in out, out


def test_a_bundle_from_the_data_is_train_py_s_batch(tmp_path):
    """--data --sampler --seed --batch-size --step: the batch of train.py's step, in batch.jsonl."""
    data = tmp_path / "tiny.jsonl"
    langs = ["en", "de", "es"]
    with open(data, "w", encoding="utf-8") as f:
        for g in range(6):
            for lang in langs:
                f.write(json.dumps({"id": f"{g}{lang}", "lang": lang, "group": str(g), "query": f"q {g} {lang}?",
                                    "positive": f"p {g} {lang}.", "negatives": [f"n {g} {lang}."]}) + "\n")
    out = tmp_path / "b"
    assert export_cmd.main(["--model", TINY["xlmr"], "--data", str(data), "--sampler", "xy", "--seed", "3",
                            "--batch-size", "4", "--step", "2", "--out", str(out)]) == 0
    batch = list(sampler_batches(HBTSampler(read_training_data(str(data))[0], 4, sampler="xy", seed=3), 2))[-1]
    with open(out / bundle.BATCH, encoding="utf-8") as f:
        lines = [json.loads(x) for x in f]
    assert [(d["query"], d["passage_lang"]) for d in lines] == [(x.query, x.passage_lang) for x in batch.triplets]
    assert manifest_of(out)["batch"]["kind"] == "xy" and manifest_of(out)["batch"]["source"] == "tiny"


# ----------------------------------------------------------------------------- step against itself and edits

def first_divergence(out):
    line = next((x for x in out.splitlines() if x.startswith("first divergence: ")), None)
    return line and line.split()[2]


def test_a_bundle_passes_against_itself_and_a_change_is_named(make_bundle, tmp_path, capsys):
    path = make_bundle("xlmr")
    status, out, _ = run(step_cmd.main, [path, path], capsys)
    assert status == 0 and "verdict: OK" in out and first_divergence(out) is None
    t = tensors(path)
    t["passage/encoder.layer.1.output"][2, 1, 3] += 1e-7            # float64 tolerance 1e-10 sees it
    t["grad/" + WORD_TABLE] = np.zeros(manifest_of(path)["row_stored"]["grad/" + WORD_TABLE]["full_shape"])
    t["grad/" + WORD_TABLE][t[bundle.WORD_ROWS]] = tensors(path)["grad/" + WORD_TABLE]   # the whole table will do
    del t["query/embeddings"]
    save_file(t, str(tmp_path / "theirs.safetensors"))
    status, out, _ = run(step_cmd.main, [path, str(tmp_path / "theirs.safetensors")], capsys)
    assert status == 1 and first_divergence(out) == "passage/encoder.layer.1.output"
    assert "not provided (1): query/embeddings" in out
    assert f"ok    grad/{WORD_TABLE}" in out


def test_the_command_line(make_bundle, tmp_path):
    path = make_bundle("bert")
    assert {"export", "step"} <= set(dispatcher.COMMANDS)
    done = subprocess.run([sys.executable, "-m", "minihbt.check", "step", path, path, "--worst", "3"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "verdict: OK" in done.stdout and len(done.stdout.splitlines()) == 6


def test_a_shape_difference_is_a_divergence(make_bundle, tmp_path, capsys):
    """Token ids one column short (another tokenisation or prefix) and scores one column short:
    the first in comparison order is named, with both shapes, exit status 1 (not a refusal)."""
    path = make_bundle("bert")
    t = tensors(path)
    t["query/input_ids"] = t["query/input_ids"][:, :-1]
    t["scores"] = t["scores"][:, :-1]
    save_file(t, str(tmp_path / "theirs.safetensors"))
    for flags in ([], ["--worst", "2"]):
        status, out, _ = run(step_cmd.main, [path, str(tmp_path / "theirs.safetensors"), *flags], capsys)
        assert status == 1 and first_divergence(out) == "query/input_ids", out
        B, T = tensors(path)["query/input_ids"].shape
        assert f"first divergence: query/input_ids (forward; shape: THEIRS {[B, T - 1]}, the bundle {[B, T]})" in out
        assert "verdict: DIVERGES; 2 of" in out
        assert any(x.startswith("FAIL  scores ") and "shape: THEIRS" in x for x in out.splitlines()), out


# ----------------------------------------------------------------------------- (b) bad input: one line, exit 2

def one_line_exit_2(status, err, *words):
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("edit,words", [
    (lambda a, p: a + ["--dtype", "float16"], ["--dtype", "float32"]),
    (lambda a, p: ["--model", str(p / "none")] + a[2:], ["--model", "no such folder"]),
    (lambda a, p: a + ["--data", str(p)], ["--batch", "--data", "not both"]),
    (lambda a, p: a + ["--lr", "-1"], ["--lr", "> 0"]),
    (lambda a, p: a + ["--beta2", "1"], ["--beta2", "[0, 1)"]),
    (lambda a, p: a + ["--max-query-len", "500"], ["--max-query-len", "128"]),
    (lambda a, p: a[:-1] + [str(p / "missing.jsonl")], ["--batch", "no such file"]),
])
def test_export_refuses_bad_settings(tmp_path, capsys, edit, words):
    argv = ["--model", TINY["bert"], "--out", str(tmp_path / "b"), "--batch", write_batch(tmp_path / "ok.jsonl",
                                                                                         TRIPLETS)]
    status, _, err = run(export_cmd.main, edit(argv, tmp_path), capsys)
    one_line_exit_2(status, err, *words)
    assert not (tmp_path / "b" / bundle.MANIFEST).exists()


def test_export_refuses_a_bad_batch_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positive": "p"}\n{"query": "q2", "negatives": ["n"]}\n', encoding="utf-8")
    status, _, err = run(export_cmd.main, ["--model", TINY["bert"], "--out", str(tmp_path / "b"), "--batch",
                                           str(bad)], capsys)
    one_line_exit_2(status, err, "bad.jsonl:2", "positive")


def test_export_says_which_settings_to_match(tmp_path, capsys):
    """The manifest's settings, with a default lowered to the model's positions said so."""
    batch = write_batch(tmp_path / "ok.jsonl", TRIPLETS)
    status, out, _ = run(export_cmd.main, ["--model", TINY["xlmr"], "--out", str(tmp_path / "a"), "--batch", batch],
                         capsys)
    assert status == 0 and "max lengths 64/128" in out
    assert "--max-passage-len's default 256 lowered to this model's 128 positions" in out
    status, out, _ = run(export_cmd.main, ["--model", TINY["xlmr"], "--out", str(tmp_path / "b"), "--batch", batch,
                                           "--max-passage-len", "100"], capsys)
    assert status == 0 and "max lengths 64/100" in out and "lowered" not in out
    assert manifest_of(tmp_path / "b")["settings"]["max_passage_length"] == 100


def test_step_refuses_bad_input(make_bundle, tmp_path, capsys):
    path = make_bundle("bert")
    status, _, err = run(step_cmd.main, [path, str(tmp_path / "missing")], capsys)
    one_line_exit_2(status, err, "THEIRS", "missing", "no such file")
    other = shutil.copytree(path, tmp_path / "v2")
    m = manifest_of(other)
    (other / bundle.MANIFEST).write_text(json.dumps({**m, "format_version": 2}), encoding="utf-8")
    status, _, err = run(step_cmd.main, [str(other), path], capsys)
    one_line_exit_2(status, err, "format version 2", "version 1")
    t = tensors(path)
    save_file({"something": t["loss"]}, str(tmp_path / "unrelated.safetensors"))
    status, _, err = run(step_cmd.main, [path, str(tmp_path / "unrelated.safetensors")], capsys)
    one_line_exit_2(status, err, "none of its 1 tensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    status, _, err = run(step_cmd.main, [path, str(tmp_path / "junk.safetensors")], capsys)
    one_line_exit_2(status, err, "junk.safetensors", "cannot be read")


def rewrite_bundle(src, dst, edits):
    """A copy of bundle `src` whose tensors are changed by edits {name: dtype}, its manifest as it was."""
    shutil.copytree(src, dst)
    for ph, file in bundle.FILES.items():
        t = load_file(os.path.join(src, file))
        save_file({n: (a.astype(edits[n]) if n in edits else a) for n, a in t.items()}, os.path.join(dst, file))
    return str(dst)


def test_step_checks_dtypes_before_comparing(make_bundle, tmp_path, capsys):
    """A bundle whose files hold other dtypes than its manifest is broken; a submission of dtypes the
    bundle's tolerances do not assume is refused, naming every such tensor in one line (exit 2)."""
    path = make_bundle("xlmr")                                     # float64
    broken = rewrite_bundle(path, tmp_path / "broken", {"scores": np.float16, "query/input_ids": np.float32})
    status, _, err = run(step_cmd.main, [broken, path], capsys)
    one_line_exit_2(status, err, "BUNDLE is broken", "scores holds float16", "the manifest says float64",
                    "query/input_ids holds float32", "the manifest says int64")
    as32 = rewrite_bundle(path, tmp_path / "as32", {n: np.float32 for n, a in tensors(path).items() if a.dtype.kind == "f"})
    status, _, err = run(step_cmd.main, [as32, path], capsys)      # a float64 bundle whose files hold float32
    one_line_exit_2(status, err, "BUNDLE is broken", "scores holds float32", "the manifest says float64")
    m = manifest_of(as32)                                          # ... even where its tensor list says float32
    m["tensors"] = [{**e, "dtype": "float32" if e["dtype"] == "float64" else e["dtype"]} for e in m["tensors"]]
    (tmp_path / "as32" / bundle.MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    status, _, err = run(step_cmd.main, [as32, path], capsys)
    one_line_exit_2(status, err, "BUNDLE is broken", "scores holds float32 in a float64 bundle")
    t = tensors(path)
    theirs = {"query/embeddings": t["query/embeddings"].astype(np.float16), "scores": t["scores"].astype(np.float32),
              "query/input_ids": t["query/input_ids"].astype(np.float64), "loss": t["loss"]}
    save_file(theirs, str(tmp_path / "theirs.safetensors"))
    status, _, err = run(step_cmd.main, [path, str(tmp_path / "theirs.safetensors")], capsys)
    one_line_exit_2(status, err, "query/embeddings is float16", "scores is float32", "query/input_ids is float64",
                    "a float64 bundle takes float64 for floating tensors", "an integer or bool dtype for token ids")
    assert "loss" not in err.split("bundle takes")[0]
    path32 = make_bundle("xlmr", "float32")                        # float32 takes float32 and float64, ids int32
    t = tensors(path32)
    ok = {"scores": t["scores"].astype(np.float64), "query/input_ids": t["query/input_ids"].astype(np.int32),
          "mask": t["mask"].astype(bool), "loss": t["loss"]}
    save_file(ok, str(tmp_path / "ok.safetensors"))
    status, out, _ = run(step_cmd.main, [path32, str(tmp_path / "ok.safetensors")], capsys)
    assert status == 0 and "verdict: OK" in out


# ----------------------------------------------------------------------------- (c), (d) with torch

def example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,needs", [("torch_reference", "torch and transformers"),
                                        ("sentence_transformers_mnrl", "torch and sentence-transformers")])
def test_an_example_without_torch_says_what_it_needs(name, needs):
    """Run where torch cannot be imported (None in sys.modules): one line, exit status 2."""
    code = (f"import runpy, sys; sys.modules['torch'] = None; sys.argv = [{name!r}, '--help']; "
            f"runpy.run_path({os.path.join(EXAMPLES, name + '.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"needs {needs} (pip install" in done.stderr


@pytest.fixture(scope="module")
def torch_reference():
    pytest.importorskip("torch", reason="torch is not installed: the PyTorch reference step is not run (CI has it)")
    pytest.importorskip("transformers", reason="transformers is not installed: the PyTorch reference is not run")
    return example("torch_reference")


@pytest.fixture(scope="module")
def mnrl():
    pytest.importorskip("torch", reason="torch is not installed: the sentence-transformers step is not run (CI has it)")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed: MNRL is not run")
    return example("sentence_transformers_mnrl")


def theirs_verdict(module, path, out, capsys, *flags):
    """(exit status of step, its first divergence) for THEIRS written by an example."""
    assert module.main(["--bundle", path, "--out", str(out), *flags]) == 0
    capsys.readouterr()
    status, text, _ = run(step_cmd.main, [path, str(out)], capsys)
    return status, first_divergence(text), text


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
@pytest.mark.parametrize("which", ["torch_reference", "mnrl"])
def test_the_examples_pass_at_float32(make_bundle, tmp_path, capsys, request, kind, which):
    module = request.getfixturevalue(which)
    status, first, text = theirs_verdict(module, make_bundle(kind, "float32", "clean"), tmp_path / "t", capsys)
    assert status == 0, text
    if which == "torch_reference":
        assert "not provided" not in text, text                            # every tensor of the bundle
    else:                                                                   # loss, gradients, update, embeddings
        provided = int(text.split("THEIRS ")[1].split(": ")[1].split()[0])
        assert provided >= 85, text


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_torch_reference_passes_on_the_masked_batch(make_bundle, tmp_path, capsys, torch_reference, kind, dtype):
    """Repeated texts masked, 0 to 2 negatives per triplet; float64 at float64 tolerances."""
    status, _, text = theirs_verdict(torch_reference, make_bundle(kind, dtype), tmp_path / "t", capsys)
    assert status == 0 and "not provided" not in text, text


def test_mnrl_refuses_a_batch_it_cannot_express(make_bundle, tmp_path, capsys, mnrl):
    assert mnrl.main(["--bundle", make_bundle("xlmr", "float32"), "--out", str(tmp_path / "t")]) == 2
    assert "same number of negatives" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pad_quirk_bert(tmp_path_factory):
    """tiny-bert whose config names [CLS] (the first token of every text) its pad_token_id, as
    multilingual-E5's names <s>: a model whose padding row is used, so training it shows."""
    folder = tmp_path_factory.mktemp("quirk") / "tiny-bert-pad-quirk"
    shutil.copytree(TINY["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    cls_id = int(np.load(os.path.join(TINY["bert"], "pad_quirk.npz"))["pad_token_id"])
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": cls_id}))
    return str(folder)


BUG_CASES = [  # (bug, model, where it must be named first)
    ("interleaved-candidates", "xlmr", "passage/input_ids"),
    ("temperature-multiplied", "xlmr", "scores"),
    ("positives-out-of-denominator", "xlmr", "mask"),
    ("mean-over-padding", "xlmr", "query/pooled"),
    ("padding-row-trained", "pad-quirk", "grad/" + WORD_TABLE),
    ("layernorm-eps", "bert", "query/embeddings"),
    ("averaged-gradient", "bert", "grad/encoder.layer.1.output.LayerNorm.weight"),
    ("no-bias-correction", "xlmr", "updated/" + WORD_TABLE),
    ("decay-layernorm", "bert", "updated/embeddings.LayerNorm.weight"),
]


@pytest.mark.parametrize("bug,model,where", BUG_CASES)
def test_a_mistake_is_named_where_it_first_shows(make_bundle, tmp_path, capsys, torch_reference, request, bug, model,
                                                 where):
    model = request.getfixturevalue("pad_quirk_bert") if model == "pad-quirk" else model
    path = make_bundle(model, "float64")
    status, first, text = theirs_verdict(torch_reference, path, tmp_path / "clean", capsys)
    assert status == 0, text                                                # the same step without the bug passes
    status, first, text = theirs_verdict(torch_reference, path, tmp_path / "bug", capsys, "--bug", bug)
    assert status == 1 and first == where, text



def test_tolerances_grow_below_the_temperature_they_were_set_at():
    at = bundle.tolerances(3e-5)
    assert at == bundle.tolerances(3e-5, 0.1)                      # never tighter above 0.05
    low = bundle.tolerances(3e-5, 0.02)                             # 2.5x the scores' rounding
    for dtype in ("float32", "float64"):
        assert low[dtype]["scores"] == pytest.approx(2.5 * at[dtype]["scores"])
        assert low[dtype]["grad"] == pytest.approx(6.25 * at[dtype]["grad"])
        assert all(low[dtype][f] == at[dtype][f] for f in ("tokens", "hidden", "embedding", "param_grad", "updated"))
