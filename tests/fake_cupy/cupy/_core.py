"""cupy._core as minihbt uses it: the cuBLAS compute-type switch (TF32), which the stand-in keeps
but cannot act on (its GEMMs are NumPy's, in full float32)."""
import types

_compute_types = {}

_routines_linalg = types.SimpleNamespace(
    COMPUTE_TYPE_DEFAULT=0, COMPUTE_TYPE_TF32=4,
    set_compute_type=lambda dtype, mode: _compute_types.__setitem__(str(dtype), mode),
    get_compute_type=lambda dtype: _compute_types.get(str(dtype), 0))
