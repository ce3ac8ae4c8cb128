"""REPORT.md of a study, written from its result files alone (each run's JSON and .npz).

Per direction: the metrics of every condition (mean ± 95% Student-t half-width over
seeds), the configured differences with paired-bootstrap intervals, seen vs unseen
languages, per-language Mul. mAP and bias, a verdict for each claim of the paper, figures
and the cost. A partial grid is reported as far as it goes, and the missing runs are listed.
"""
import os

from ..files import write_text
from . import figures, paper
from .data import DirectionBootstrap, StudyResults, column, split_column
from .perquery import METRICS, VARIANTS, macro_value
from .progress import human
from .verdicts import fmt_difference, fmt_value, verdicts

TABLE_METRICS = ("mo_map", "mo_r1", "cr_map", "cr_r1", "mul_map", "mul_r10", "bias")
SEED_METRICS = ("mo_map", "cr_map", "mul_map", "bias")


def fmt_summary(metric, mean, half, n):
    """'.631 ± .012' ('.631' for a single run; bias to one decimal)."""
    return fmt_value(metric, mean) + (f" ± {fmt_value(metric, half)}" if n >= 2 else "")


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def header_lines(study, results, command):
    commits = sorted({(r["minihbt"].get("commit") or "unknown")[:10] + (" (dirty)" if r["minihbt"].get("dirty") else "")
                      for r in results.records.values()})
    recipe = ", ".join(f"{k} {v}" for k, v in study.recipe.items())
    conditions = ", ".join(f"{c} ({'not trained' if s is None else ', '.join(f'{k} {v}' for k, v in s.items())})"
                           for c, s in study.conditions.items())
    lines = [f"# Study {study.name}", ""] + ([study.description, ""] if study.description else []) + [
             f"Written by `{command}` from the result files in `{study.display(study.results_dir)}/` alone: "
             f"{len(results.records)} of {len(study.runs())} planned runs.", "",
             f"- model: `{study.display(study.model)}`; conditions: {conditions}; seeds: {study.seeds}",
             f"- recipe (every trained run): {recipe}",
             f"- evaluation: {', '.join(f'{k} {v}' for k, v in study.evaluation.items())}; every run is evaluated "
             "twice on the same embeddings: plain, and centered (each language's mean query and candidate "
             "embedding subtracted, then re-normalised; `+centered` below)",
             f"- minihbt commit(s) of the runs: {', '.join(commits) or 'none yet'}; BLAS: {blas_summary(results)}",
             "- intervals: `± h` is the half-width of the 95% Student-t interval of the mean over seeds (none "
             "for a single run); `[low, high]` is the 95% percentile interval of a paired bootstrap over the "
             f"parallel question ids ({study.report['bootstrap_resamples']} resamples, seed "
             f"{study.report['bootstrap_seed']}), seeds pooled (per-query values averaged over seeds), and, in the "
             "second differences table, the verdicts and the comparison with the paper, with each condition's "
             "runs resampled too; **bold**: the interval excludes 0", ""]
    if results.missing:
        lines += [f"**Missing runs ({len(results.missing)}):** " + ", ".join(r.id for r in results.missing), ""]
    else:
        lines += ["All planned runs are present.", ""]
    return lines


def blas_summary(results):
    """'openblas 0.3.31 (SkylakeX): 1 thread 6 runs, 2 threads 3 runs; not recorded 4 runs' (float32
    sums, hence a run's exact figures, depend on the BLAS build and its thread count)."""
    counts = {}
    for rec in results.records.values():
        blas = (rec.get("machine") or {}).get("blas")
        key = (f"{blas['library']} {blas['version']} ({blas['architecture']})", blas["threads"]) if blas else None
        counts[key] = counts.get(key, 0) + 1
    builds = sorted({k[0] for k in counts if k})
    parts = [f"{b}: " + ", ".join(f"{t} thread{'s' if t > 1 else ''} {n} run{'s' if n > 1 else ''}"
                                   for (bb, t), n in sorted((k, n) for k, n in counts.items() if k) if bb == b)
             for b in builds]
    if None in counts:
        parts.append(f"not recorded {counts[None]} run{'s' if counts[None] > 1 else ''} (made before run records "
                     "named it)")
    return "; ".join(parts) or "none yet"


def metrics_section(results, d):
    rows, plot_rows = [], {}
    for variant in VARIANTS:
        for c in results.conditions(d):
            summary = {m: results.summary(d, c, variant, m) for m in TABLE_METRICS}
            plot_rows[column(c, variant)] = summary
            n = summary["mo_map"][2]
            rows.append([column(c, variant), n] + [fmt_summary(m, *summary[m]) for m in TABLE_METRICS])
    lines = ["### Metrics (mean ± 95% t-interval over seeds)", ""]
    lines += _table(["condition", "n"] + [METRICS[m][0] for m in TABLE_METRICS], rows)
    return lines + [""], plot_rows


