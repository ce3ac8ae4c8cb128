"""minihbt: hybrid batch training for multilingual dense retrieval, from scratch in NumPy/CuPy.

Public API:
    load_model(path, device="cpu", dtype="float32", pooling=None, tf32=False, fused_kernels=False) -> Model
    encode(model, texts, kind="query", batch_size=64, max_length=None, prefix=True, progress=False)
    loss_and_grads(model, queries, positives, negatives=None, temperature=0.05, candidates="inbatch",
                   dropout=False) -> (loss, grads)           (fast_step.py: the fast path)

The plain path, to read: layers.py (the operations), encoder.py (the transformer), step.py
(InfoNCE, AdamW, clipping, schedule, loss_and_grads and train_step). Importing it loads none of
the fast path: the names above that live there (model.py, fast_step.py) load on first use.
"""
import importlib

from .backend import Backend, DeviceError
from .config import ConfigError, ModelConfig
from .weights import CheckpointError

_LAZY = {"Model": "model", "load_model": "model", "encode": "model", "loss_and_grads": "fast_step"}

__all__ = ["Backend", "load_model", "encode", "loss_and_grads", "Model", "ModelConfig", "CheckpointError", "ConfigError",
           "DeviceError"]
__version__ = "0.1.0"


def __getattr__(name):
    """minihbt.load_model and the others of _LAZY, from their module, imported on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("." + _LAZY[name], __name__), name)
