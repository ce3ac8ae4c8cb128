"""The README's test command ends with the skips counted by reason (conftest.pytest_terminal_summary)."""
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_skips_are_counted_by_reason(tmp_path):
    (tmp_path / "test_some_skips.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(3))\n"
        "def test_a(i):\n    pytest.skip('torch is not installed')\n"
        "def test_b():\n    pytest.skip('no MPI here')\n"
        "@pytest.mark.skipif(True, reason='no MPI here')\n"
        "def test_c():\n    pass\n"
        "def test_d():\n    assert True\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": TESTS}).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "5 skipped, by reason" in line)
    assert lines[start + 1:start + 3] == ["    3  torch is not installed", "    2  no MPI here"]
    assert "1 passed, 5 skipped" in out
