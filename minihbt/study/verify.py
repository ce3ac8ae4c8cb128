"""Re-run one finished run from nothing and compare it with its stored result (study.py --verify).

The run is trained and evaluated again, with the settings its JSON records, in a scratch
directory (runs/study/.verify/), and every figure of both evaluations (plain and centred),
the per-query ranks and the loss curve are compared with the stored ones. Training is
deterministic (batches a pure function of the seed and epoch, dropout of the seed and step)
and so is the evaluation, so on the same machine kind and commit the figures agree to
the tolerance (1e-6; in practice exactly).
"""
import dataclasses
import os
import shutil

import numpy as np

from ..files import exclusive_lock
from ..parallel import blas_threads
from .config import SettingError
from .runner import RunError, execute


def numeric_leaves(obj, prefix=""):
    """{"a.b.c": number} for every int/float leaf of nested dicts and lists (booleans excluded)."""
    if isinstance(obj, dict):
        children = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in obj.items()]
    elif isinstance(obj, list):
        children = [(f"{prefix}[{i}]", v) for i, v in enumerate(obj)]
    else:
        return {prefix: float(obj)} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}
    return {name: x for path, child in children for name, x in numeric_leaves(child, path).items()}


def compare(saved, again, saved_npz, again_npz):
    """{"figures": n, "max_difference", "worst", "missing", "ranks_identical", "loss_max_difference"}."""
    a, b = numeric_leaves(saved["results"]), numeric_leaves(again["results"])
    missing = sorted(set(a) ^ set(b))
    diffs = {k: abs(a[k] - b[k]) for k in set(a) & set(b)}
    worst = max(diffs, key=diffs.get) if diffs else None
    with np.load(saved_npz) as x, np.load(again_npz) as y:
        ranks_identical = set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)
    loss_a = (saved.get("loss_curve") or {}).get("loss", [])
    loss_b = (again.get("loss_curve") or {}).get("loss", [])
    loss_diff = (max(abs(p - q) for p, q in zip(loss_a, loss_b)) if loss_a and len(loss_a) == len(loss_b)
                 else (0.0 if not loss_a and not loss_b else float("inf")))
    return {"figures": len(diffs), "max_difference": diffs[worst] if worst else 0.0, "worst": worst,
            "missing": missing, "ranks_identical": ranks_identical, "loss_max_difference": loss_diff,
            "by_metric": by_metric(diffs)}


def by_metric(diffs):
    """{metric: (largest |difference|, the figure)} over the figures of each metric (the last
    part of a figure's name: map, r@1, rank_distance, ...), largest first."""
    out = {}
    for name, d in diffs.items():
        metric = name.rsplit(".", 1)[-1]
        if metric not in out or d > out[metric][0]:
            out[metric] = (d, name)
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def verify(ctx, run, tolerance=1e-6):
    """Re-run `run` in a scratch directory; returns (ok, comparison dict, stored record)."""
    study = ctx.study
    saved = study.read_result(run)
    scratch_root = os.path.join(study.runs_root, ".verify")
    scratch = dataclasses.replace(study, runs_root=scratch_root, results_root=os.path.join(scratch_root, "results"))
    with exclusive_lock(scratch.lock_path(run)) as mine:
        if not mine:
            raise RunError(f"--verify {run.id}: another process is verifying this run now; wait for it to end")
        if os.path.isdir(scratch.run_dir(run)):
            shutil.rmtree(scratch.run_dir(run))              # an earlier check's leftovers: ours to remove
        again = execute(dataclasses.replace(ctx, study=scratch), run)
        result = compare(saved, again, study.result_path(run, ".npz"), scratch.result_path(run, ".npz"))
        if not ctx.keep_models:
            shutil.rmtree(scratch.run_dir(run), ignore_errors=True)
            for ext in (".json", ".npz"):
                if os.path.exists(scratch.result_path(run, ext)):
                    os.remove(scratch.result_path(run, ext))
    ok = (not result["missing"] and result["max_difference"] <= tolerance and result["ranks_identical"]
          and result["loss_max_difference"] <= tolerance)
    return ok, result, saved


def check_same_blas_threads(study, run, flag_value):
    """A run made before minihbt's results stopped depending on the thread count reproduces bit
    for bit only on as many BLAS threads as it was made with (else SettingError)."""
    record = study.read_result(run)
    if (record.get("minihbt") or {}).get("same_bits_any_threads"):
        return                                        # made by code whose results do not depend on it
    made = (record.get("machine") or {}).get("blas") or {}
    if made.get("threads") and made["threads"] != blas_threads():
        raise SettingError(f"--verify {flag_value}: the run was made with {made['threads']} BLAS thread(s), this "
                           f"process has {blas_threads()} (float32 sums round differently); run it as "
                           f"OPENBLAS_NUM_THREADS={made['threads']} python study.py ...")
