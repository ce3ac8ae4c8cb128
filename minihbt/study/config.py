"""The study config (e.g. study/hbt-me5-small.json): what is trained on what, how, and evaluated where.

    {"name": "hbt-me5-small",                       # results/study/<name>/, runs/study/<name>/
     "model": "weights/multilingual-e5-small",       # paths relative to the repository root
     "model_how": "python ../shared/tools/build_me5_small.py weights/multilingual-e5-small",
     "data_root": "../shared/data",                  # direction paths are relative to it
     "directions": {"A": {"train": ["mlqa-r"], "eval": "xquad-r", "about": "..."}, ...},
     "conditions": {"base": null, "xx": {"sampler": "xx"}, "hybrid": {"sampler": "hybrid", "alpha": 0.5}, ...},
     "seeds": [0, 1, 2],                             # for every trained condition; `null` = not trained
     "recipe": {"batch_size": 32, "steps": 150, ...},   # train.py settings shared by all runs
     "evaluation": {"batch_size": 64, "max_length": 512, "candidates": "sentence"},
     "report": {"bootstrap_resamples": 2000, "bootstrap_seed": 0, "comparisons": [["hybrid", "xx"], ...]}}

Every key is checked (type, range, combination) before anything is loaded; a bad one is a
SettingError naming it and what is accepted. A run is (direction, condition, seed); its id
is "A/xy-seed1" ("A/base" for an untrained condition).
"""
import json
import math
import os
import re
from dataclasses import dataclass

from ..cli import flag_of
from ..data import language_from_filename


class SettingError(ValueError):
    """A study setting (config key or command-line flag) is invalid; the message names it."""


# train.py settings a study may set, with what each accepts: (kind, argument)
TRAIN_SETTINGS = {
    "sampler": ("choice", ("xx", "xy", "hybrid")), "alpha": ("fraction", None),
    "xx_weighting": ("choice", ("uniform", "proportional")), "batch_size": ("int", 1), "max_negatives": ("int", 0),
    "lr": ("positive", None), "weight_decay": ("non-negative", None), "warmup": ("int", 0),
    "schedule": ("choice", ("constant", "linear")), "decay_steps": ("int", 1), "steps": ("int", 1),
    "max_query_len": ("int", 2), "max_passage_len": ("int", 2), "temperature": ("positive", None),
    "candidates": ("choice", ("inbatch", "paper")), "symmetric": ("bool", None),
    "max_grad_norm": ("non-negative", None),
    "grad_cache_chunk": ("int", 0), "pooling": ("choice", ("mean", "cls", "pooler")), "save_every": ("int", 0),
}
EVALUATION_SETTINGS = {"batch_size": ("int", 1), "max_length": ("int", 2),
                       "candidates": ("choice", ("sentence", "pair"))}
REPORT_SETTINGS = {"bootstrap_resamples": ("int", 1000), "bootstrap_seed": ("int", 0), "comparisons": ("list", None)}
TOP_KEYS = {"name", "description", "model", "model_how", "data_root", "directions", "conditions", "seeds", "recipe",
            "evaluation", "report"}
CENTERED = "+centered"


