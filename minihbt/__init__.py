"""minihbt: hybrid batch training for multilingual dense retrieval, from scratch in NumPy/CuPy.

Public API:
    load_model(path, device="cpu", dtype="float32", pooling=None, tf32=False, fused_kernels=False) -> Model
    encode(model, texts, kind="query", batch_size=64, max_length=512, prefix=True, progress=False)
    loss_and_grads(model, queries, positives, negatives=None, temperature=0.05, candidates="inbatch",
                   dropout=False) -> (loss, grads)           (groups.py: the fast path)

The plain path, to read: layers.py (the operations), encoder.py (the transformer), step.py
(InfoNCE, AdamW, clipping, schedule, loss_and_grads and train_step).
"""
from .backend import Backend, DeviceError
from .config import ConfigError, ModelConfig
from .model import Model, encode, load_model
from .groups import loss_and_grads
from .weights import CheckpointError

__all__ = ["Backend", "load_model", "encode", "loss_and_grads", "Model", "ModelConfig", "CheckpointError", "ConfigError", "DeviceError"]
__version__ = "0.1.0"
