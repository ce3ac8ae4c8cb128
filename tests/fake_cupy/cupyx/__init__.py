"""cupyx as minihbt uses it: cupyx.scipy.special.erf (part of the CuPy stand-in, see cupy/__init__.py)."""
from . import scipy  # noqa: F401
