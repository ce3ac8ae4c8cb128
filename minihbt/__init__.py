"""minihbt: hybrid batch training for multilingual dense retrieval, from scratch in NumPy/CuPy.

Public API:
    load_model(path, device="cpu", dtype="float32", pooling=None) -> Model
    encode(model, texts, kind="query", batch_size=64, max_length=512, prefix=True, progress=False)
    loss_and_grads(model, queries, positives, negatives=None, temperature=0.05, candidates="inbatch",
                   dropout=False) -> (loss, grads)
"""
from .backend import DeviceError
from .config import ConfigError, ModelConfig
from .loss import loss_and_grads
from .model import Model, encode, load_model
from .weights import CheckpointError

__all__ = ["load_model", "encode", "loss_and_grads", "Model", "ModelConfig", "CheckpointError", "ConfigError", "DeviceError"]
__version__ = "0.1.0"
