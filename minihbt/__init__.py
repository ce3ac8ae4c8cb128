"""minihbt: hybrid batch training for multilingual dense retrieval, from scratch in NumPy/CuPy.

Public API:
    load_model(path, device="cpu", dtype="float32", pooling=None) -> Model
    encode(model, texts, kind="query", batch_size=64, max_length=512, prefix=True, progress=False)
"""
from .backend import DeviceError
from .config import ConfigError, ModelConfig
from .model import Model, encode, load_model
from .weights import CheckpointError

__all__ = ["load_model", "encode", "Model", "ModelConfig", "CheckpointError", "ConfigError", "DeviceError"]
__version__ = "0.1.0"
