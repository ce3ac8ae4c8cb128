"""A study's results as the report sees them: the run JSONs and .npz files, nothing else.

Means over seeds come with Student-t intervals (minihbt/stats.py); differences between
conditions with a paired bootstrap over the parallel question ids, seeds pooled: each
condition's per-query value is its mean over the seeds present, and every condition is
measured on the same resamples of question ids. A column is a condition under one variant:
"hybrid" (plain) or "hybrid+centered" (per-language centring).
"""
import numpy as np

from .. import stats
from .config import CENTERED
from .perquery import VARIANTS, RankFile, macro_value, unit_values


class ReportError(Exception):
    """The result files cannot be combined (e.g. runs of one direction on different data)."""


def column(condition, variant):
    return condition + (CENTERED if variant == "centered" else "")


def split_column(name):
    return (name[:-len(CENTERED)], "centered") if name.endswith(CENTERED) else (name, "plain")


class StudyResults:
    """The finished runs of a study (JSON + .npz present) and the missing ones."""

    def __init__(self, study):
        self.study, self.records, self.missing = study, {}, []
        for run in study.runs():
            if study.is_finished(run):
                try:
                    self.records[run] = study.read_result(run)
                except (OSError, ValueError) as e:
                    raise ReportError(f"{study.result_path(run)}: not a readable result ({e})") from None
            else:
                self.missing.append(run)

    def runs(self, direction, condition=None):
        """[(run, record)] of a direction (and condition), in plan order."""
        return [(r, rec) for r, rec in self.records.items()
                if r.direction == direction and (condition is None or r.condition == condition)]

    def conditions(self, direction):
        return [c for c in self.study.conditions if self.runs(direction, c)]

    def summary(self, direction, condition, variant, metric):
        """(mean, 95% t half-width, n) of a macro figure over the condition's seeds."""
        values = [macro_value(rec["results"][variant], metric) for _, rec in self.runs(direction, condition)]
        return (*stats.mean_ci(values), len(values))

    def unit_means(self, direction, condition, variant, metric):
        """{unit: mean over seeds} of a per-language (per-pair) figure."""
        per_seed = [unit_values(rec["results"][variant], metric) for _, rec in self.runs(direction, condition)]
        return {u: float(np.mean([p[u] for p in per_seed])) for u in per_seed[0]}


def unit_in(subset, unit, seen):
    """Whether a unit (language "x" or pair "x-y") belongs to a subset: "all"; "seen" (every
    language of the unit seen in training); "unseen" (some language of the unit unseen)."""
    langs = unit.split("-")
    if subset == "all":
        return True
    return all(l in seen for l in langs) if subset == "seen" else any(l not in seen for l in langs)


class DirectionBootstrap:
    """Paired bootstrap differences for one direction, every (condition, variant) a column.

    Two intervals per difference, both from the same question resamples: `questions` (the
    seeds' per-query values averaged, then the questions resampled: which questions were
    asked) and `seeds` (in each resample each condition's runs are also drawn with
    replacement: which questions, and which training seeds). A condition's macro figure is
    linear in its runs' per-query values, so each run's figure is resampled once and the
    seed draws only reweight them."""

    def __init__(self, results, direction, resamples, seed):
        self.columns = [column(c, v) for c in results.conditions(direction) for v in VARIANTS]
        self.files = {c: [RankFile(results.study.result_path(r, ".npz")) for r, _ in results.runs(direction, c)]
                      for c in results.conditions(direction)}
        first = next(iter(self.files.values()))[0]
        for c, files in self.files.items():
            if any(f.qids != first.qids for f in files):
                raise ReportError(f"direction {direction}: the runs of {c} were evaluated on other questions")
        self.n_items = len(first.qids)
        self.seen = set(results.runs(direction)[0][1]["seen"])
        self.seeds = [len(self.files[split_column(name)[0]]) for name in self.columns]
        self.counts = stats.resample_counts(self.n_items, resamples, seed)
        self.weights = {"questions": np.hstack([np.full(n, 1.0 / n) for n in self.seeds])[None, :],
                        "seeds": stats.seed_weights(self.seeds, resamples, [seed, 1])}
        self._cache = {}

    def _units(self, metric, subset):
        """[(item_index, values [n_u, sum(seeds)])]: every run of every column, per unit."""
        per_column = {}
        for name in self.columns:
            condition, variant = split_column(name)
            per_column[name] = [f.units(variant, metric) for f in self.files[condition]]
        units = []
        for unit in sorted(per_column[self.columns[0]][0]):
            if not unit_in(subset, unit, self.seen):
                continue
            index = per_column[self.columns[0]][0][unit][0]
            runs = [run[unit][1] for name in self.columns for run in per_column[name]]
            units.append((index, np.stack(runs, axis=1)))
        return units

    def difference(self, a, b, metric, subset="all", interval="questions"):
        """{"difference", "low", "high"} of column a minus column b (interval: "questions" or
        "seeds", see the class), or None if either is absent."""
        if a not in self.columns or b not in self.columns:
            return None
        key = (metric, subset)
        if key not in self._cache:
            units = self._units(metric, subset)
            if not units:
                return None
            observed = stats.resampled_macro(np.ones((1, self.n_items)), units)             # [1, runs]
            self._cache[key] = (observed, stats.resampled_macro(self.counts, units))       # [B, runs]
        observed, per_run = self._cache[key]
        observed = stats.combine_seeds(observed, self.weights["questions"], self.seeds)[0]
        samples = stats.combine_seeds(per_run, self.weights[interval], self.seeds)
        i, j = self.columns.index(a), self.columns.index(b)
        low, high = stats.percentile_interval(samples[:, i] - samples[:, j])
        return {"difference": float(observed[i] - observed[j]), "low": low, "high": high}