def _cell(metric, d):
    if d is None:
        return "–"
    text = fmt_difference(metric, d)
    return f"**{text}**" if d["low"] > 0 or d["high"] < 0 else text


def differences_section(study, boot):
    header = ["difference"] + [METRICS[m][0] for m in TABLE_METRICS]
    tables = []
    for interval in ("questions", "seeds"):
        tables.append(_table(header, [[f"{a} − {b}"] + [_cell(m, boot.difference(a, b, m, interval=interval))
                                                         for m in TABLE_METRICS]
                                      for a, b in study.report["comparisons"]]))
    return (["### Differences (paired bootstrap over questions, 95% interval)", "",
             "Each question's value is first averaged over the seeds, then the questions are resampled: the "
             "interval is the uncertainty from which questions were asked, for the seed-averaged models. It "
             "does not see training noise.", ""] + tables[0] +
            ["", "The same differences with the training seeds resampled too: in each of the same question "
             "resamples, each condition's runs are drawn with replacement (as many draws as it has runs). The interval then also "
             "covers which seeds were trained; with three seeds the bootstrap sees only a coarse picture of that "
             "spread (and understates it somewhat), so these are the intervals the verdicts use, not a final word.",
             ""] + tables[1] + [""])


def seed_values(results, d, name, metric):
    """{seed: macro figure} of a column's runs (seed None for an untrained condition)."""
    condition, variant = split_column(name)
    return {run.seed: macro_value(rec["results"][variant], metric) for run, rec in results.runs(d, condition)}


def seeds_section(study, results, d):
    """Each configured difference seed by seed (same seed number; an untrained column's one
    run against every seed), with how many seeds fall on the difference's side of 0."""
    rows = []
    for a, b in study.report["comparisons"]:
        cells = []
        for m in SEED_METRICS:
            va, vb = seed_values(results, d, a, m), seed_values(results, d, b, m)
            pairs = [(va[s], vb[s if s in vb else None]) for s in sorted(va, key=str) if s in vb or None in vb]
            if not pairs:
                cells.append("–")
                continue
            diffs = [x - y for x, y in pairs]
            side = sum(x > 0 for x in diffs) if sum(diffs) > 0 else sum(x < 0 for x in diffs)
            cells.append(" ".join(fmt_value(m, x, "+") for x in diffs) + f" ({side}/{len(diffs)})")
        rows.append([f"{a} − {b}"] + cells)
    lines = ["### Differences seed by seed", "",
             "The same differences for each seed on its own (seed 0, 1, 2 of one condition minus the same seed "
             "of the other; the untrained base against every seed), and in brackets how many seeds lie on the "
             "side of 0 of their mean: training noise, which the bootstrap above does not see.", ""]
    return lines + _table(["difference"] + [METRICS[m][0] for m in SEED_METRICS], rows) + [""]


def languages_section(study, results, boot, d):
    record = results.runs(d)[0][1]
    seen, unseen = record["seen"], record["unseen"]
    lines = ["### Seen and unseen languages", "",
             f"Seen in training: {', '.join(seen) or 'none'}; unseen: {', '.join(unseen) or 'none'}.", ""]
    if unseen:
        rows = [[f"{a} − {b}", subset] + [_cell(m, boot.difference(a, b, m, subset)) for m in ("cr_map", "mul_map",
                                                                                               "bias")]
                for a, b in study.report["comparisons"] for subset in ("seen", "unseen")]
        lines += ["Differences over the seen / unseen languages (Cr.: pairs of seen languages / pairs with an "
                  "unseen language; Mul. and bias: queries of those languages):", ""]
        lines += _table(["difference", "languages", "Cr. mAP", "Mul. mAP", "bias"], rows) + [""]
    cols = [(c, v) for v in VARIANTS for c in results.conditions(d)]
    for metric in ("mul_map", "bias"):
        per = {(c, v): results.unit_means(d, c, v, metric) for c, v in cols}
        rows = [[lang, "seen" if lang in seen else "unseen"] + [fmt_value(metric, per[cv][lang]) for cv in cols]
                for lang in record["eval_languages"]]
        for subset, langs in (("seen", seen), ("unseen", unseen)):
            if langs and len(langs) < len(record["eval_languages"]):
                rows.append([f"mean, {subset}", ""] + [fmt_value(metric, sum(per[cv][l] for l in langs) / len(langs))
                                                       for cv in cols])
        lines += [f"{METRICS[metric][0]} per query language (mean over seeds):", ""]
        lines += _table(["language", ""] + [column(c, v) for c, v in cols], rows) + [""]
    return lines


def verdicts_section(boot, has_unseen):
    lines = ["### Verdicts on the paper's claims", "",
             "holds: the 95% interval (questions and seeds resampled) of every difference lies on the claimed "
             "side of 0; refuted: one lies on the other side; not separable: an interval covers 0.", ""]
    return lines + _table(["claim", "verdict", "numbers"], verdicts(boot, has_unseen)) + [""]


