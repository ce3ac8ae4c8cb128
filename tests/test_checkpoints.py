"""Checkpoint loading and saving: prefixes, shards, dtypes, round trip, and clear errors."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minihbt
from minihbt import CheckpointError, ConfigError, DeviceError
from minihbt.weights import read_safetensors_header
from conftest import TINY


def copy_model(kind, dst):
    shutil.copytree(TINY[kind], dst)
    return str(dst)


def test_prefixes_and_heads(tmp_path):
    """XLM-R fixture carries `roberta.` + `lm_head.*`; BERT `bert.` + `cls.*` + a pooler."""
    xl = minihbt.load_model(TINY["xlmr"])
    assert all(not k.startswith(("roberta.", "lm_head")) for k in xl.params)
    assert "pooler.dense.weight" not in xl.params
    bert = minihbt.load_model(TINY["bert"])
    assert "pooler.dense.weight" in bert.params and not any(k.startswith(("bert.", "cls.")) for k in bert.params)


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_save_load_roundtrip_bit_identical(kind, tmp_path):
    m = minihbt.load_model(TINY[kind])
    m.save(str(tmp_path / "a"))
    m2 = minihbt.load_model(str(tmp_path / "a"))
    m2.save(str(tmp_path / "b"))
    assert m2.params.keys() == m.params.keys()
    for k in m.params:
        assert m2.params[k].dtype == m.params[k].dtype
        np.testing.assert_array_equal(m2.params[k], m.params[k])
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["architectures"] == (["XLMRobertaModel"] if kind == "xlmr" else ["BertModel"])
    assert os.path.exists(tmp_path / "a" / "tokenizer.json")
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp")]


def test_sharded_checkpoint(tmp_path):
    d = copy_model("xlmr", tmp_path / "m")
    full = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    names = sorted(full)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: full[k] for k in keys}, os.path.join(d, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    sharded = minihbt.load_model(d)
    single = minihbt.load_model(TINY["xlmr"])
    for k in single.params:
        np.testing.assert_array_equal(sharded.params[k], single.params[k])


@pytest.mark.parametrize("st_dtype", ["F16", "BF16"])
def test_half_precision_checkpoints(tmp_path, st_dtype):
    d = copy_model("bert", tmp_path / "m")
    full = load_file(os.path.join(d, "model.safetensors"))
    if st_dtype == "F16":
        half = {k: v.astype(np.float16) for k, v in full.items()}
        widened = {k: v.astype(np.float32) for k, v in half.items()}
        save_file(half, os.path.join(d, "model.safetensors"))
    else:  # bf16 by truncation of the float32 bits; safetensors.numpy cannot write bf16, so write by hand
        bits = {k: (np.ascontiguousarray(v, np.float32).view(np.uint32) >> 16).astype(np.uint16) for k, v in full.items()}
        widened = {k: (b.astype(np.uint32) << 16).view(np.float32) for k, b in bits.items()}
        header, offset, blobs = {}, 0, []
        for k, b in bits.items():
            header[k] = {"dtype": "BF16", "shape": list(b.shape), "data_offsets": [offset, offset + b.nbytes]}
            offset += b.nbytes
            blobs.append(b.tobytes())
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    m = minihbt.load_model(d)
    for k, v in m.params.items():
        assert v.dtype == np.float32
        prefixed = "bert." + k
        np.testing.assert_array_equal(v, widened[prefixed])


def _expect(match, fn, *a, **kw):
    with pytest.raises((CheckpointError, ConfigError, FileNotFoundError)) as e:
        fn(*a, **kw)
    for m in match:
        assert m in str(e.value), str(e.value)
    return str(e.value)


def test_truncated_safetensors(tmp_path):
    d = copy_model("xlmr", tmp_path / "m")
    p = os.path.join(d, "model.safetensors")
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: len(raw) - 1000])
    _expect([p, "truncated"], minihbt.load_model, d)
    open(p, "wb").write(raw[:4])
    _expect([p, "truncated"], minihbt.load_model, d)


def test_header_not_json(tmp_path):
    d = copy_model("xlmr", tmp_path / "m")
    p = os.path.join(d, "model.safetensors")
    raw = bytearray(open(p, "rb").read())
    raw[8:12] = b"\xff{{{"
    open(p, "wb").write(bytes(raw))
    _expect([p, "not valid JSON"], minihbt.load_model, d)


def test_wrong_shape_and_missing_and_unknown(tmp_path):
    d = copy_model("bert", tmp_path / "m")
    p = os.path.join(d, "model.safetensors")
    full = load_file(p)
    bad = dict(full)
    bad["bert.encoder.layer.1.attention.self.query.weight"] = np.zeros((32, 16), np.float32)
    save_file(bad, p)
    _expect([p, "bert.encoder.layer.1.attention.self.query.weight", "[32, 16]", "[32, 32]"], minihbt.load_model, d)
    bad = dict(full)
    del bad["bert.encoder.layer.0.output.LayerNorm.bias"]
    save_file(bad, p)
    _expect(["missing tensor", "encoder.layer.0.output.LayerNorm.bias", "[32]"], minihbt.load_model, d)
    bad = dict(full)
    bad["bert.encoder.layer.2.attention.self.query.weight"] = np.zeros((32, 32), np.float32)
    save_file(bad, p)
    _expect([p, "unknown encoder tensor", "bert.encoder.layer.2.attention.self.query.weight"], minihbt.load_model, d)


def test_unsupported_config_fields(tmp_path):
    d = copy_model("xlmr", tmp_path / "m")
    cp = os.path.join(d, "config.json")
    cfg = json.load(open(cp))
    for field, value, words in [("model_type", "gpt2", "unsupported model_type 'gpt2'"),
                                ("hidden_act", "relu", "unsupported hidden_act 'relu'"),
                                ("position_embedding_type", "relative_key", "position_embedding_type")]:
        json.dump({**cfg, field: value}, open(cp, "w"))
        _expect([cp, words], minihbt.load_model, d)
    open(cp, "w").write("{not json")
    _expect([cp, "not valid JSON"], minihbt.load_model, d)


def test_pickled_checkpoint_refused(tmp_path):
    d = copy_model("xlmr", tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"\x80\x04not really a pickle")
    msg = _expect(["pytorch_model.bin", "arbitrary code", "safe_serialization"], minihbt.load_model, d)
    assert "save_pretrained" in msg


def test_missing_tokenizer(tmp_path):
    d = copy_model("xlmr", tmp_path / "m")
    os.remove(os.path.join(d, "tokenizer.json"))
    _expect([os.path.join(d, "tokenizer.json"), "not found"], minihbt.load_model, d)


def test_missing_directory_and_weights(tmp_path):
    _expect([str(tmp_path / "nope"), "not found"], minihbt.load_model, str(tmp_path / "nope"))
    d = copy_model("xlmr", tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    _expect(["no model.safetensors"], minihbt.load_model, d)


def test_header_reader_reports_tensors():
    tensors, meta = read_safetensors_header(os.path.join(TINY["xlmr"], "model.safetensors"))
    assert tensors["roberta.embeddings.word_embeddings.weight"][0] == "F32"


def test_cuda_without_gpu_is_a_clear_error():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present: the no-GPU error cannot be provoked here")
    except Exception:
        pass
    with pytest.raises(DeviceError, match="cuda"):
        minihbt.load_model(TINY["xlmr"], device="cuda")


def test_bad_dtype_and_pooling():
    with pytest.raises(ValueError, match="float16"):
        minihbt.load_model(TINY["xlmr"], dtype="float16")
    with pytest.raises(ValueError, match="pooler"):
        minihbt.load_model(TINY["xlmr"], pooling="pooler")
    with pytest.raises(ValueError, match="max"):
        minihbt.load_model(TINY["xlmr"], pooling="max")
