"""train.py end to end on the tiny checkpoints: exact resume, Ctrl-C, non-finite loss,
config files, data errors, and checkpoints that open in transformers."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import minihbt
import train
from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 parallel groups in 3 made-up languages (a tiny word list each), JSONL."""
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    words = {l: [f"{l}{i}" for i in range(50)] for l in ("aa", "bb", "cc")}
    with open(path, "w", encoding="utf-8") as f:
        for g in range(40):
            for l, w in words.items():
                f.write(json.dumps({"id": f"{g}-{l}", "lang": l, "query": f"{w[g]} {w[(g * 7) % 50]} ?",
                                    "positive": f"{w[g]} {w[(g * 3) % 50]} {w[(g * 11) % 50]} .",
                                    "negatives": [f"{w[(g + 1) % 50]} {w[(g * 5) % 50]} ."], "group": str(g)}) + "\n")
    return str(path)


def run(data, out, *extra, kind="xlmr"):
    argv = ["--model", TINY[kind], "--train", data, "--batch-size", "4", "--lr", "1e-3", "--warmup", "2",
            "--out", str(out), *extra]
    return train.main(argv)


def log_losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f]


def test_resume_is_bitwise_exact(data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(data, straight, "--steps", "6", "--save-every", "0")
    run(data, split, "--steps", "3", "--save-every", "0")
    run(data, split, "--resume", str(split), "--steps", "6")
    assert log_losses(split) == log_losses(straight) and len(log_losses(straight)) == 6
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(split / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    before = load_file(os.path.join(TINY["xlmr"], "model.safetensors"))
    assert not np.array_equal(a["encoder.layer.0.attention.self.query.weight"],
                              before["roberta.encoder.layer.0.attention.self.query.weight"])
    # dropout was on: the same run without it would have other losses
    state = json.loads((split / "final" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["settings"]["seed"] == 0


def test_resume_refuses_changed_settings(data, tmp_path):
    run(data, tmp_path / "r", "--steps", "2")
    with pytest.raises(SystemExit, match="temperature"):
        train.main(["--resume", str(tmp_path / "r"), "--steps", "4", "--temperature", "0.1"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(["--resume", str(tmp_path / "nothing"), "--steps", "4"])


def test_ctrl_c_saves_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", TINY["xlmr"], "--train", data,
           "--batch-size", "4", "--steps", "100000", "--save-every", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    steps = len(log.read_text().splitlines())
    ckpt = out / f"checkpoint-{steps}"
    assert ckpt.is_dir() and "--resume" in err
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == steps
    minihbt.load_model(str(ckpt))                                   # a complete, loadable checkpoint
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="loss is nan|loss is inf"):
        run(data, out, "--steps", "20", "--save-every", "1", "--lr", "1e30", "--warmup", "0", "--max-grad-norm", "0")
    kept = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert kept
    minihbt.load_model(str(out / kept[0]))


def test_config_file_and_precedence(data, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": TINY["bert"], "train": [data], "batch-size": 4, "steps": 2,
                               "temperature": 0.1, "sampler": "xx"}))
    s = train.resolve_args(["--config", str(cfg), "--steps", "3", "--out", str(tmp_path / "o")]).settings
    assert s.steps == 3 and s.temperature == 0.1 and s.batch_size == 4 and s.sampler == "xx"
    assert s.lr == 3e-5 and s.alpha == 0.5                        # untouched defaults
    cfg.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(SystemExit, match="bogus"):
        train.resolve_args(["--config", str(cfg)])


def test_help_explains_every_flag():
    text = train.build_parser().format_help()
    for flag in ("--model", "--train", "--sampler", "--alpha", "--batch-size", "--lr", "--weight-decay", "--warmup",
                 "--steps", "--max-query-len", "--max-passage-len", "--temperature", "--candidates", "--seed",
                 "--device", "--out", "--save-every", "--resume", "--grad-cache-chunk", "--config"):
        assert flag in text
    assert text.count("default") >= 15


def test_bad_training_data_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"lang": "aa", "query": "q", "positive": "p"}\n{"lang": "aa", "query": "q2"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: field 'positive'"):
        train.main(["--model", TINY["xlmr"], "--train", str(bad), "--out", str(tmp_path / "o")])
    bad.write_text('{"lang": "aa", "query": "q", "positive": "p"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not valid JSON"):
        train.main(["--model", TINY["xlmr"], "--train", str(bad), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("kind,pooling", [("xlmr", "mean"), ("bert", "pooler")])
def test_saved_checkpoint_opens_in_transformers(data, tmp_path, kind, pooling):
    torch = pytest.importorskip("torch", reason="torch is not installed: the transformers check needs it")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    final = run(data, tmp_path / "r", "--steps", "2", "--pooling", pooling, kind=kind)
    model = minihbt.load_model(final)
    assert model.pooling == pooling
    texts = ["aa1 aa7 ?", "bb3 bb9 bb2 .", "cc4 ."]
    ours = minihbt.encode(model, texts, kind="query")
    tok = transformers.AutoTokenizer.from_pretrained(final)
    hf = transformers.AutoModel.from_pretrained(final).eval()
    enc = tok(["query: " + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        res = hf(**enc)
    if pooling == "mean":
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (res.last_hidden_state * m).sum(1) / m.sum(1)
    else:
        pooled = res.pooler_output
    ref = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    assert np.abs(ours - ref).max() <= 1e-5
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    st = SentenceTransformer(final, device="cpu")
    np.testing.assert_allclose(st.encode(["query: " + t for t in texts]), ours, atol=1e-5)