def paper_section(study, boot, d):
    """The paper's differences between batch types beside this direction's (when it evaluates
    on a set the paper reports: xquad-r, mlqa-r)."""
    figures_by_init = paper.figures_for(study.directions[d].eval)
    if figures_by_init is None:
        return []
    rows = []
    for a, b in paper.DIFFERENCES:
        rows += [[f"{a} − {b}", f"paper, {init}"] + [fmt_value(m, paper.paper_difference(f, a, b, m), "+")
                                                     for m in paper.SETTINGS]
                 for init, f in figures_by_init.items()]
        rows.append([f"{a} − {b}", "this study"] + [_cell(m, boot.difference(a, b, m, interval="seeds"))
                                                     for m in paper.SETTINGS])
    lines = ["### Beside the paper", "",
             f"The differences between batch types in the {paper.PAPER} on the same evaluation set, beside this "
             "study's (mean over seeds; interval with questions and seeds resampled). The paper's models and training data differ from this "
             "study's, so only the signs and sizes of the differences compare, not the levels.", ""]
    return lines + _table(["difference", "source"] + [METRICS[m][0] for m in paper.SETTINGS], rows) + [""]


def figures_section(study, results, d, plot_rows):
    out_dir = study.results_dir
    metrics_png, loss_png = f"metrics-{d}.png", f"loss-{d}.png"
    curves = {c: [rec["loss_curve"]["loss"] for _, rec in results.runs(d, c) if rec.get("loss_curve")]
              for c in results.conditions(d)}
    curves = {c: v for c, v in curves.items() if v}
    made = figures.metrics_figure(os.path.join(out_dir, metrics_png), f"direction {d}", plot_rows)
    if not made:
        return ["### Figures", "", "Figures skipped: matplotlib is not installed (`pip install matplotlib`).", ""]
    lines = ["### Figures", "", f"![metrics, direction {d}]({metrics_png})", ""]
    if figures.loss_figure(os.path.join(out_dir, loss_png), f"direction {d}: training loss", curves):
        lines += [f"![training loss, direction {d}]({loss_png})", ""]
    return lines


def cost_section(results, d):
    rows, total = [], 0.0
    for c in results.conditions(d):
        recs = [rec for _, rec in results.runs(d, c)]
        train = [rec["seconds"].get("train", 0.0) for rec in recs]
        evaluate = [rec["seconds"]["evaluate"] for rec in recs]
        total += sum(train) + sum(evaluate)
        threads = sorted({str(((rec.get("machine") or {}).get("blas") or {}).get("threads", "?")) for rec in recs})
        rows.append([c, len(recs), "/".join(threads), human(sum(train) / len(recs)), human(sum(evaluate) / len(recs))])
    machines = sorted({f"{rec['machine']['cpu']} ({rec['machine']['cpus']} CPUs, {rec['device']})"
                       for _, rec in results.runs(d)})
    lines = ["### Cost", "", f"Machine(s): {'; '.join(machines)}.", ""]
    lines += _table(["condition", "runs", "BLAS threads", "training, per run", "evaluation (both variants), per run"],
                    rows)
    return lines + ["", f"Wall time of the runs present: {human(total)} (training wall time summed over the "
                        "sessions a run took; evaluation: encoding once, ranking and metrics twice).", ""]


def direction_section(study, results, d):
    direction = study.directions[d]
    lines = [f"## Direction {d}" + (f": {direction.about}" if direction.about else ""), ""]
    if not results.runs(d):
        return lines + ["No runs yet.", ""]
    record = results.runs(d)[0][1]
    lines += ["Trained on " + ", ".join(f"`{study.display(p)}`" for p in direction.train) +
              f" ({', '.join(record['train_languages'])}); evaluated on `{study.display(direction.eval)}` "
              f"({', '.join(record['eval_languages'])}).", ""]
    boot = DirectionBootstrap(results, d, study.report["bootstrap_resamples"], study.report["bootstrap_seed"])
    metrics, plot_rows = metrics_section(results, d)
    return (lines + metrics + differences_section(study, boot) + seeds_section(study, results, d)
            + languages_section(study, results, boot, d) + verdicts_section(boot, bool(record["unseen"]))
            + paper_section(study, boot, d) + figures_section(study, results, d, plot_rows)
            + cost_section(results, d))


def write_report(study, command="python study.py --report"):
    """Write REPORT.md (and the figures) into the study's results directory; returns its path."""
    results = StudyResults(study)
    os.makedirs(study.results_dir, exist_ok=True)
    lines = header_lines(study, results, command)
    for d in study.directions:
        lines += direction_section(study, results, d)
    path = os.path.join(study.results_dir, "REPORT.md")
    write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