def check_value(where, kind, arg, value):
    """Return `value` if it is of `kind` (see TRAIN_SETTINGS), else raise SettingError naming `where`."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "int":
        ok, accepted = isinstance(value, int) and not isinstance(value, bool) and value >= arg, f"an integer >= {arg}"
    elif kind == "positive":
        ok, accepted = number and value > 0, "a number > 0"
    elif kind == "non-negative":
        ok, accepted = number and value >= 0, "a number >= 0"
    elif kind == "fraction":
        ok, accepted = number and 0 <= value <= 1, "a number in [0, 1]"
    elif kind == "bool":
        ok, accepted = isinstance(value, bool), "true or false"
    elif kind == "choice":
        ok, accepted = isinstance(value, str) and value in arg, "one of " + ", ".join(arg)
    elif kind == "str":
        ok, accepted = isinstance(value, str) and value.strip() != "", "a non-empty string"
    else:
        ok, accepted = isinstance(value, list), "a list"
    if not ok:
        raise SettingError(f"{where}: expected {accepted}, got {json.dumps(value)}")
    return value


def check_section(where, section, schema, required=()):
    """Check a dict against {key: (kind, arg)}: unknown keys, missing required keys, values."""
    if not isinstance(section, dict):
        raise SettingError(f"{where}: expected an object, got {json.dumps(section)}")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise SettingError(f"{where}.{unknown[0]}: unknown key (accepted: {', '.join(sorted(schema))})")
    for key in required:
        if key not in section:
            raise SettingError(f"{where}.{key}: required")
    return {k: check_value(f"{where}.{k}", *schema[k], v) for k, v in section.items()}


@dataclass(frozen=True)
class Run:
    """One cell of the grid: a direction, a condition and (for trained conditions) a seed."""
    direction: str
    condition: str
    seed: object = None                     # int, or None for an untrained condition

    @property
    def stem(self):
        return self.condition if self.seed is None else f"{self.condition}-seed{self.seed}"

    @property
    def id(self):
        return f"{self.direction}/{self.stem}"


@dataclass
class Direction:
    name: str
    train: list                              # absolute paths of the training sources
    eval: str                                # absolute path of the LAReQA evaluation set
    about: str


@dataclass
class Study:
    path: str                                # the config file
    root: str                                # paths in the config are relative to it (the repository)
    name: str
    description: str
    model: str
    model_how: str
    data_root: str
    directions: dict                         # name -> Direction
    conditions: dict                         # name -> train settings of the condition, or None (untrained)
    seeds: list
    recipe: dict
    evaluation: dict
    report: dict
    results_root: str
    runs_root: str

    def runs(self):
        """The grid in the order it runs: per direction, the untrained conditions, then seed by
        seed every trained condition (so a partial grid has every condition early)."""
        plan = []
        for d in self.directions:
            plan += [Run(d, c) for c, s in self.conditions.items() if s is None]
            plan += [Run(d, c, seed) for seed in self.seeds for c, s in self.conditions.items() if s is not None]
        return plan

    def train_settings(self, run):
        """The train.py settings of a trained run (recipe, then the condition's own), seed excluded."""
        return {**self.recipe, **self.conditions[run.condition]}

    @property
    def results_dir(self):
        return os.path.join(self.results_root, self.name)

    def result_path(self, run, ext=".json"):
        return os.path.join(self.results_dir, run.direction, run.stem + ext)

    def is_finished(self, run):
        """A run is finished once its JSON and its .npz of per-query ranks are both there."""
        return os.path.exists(self.result_path(run)) and os.path.exists(self.result_path(run, ".npz"))

    def read_result(self, run):
        with open(self.result_path(run), encoding="utf-8") as f:
            return json.load(f)

    def run_dir(self, run):
        return os.path.join(self.runs_root, self.name, run.direction, run.stem)

    def lock_path(self, run):
        """The file a process locks while it works on `run` (several study processes share a grid)."""
        return self.run_dir(run) + ".lock"

    def display(self, path):
        """A path as a command line should show it: relative to the repository when it lies in
        or beside it (../shared), else absolute."""
        rel = os.path.relpath(os.path.abspath(path), self.root)
        return os.path.abspath(path) if rel.startswith(os.path.join("..", "..")) else rel

    def train_values(self, run, out=None):
        """Everything a trained run gives train.py, in command-line order: the model, the training
        sources, train_settings, the seed and the run directory (`out`, default run_dir(run)). The
        run's TrainSettings (runner.train_settings) and its shown command (train_argv) both come from it."""
        return {"model": self.model, "train": list(self.directions[run.direction].train), **self.train_settings(run),
                "seed": run.seed, "out": out or self.run_dir(run)}

    def train_argv(self, run, out=None, display=False):
        """train.py's argv for a trained run: train_values as flags (paths shown relative to the
        repository if display)."""
        show = self.display if display else (lambda p: p)
        values = self.train_values(run, out)
        argv = ["--model", show(values.pop("model"))]
        for source in values.pop("train"):
            argv += ["--train", show(source)]
        values["out"] = show(values["out"])
        for key, value in values.items():
            if isinstance(value, bool):
                argv += [flag_of(key)] if value else []
            elif value is not None:
                argv += [flag_of(key), repr(value) if isinstance(value, float) else str(value)]
        return argv


def languages_in(path):
    """The languages of the {lang}.json files in a directory (or of one file), from their names."""
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [os.path.basename(path)]
    langs = {language_from_filename(n) for n in names if n.endswith(".json")}
    return sorted(l for l in langs if isinstance(l, str))


def _read_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise SettingError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SettingError(f"--config {path}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise SettingError(f"--config {path}: expected a JSON object")
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise SettingError(f"{path}: {unknown[0]}: unknown key (accepted: {', '.join(sorted(TOP_KEYS))})")
    for key in ("name", "model", "data_root", "directions", "conditions"):
        if key not in cfg:
            raise SettingError(f"{path}: {key}: required")
    return cfg


def _check_directions(where, directions, data_root):
    if not isinstance(directions, dict) or not directions:
        raise SettingError(f"{where}: expected a non-empty object of directions")
    out = {}
    for name, d in directions.items():
        at = f"{where}.{name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]*", name):
            raise SettingError(f"{at}: a direction name is letters, digits and _")
        d = check_section(at, d, {"train": ("list", None), "eval": ("str", None), "about": ("str", None)},
                          required=("train", "eval"))
        if not d["train"]:
            raise SettingError(f"{at}.train: expected at least one training source")
        train = [os.path.join(data_root, check_value(f"{at}.train[{i}]", "str", None, t))
                 for i, t in enumerate(d["train"])]
        out[name] = Direction(name, train, os.path.join(data_root, d["eval"]), d.get("about", ""))
    return out


def _check_conditions(where, conditions, recipe):
    if not isinstance(conditions, dict) or not conditions:
        raise SettingError(f"{where}: expected a non-empty object of conditions")
    out = {}
    for name, settings in conditions.items():
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise SettingError(f"{where}.{name}: a condition name is lower-case letters, digits and _")
        if settings is None:
            out[name] = None
            continue
        out[name] = check_section(f"{where}.{name}", settings, TRAIN_SETTINGS)
        merged = {**recipe, **out[name]}
        if "sampler" not in merged:
            raise SettingError(f"{where}.{name}.sampler: required (in the condition or the recipe)")
        if merged.get("decay_steps") is not None and merged.get("schedule") != "linear":
            raise SettingError(f"{where}.{name}: decay_steps needs schedule 'linear'")
    return out


def _check_comparisons(where, comparisons, conditions):
    names = set(conditions) | {c + CENTERED for c in conditions}
    for i, pair in enumerate(comparisons):
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in names for p in pair) and pair[0] != pair[1]):
            raise SettingError(f"{where}[{i}]: expected [A, B], two different conditions, each optionally "
                               f"with '{CENTERED}' (known: {', '.join(conditions)}), got {json.dumps(pair)}")
    return [tuple(p) for p in comparisons]


