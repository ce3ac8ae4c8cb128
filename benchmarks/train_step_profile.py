"""Where one minihbt training step spends its time: a cProfile of the step, grouped by operation.

Each function's own time (cProfile's tottime; NumPy's array operators count in the Python
function that applies them) goes to the innermost minihbt function on its call path whose
name names an operation (`RULES`, matched on the function's name, or on its file for the
optimiser and dropout); a helper or library function that names none (a thread-pool wrapper, erf, a
NumPy routine) passes its time to its callers in proportion to the time each spent in it
(gprof's rule, as cProfile keeps caller-callee pairs, not whole stacks). What reaches no
named function is "other". Only the main thread is profiled: time it spends waiting for
worker threads counts where it waits, so threaded passes are charged to their operation.
The names are patterns, not a list of today's functions, so renamed or new internals still
land in the right group as long as their names say what they do.
"""
import os
import re

GROUPS = ("linear", "attention", "softmax", "GELU", "dropout", "LayerNorm", "embedding", "loss", "optimizer",
          "other")
LABELS = {"linear": "linear (matmul) fwd+bwd", "attention": "attention (QK^T, PV, heads)", "softmax": "softmax",
          "GELU": "GELU", "dropout": "dropout", "LayerNorm": "LayerNorm (+ residual add)",
          "embedding": "embedding", "loss": "pooling + L2 + InfoNCE", "optimizer": "optimizer (clip + AdamW)",
          "other": "other"}
# (group, pattern on the function's name), tried in order: softmax before attention, so the
# softmax inside attention is its own group.
RULES = [(g, re.compile(p, re.IGNORECASE)) for g, p in (
    ("softmax", r"softmax"),
    ("attention", r"attention|attn|mask_bias"),
    ("GELU", r"gelu"),
    ("dropout", r"dropout|keep_mask|hash_uniform|fmix|text_key"),
    ("LayerNorm", r"layer_?norm"),
    ("linear", r"linear|dense"),
    ("embedding", r"embedding|position_ids"),
    ("loss", r"info_nce|contrastive|candidate_mask|l2_normali[sz]e|mean_pool|cls_pool|"
             r"^pool$|^pool_(for|back)ward$"),
    ("optimizer", r"adamw|clip_grad|grad_norm|sum_of_squares"))]
FILE_RULES = [(g, re.compile(p)) for g, p in (("optimizer", r"^rowgrad\.py$"), ("dropout", r"^dropout\.py$"))]


def classify(func, package_dir):
    """The group of a pstats function key (file, line, name) if it is a minihbt function that names one."""
    path, _, name = func
    if not os.path.abspath(path).startswith(package_dir + os.sep):
        return None
    for group, pattern in RULES:
        if pattern.search(name):
            return group
    for group, pattern in FILE_RULES:
        if pattern.search(os.path.basename(path)):
            return group
    return None


def label(func):
    path, line, name = func
    return name if path == "~" else f"{os.path.basename(path)}:{line}({name})"


def _share(func, entries, package_dir, memo, visiting):
    """{group: fraction} of `func`'s own time: its group, else its callers' shares weighted by edge time."""
    if func in memo:
        return memo[func]
    group = classify(func, package_dir)
    if group:
        memo[func] = {group: 1.0}
        return memo[func]
    callers = {c: edge[3] for c, edge in entries.get(func, (0, 0, 0, 0, {}))[4].items() if c not in visiting}
    if not callers:
        share = {"other": 1.0}
    else:
        total = sum(callers.values())
        weights = {c: (w / total if total > 0 else 1.0 / len(callers)) for c, w in callers.items()}
        share = {}
        for caller, weight in weights.items():
            for g, x in _share(caller, entries, package_dir, memo, visiting | {func}).items():
                share[g] = share.get(g, 0.0) + weight * x
    memo[func] = share
    return share


def group_profile(stats, package_file, top=15):
    """Seconds per group, the `top` functions by own time and the largest parts of "other", from pstats.Stats."""
    package_dir = os.path.dirname(os.path.abspath(package_file))
    entries, memo = stats.stats, {}
    groups = dict.fromkeys(GROUPS, 0.0)
    rows, other = [], []
    for func, (_, ncalls, own, _, _) in entries.items():
        share = _share(func, entries, package_dir, memo, frozenset())
        for g, x in share.items():
            groups[g] += own * x
        main = max(share, key=share.get)
        rows.append((own, label(func), ncalls, main))
        if share.get("other", 0.0) * own > 0:
            other.append((share["other"] * own, label(func)))
    rows.sort(reverse=True)
    other.sort(reverse=True)
    return {"total_seconds": sum(groups.values()), "groups": groups,
            "top": [{"function": f, "own_seconds": s, "calls": n, "group": g} for s, f, n, g in rows[:top]],
            "other_top": [{"function": f, "seconds": s} for s, f in other[:5]]}


def format_profile(result, about):
    """The printed report of one `group_profile` result (with `plain_seconds`, the step timed without cProfile)."""
    total = result["total_seconds"]
    lines = [f"profile of one minihbt step, {about}: {total:.2f} s under cProfile "
             f"({result['plain_seconds']:.2f} s for the same step without it)",
             f"  {'group':30s}{'share':>8s}{'seconds':>10s}"]
    for g in GROUPS:
        s = result["groups"][g]
        lines.append(f"  {LABELS[g]:30s}{s / total:8.1%}{s:10.2f}")
    lines.append("  largest parts of other: " + (", ".join(f"{o['function']} {o['seconds']:.2f} s"
                                                           for o in result["other_top"]) or "none"))
    lines.append(f"  top {len(result['top'])} functions by own time (group: where most of it went):")
    for r in result["top"]:
        lines.append(f"    {r['own_seconds']:8.3f} s {r['calls']:7d} calls  {r['group']:10s} {r['function']}")
    lines.append("  (own time goes to the innermost minihbt function on its call path whose name names a group; "
                 "helpers and NumPy routines pass theirs to their callers in proportion to the time each spent in "
                 "them; only the main thread is profiled, so waiting for worker threads counts where it waits)")
    return "\n".join(lines)
