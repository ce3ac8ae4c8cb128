"""The report's figures (PNG): metrics per condition with their intervals, mean loss curves.

matplotlib is optional, as for evaluate.py's heatmap: without it the figures are skipped
and the report says so.
"""
import numpy as np

try:                                   # optional: without it the report has no figures
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None


def metrics_figure(path, title, rows):
    """rows: {column: {metric: (mean, half-width, n)}}; left panel Mo./Cr./Mul. mAP, right
    panel the bias, each bar with its 95% t-interval whisker (none where n = 1)."""
    if plt is None:
        return False
    names = list(rows)
    conditions = list(dict.fromkeys(n.split("+")[0] for n in names))    # one colour per condition
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1.4]})
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        style = dict(color=f"C{conditions.index(name.split('+')[0])}", hatch="//" if "+" in name else None,
                     edgecolor="white" if "+" in name else None, capsize=3)
        means = [rows[name][m][0] for m in ("mo_map", "cr_map", "mul_map")]
        halves = [np.nan_to_num(rows[name][m][1]) for m in ("mo_map", "cr_map", "mul_map")]
        left.bar(np.arange(3) + k * width, means, width, yerr=halves, label=name, **style)
        mean, half, _ = rows[name]["bias"]
        right.bar(k, mean, 0.8, yerr=np.nan_to_num(half), **style)
    left.set_xticks(np.arange(3) + width * (len(names) - 1) / 2, ["Mo. mAP", "Cr. mAP", "Mul. mAP"])
    left.set_ylim(0, 1.05)
    left.legend(fontsize=7, ncol=2)
    left.set_title(title + ": mAP (95% t-interval over seeds)", fontsize=9)
    right.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    right.set_title("bias (mean rank distance, lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def loss_figure(path, title, curves, window=10):
    """curves: {condition: [per-seed loss lists]}; the mean over seeds, smoothed by a trailing
    moving average of `window` steps (the raw mean faint behind it)."""
    if plt is None or not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, seeds in curves.items():
        length = min(len(s) for s in seeds)
        mean = np.mean([s[:length] for s in seeds], axis=0)
        smooth = np.array([mean[max(0, i - window + 1):i + 1].mean() for i in range(length)])
        steps = np.arange(1, length + 1)
        line, = ax.plot(steps, smooth, label=f"{name} (n={len(seeds)})")
        ax.plot(steps, mean, color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean over seeds, {window}-step average)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