def load_study(path, root, model=None, data_root=None, results_root=None, runs_root=None):
    """Read and check the config at `path`; paths in it are taken relative to `root`, the
    keyword overrides (command-line flags) relative to the working directory."""
    cfg = _read_config(path)
    here = lambda p: os.path.abspath(os.path.join(root, p))                        # noqa: E731
    name = check_value(f"{path}: name", "str", None, cfg["name"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SettingError(f"{path}: name: letters, digits, '.', '_' and '-' only (it names directories)")
    data_root = os.path.abspath(data_root) if data_root else here(check_value(f"{path}: data_root", "str", None,
                                                                               cfg["data_root"]))
    recipe = check_section(f"{path}: recipe", cfg.get("recipe", {}), TRAIN_SETTINGS)
    conditions = _check_conditions(f"{path}: conditions", cfg["conditions"], recipe)
    seeds = cfg.get("seeds", [])
    if not isinstance(seeds, list) or len(set(map(str, seeds))) != len(seeds):
        raise SettingError(f"{path}: seeds: expected a list of distinct integers >= 0, got {json.dumps(seeds)}")
    seeds = [check_value(f"{path}: seeds[{i}]", "int", 0, s) for i, s in enumerate(seeds)]
    if not seeds and any(s is not None for s in conditions.values()):
        raise SettingError(f"{path}: seeds: trained conditions need at least one seed")
    evaluation = {"batch_size": 64, "max_length": 512, "candidates": "sentence",
                  **check_section(f"{path}: evaluation", cfg.get("evaluation", {}), EVALUATION_SETTINGS)}
    report = {"bootstrap_resamples": 2000, "bootstrap_seed": 0, "comparisons": [],
              **check_section(f"{path}: report", cfg.get("report", {}), REPORT_SETTINGS)}
    report["comparisons"] = _check_comparisons(f"{path}: report.comparisons", report["comparisons"], conditions)
    for key in ("description", "model_how"):
        if key in cfg:
            check_value(f"{path}: {key}", "str", None, cfg[key])
    model = os.path.abspath(model) if model else here(check_value(f"{path}: model", "str", None, cfg["model"]))
    return Study(path=os.path.abspath(path), root=os.path.abspath(root), name=name,
                 description=cfg.get("description", ""), model=model,
                 model_how=cfg.get("model_how", ""), data_root=data_root,
                 directions=_check_directions(f"{path}: directions", cfg["directions"], data_root),
                 conditions=conditions, seeds=seeds, recipe=recipe, evaluation=evaluation, report=report,
                 results_root=os.path.abspath(results_root or here(os.path.join("results", "study"))),
                 runs_root=os.path.abspath(runs_root or here(os.path.join("runs", "study"))))


def select_runs(study, only):
    """The runs picked by --only values (all runs when none). A value is a run id ("A/xy-seed1",
    "A/base") or key=value terms joined by commas (direction=A,condition=xy,seed=1), all of
    which must match; a run is kept if any value picks it."""
    plan = study.runs()
    if not only:
        return plan
    known = {"direction": set(study.directions), "condition": set(study.conditions), "seed": set(map(str, study.seeds))}
    picked = set()
    for value in only:
        if "=" not in value:
            ids = {r.id for r in plan}
            if value not in ids:
                raise SettingError(f"--only {value}: no such run (runs look like {plan[-1].id}, or use key=value)")
            picked.add(value)
            continue
        terms = {}
        for term in value.split(","):
            key, _, want = term.partition("=")
            if key not in known:
                raise SettingError(f"--only {value}: unknown key {key!r} (accepted: direction, condition, seed)")
            if want not in known[key]:
                raise SettingError(f"--only {value}: no {key} {want!r} (known: {', '.join(sorted(known[key]))})")
            terms[key] = want
        picked |= {r.id for r in plan if all(str(getattr(r, k)) == v for k, v in terms.items())}
    runs = [r for r in plan if r.id in picked]
    if not runs:
        raise SettingError(f"--only {' '.join(only)}: selects no run (an untrained condition has no seed)")
    return runs


def check_inputs(study, runs):
    """The model and data the given runs need exist (checked before anything is loaded)."""
    if runs and not os.path.isfile(os.path.join(study.model, "config.json")):
        how = f"; build it with: {study.model_how}" if study.model_how else ""
        raise SettingError(f"model {study.display(study.model)}: no config.json there{how} (or give --model)")
    for d in sorted({r.direction for r in runs}):
        direction = study.directions[d]
        for path in direction.train + [direction.eval]:
            if not os.path.exists(path):
                raise SettingError(f"direction {d}: {study.display(path)} not found (check data_root or --data-root)")
        if not languages_in(direction.eval):
            raise SettingError(f"direction {d}: {study.display(direction.eval)} has no {{lang}}.json files")
