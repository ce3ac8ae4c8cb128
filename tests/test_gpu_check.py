"""benchmarks/gpu_check.sh where it can be checked without a GPU: its answer to a machine with
none (one line, exit 3, in the log too), its answers to bad options (one line naming the
option, exit 2, nothing written), its refusal to overwrite a previous run, and the counting of
pytest's JUnit XML that its stage 1 records."""
import json
import os
import subprocess
import sys

import pytest

from conftest import CUDA_SKIP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def run(*args, out):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CUDA_SKIP is None, reason="CuPy sees a GPU here: the no-GPU answer cannot be checked")
def test_without_a_gpu_one_line_and_exit_3(tmp_path):
    res = run(out=tmp_path / "out")
    lines = (res.stdout + res.stderr).splitlines()
    assert res.returncode == 3
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU (") and lines[0].endswith(")")
    assert (tmp_path / "out" / "gpu_check.log").read_text().splitlines() == lines
    assert not (tmp_path / "out" / "gpu_check.json").exists()          # no stage ran


@pytest.mark.parametrize("args, names", [
    (["--stages", "6"], "--stages 6"), (["--stages", "1,,2"], "--stages 1,,2"), (["--stages"], "--stages"),
    (["--budget", "30"], "--budget 30"), (["--budget", "1e3"], "--budget 1e3"), (["--device", "tpu"], "--device tpu"),
    (["--device", "cpu"], "--device cpu"), (["--bogus"], "--bogus")])
def test_bad_option_one_line_exit_2_nothing_written(tmp_path, args, names):
    res = run(*args, out=tmp_path / "out")
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and names in res.stderr
    assert not (tmp_path / "out").exists()


def test_previous_run_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_check.json").write_text("{}")
    res = run(out=out)
    assert res.returncode == 2 and "--force" in res.stderr
    assert (out / "gpu_check.json").read_text() == "{}"


def test_junit_counts_by_outcome_and_cuda_id(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from gpu_check_tests import junit_counts
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_x[cpu]"/>'
        '<testcase classname="tests.test_a" name="test_x[cuda]"><failure message="assert 1 == 2">tb</failure>'
        '</testcase>'
        '<testcase classname="tests.test_b" name="test_y[cuda]"><skipped message="CuPy sees no GPU"/></testcase>'
        '<testcase classname="tests.test_b" name="test_z"><skipped message="CuPy sees no GPU"/></testcase>'
        '<testcase classname="tests.test_c" name="test_w"><error message="fixture broke&#10;more">tb</error>'
        '</testcase>'
        '</testsuite></testsuites>')
    c = junit_counts(str(xml))
    assert c["all"] == {"tests": 5, "passed": 1, "failed": 1, "errors": 1, "skipped": 2}
    assert c["cuda"] == {"tests": 2, "passed": 0, "failed": 1, "errors": 0, "skipped": 1}
    assert c["skip_reasons"] == {"CuPy sees no GPU": 2}
    assert c["failures"] == [
        {"test": "tests.test_a::test_x[cuda]", "outcome": "failed", "message": "assert 1 == 2"},
        {"test": "tests.test_c::test_w", "outcome": "errors", "message": "fixture broke"}]


def test_summary_lists_parts_that_need_a_gpu_apart_from_failures(tmp_path):
    """A part recorded as needing a GPU (the PyTorch sides on the CuPy stand-in) is printed as
    NEEDS-GPU and does not fail the run; a failed check still does."""
    out = tmp_path / "out"
    out.mkdir()
    stage = {"name": "training step vs PyTorch", "checks": [
        {"name": "train_step.py finished", "passed": True, "value": "exit code 0", "tolerance": "exit code 0"}],
        "needs_gpu": [{"name": "the PyTorch side", "reason": "no GPU here"}]}
    (out / "gpu_check.json").write_text(json.dumps({"stages": {"3": stage}}))
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "summary", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "  NEEDS-GPU the PyTorch side: no GPU here" in res.stdout.splitlines()
    assert "all checks passed; 1 NEEDS-GPU, not run" in res.stdout and "FAIL" not in res.stdout
    stage["checks"][0]["passed"] = False
    (out / "gpu_check.json").write_text(json.dumps({"stages": {"3": stage}}))
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "NOT all passed" in res.stdout
