"""Shared fixtures: the committed tiny checkpoints and multilingual-e5-small built from ../shared;
with MINIHBT_FAKE_CUPY=1, the CuPy stand-in (tests/fake_cupy) in place of any real CuPy."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_CUPY = os.environ.get("MINIHBT_FAKE_CUPY") == "1"
if FAKE_CUPY:                  # `import cupy` finds the stand-in, here and in the programs tests start
    STAND_IN = os.path.join(HERE, "fake_cupy")
    if "cupy" in sys.modules and not getattr(sys.modules["cupy"], "STAND_IN", False):
        raise RuntimeError("MINIHBT_FAKE_CUPY=1, but a real CuPy was imported before tests/conftest.py")
    if STAND_IN not in sys.path:                    # a worker started by a test has it from PYTHONPATH
        sys.path.insert(0, STAND_IN)
        os.environ["PYTHONPATH"] = os.pathsep.join([STAND_IN] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    import cupy
    assert getattr(cupy, "STAND_IN", False), cupy.__file__
FIXTURES = os.path.join(HERE, "fixtures")
SHARED = os.environ.get("MINIHBT_SHARED", os.path.abspath(os.path.join(HERE, "..", "..", "shared")))
TINY = {"xlmr": os.path.join(FIXTURES, "tiny-xlmr"), "bert": os.path.join(FIXTURES, "tiny-bert")}


def shared_path(*parts):
    return os.path.join(SHARED, *parts)


@pytest.fixture(scope="session")
def me5_dir(tmp_path_factory):
    """multilingual-e5-small as a Hugging Face directory, built by ../shared/tools/build_me5_small.py."""
    build = shared_path("tools", "build_me5_small.py")
    if not os.path.exists(build):
        pytest.skip(f"../shared is absent ({build} not found): real-weights test skipped")
    out = str(tmp_path_factory.mktemp("me5"))
    subprocess.run([sys.executable, build, out], check=True, capture_output=True)
    return out


def _cuda_skip_reason():
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed: the CUDA backend is not tested here"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception as e:  # no driver, no device
        return f"CuPy sees no GPU ({e})"
    return "CuPy sees no GPU"


CUDA_SKIP = _cuda_skip_reason()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or ""))]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each backend: CPU always, CUDA where CuPy sees a GPU (skipped with the reason otherwise)."""
    return request.param


def pytest_terminal_summary(terminalreporter):
    """The skips counted by reason, one line each, so that a run says what it did not test and why."""
    counts = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        counts[reason] = counts.get(reason, 0) + 1
    if counts:
        terminalreporter.write_sep("-", f"{sum(counts.values())} skipped, by reason")
        for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            terminalreporter.write_line(f"{n:5d}  {reason}")
