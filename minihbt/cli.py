"""The programs' edge: settings declared once, checked together, and errors as one line.

Every program (train.py, evaluate.py, study.py, the check kit, the download, the demo) uses it:

- `setting(default, help, accepted=..., choices=...)` declares one field of a settings
  dataclass. `parser` turns dataclasses into argparse flags (the help text shows the default,
  so each default is written once), `read_config` reads a JSON file of the same settings, and
  `build_settings` (with `parse_settings`, for a command line) checks every value against its
  type, choices and range.
- `Problems` collects one line per bad setting, naming the flag and what is accepted; `stop_if_any()`
  ends the program with all of them, exit status 2 (argparse's), before any model or data is loaded.
- `program(name)` wraps a program's main(argv): a library error (a damaged checkpoint, a
  malformed data file, a missing GPU) reaches the user as one line and exit status 1, Ctrl-C as
  exit status 130; `MINIHBT_DEBUG=1` shows the traceback instead, for bug reports.
"""
import argparse
import difflib
import functools
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields

from .backend import Backend, DeviceError
from .files import make_folders, remove_empty_folders

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEBUG_VARIABLE = "MINIHBT_DEBUG"


_SHOWN = [True]                  # whether this process prints its Stop lines (a data-parallel run: rank 0)


def show_errors(on):
    """Print (on) or keep quiet about (off) the lines of a Stop: under mpirun every rank finds
    the same bad settings, and only rank 0 says so."""
    _SHOWN[0] = bool(on)


class Stop(SystemExit):
    """Ends the program with `status` after showing `lines` (each prefixed with the program's
    name). A SystemExit, so it passes through `with` blocks and `finally` clauses, and
    `str()` gives the lines (tests match on it)."""

    def __init__(self, status, *lines):
        super().__init__(status)
        self.lines, self.shown = lines, False

    def __str__(self):
        return "\n".join(self.lines)

    def show(self, prog):
        if not self.shown and _SHOWN[0]:
            for line in self.lines:
                print(f"{prog}: {line}", file=sys.stderr)
            self.shown = True
        return self


def program(prog):
    """Decorator for a program's main(argv): library errors become one line on stderr and
    exit status 1 (2 for bad settings, 130 for Ctrl-C); MINIHBT_DEBUG=1 re-raises them."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None, **options):
            debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
            try:
                return main(argv, **options)
            except Stop as stop:
                raise stop.show(prog)
            except KeyboardInterrupt:
                if debug:
                    raise
                raise Stop(EXIT_INTERRUPTED, "interrupted").show(prog) from None
            except Exception as e:  # the edge: every error reaches the user as one line
                if debug:
                    raise
                raise Stop(EXIT_ERROR, "error: " + one_line(e)).show(prog) from None
        return run
    return wrap


def one_line(error):
    """An exception as one line: its message for the errors the library and the OS raise on
    bad input, the type and a pointer to MINIHBT_DEBUG for anything else (a bug)."""
    text = " ".join(str(error).split()) or type(error).__name__
    expected = isinstance(error, (ValueError, OSError)) or type(error).__module__.startswith("minihbt")
    if expected:
        return text
    return f"{type(error).__name__}: {text} (an internal error; {DEBUG_VARIABLE}=1 shows the traceback)"


class Problems:
    """One line per bad setting, reported all at once; stop_if_any removes the folders make_folder made."""

    def __init__(self):
        self.lines = []
        self.created = []

    def add(self, line):
        self.lines.append(line)

    def bad_value(self, flag, value, accepted, origin=""):
        self.add(f"{flag} {show_value(value)}{origin}: expected {accepted}")

    def stop_if_any(self):
        if self.lines:
            remove_empty_folders(self.created)
            raise Stop(EXIT_USAGE, *(f"error: {line}" for line in self.lines))


def show_value(value):
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else json.dumps(value)


# ----------------------------------------------------------------------------- ranges

@dataclass(frozen=True)
class Range:
    """Accepted numbers: finite, at least `low` (more than `low` when `strict`), at most `high`."""
    low: float = None
    high: float = None
    strict: bool = False

    def accepts(self, x):
        if not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.strict else x < self.low):
            return False
        return self.high is None or x <= self.high

    def describe(self, kind=""):
        """The range in words, after `kind` ("an integer"): "an integer >= 1"; alone: " >= 1"."""
        if self.low is not None and self.high is not None:
            return f"{kind} in [{self.low}, {self.high}]"
        if self.low is not None:
            return f"{kind} {'>' if self.strict else '>='} {self.low}"
        return f"{kind} <= {self.high}" if self.high is not None else f"a finite {kind.split()[-1]}"


AT_LEAST_0, AT_LEAST_1, POSITIVE, FRACTION = Range(0), Range(1), Range(0, strict=True), Range(0, 1)


# ----------------------------------------------------------------------------- settings dataclasses

def setting(default, help, *, accepted=None, choices=None, metavar=None, repeat=False, note="", default_text=None,
            required=False, positional=False):
    """One field of a settings dataclass. The help text is `help`, then the accepted range and
    the default in parentheses: "(>= 1; default 100{note})"; `default_text` replaces the
    default's value there (e.g. "the checkpoint's own"). `accepted`: a Range; `choices`: the
    allowed strings; `repeat`: the flag may be given several times (a list; a positional: one
    or more); `required`: argparse demands it; `positional`: no flag (always required)."""
    meta = dict(help=help, accepted=accepted, choices=choices, metavar=metavar, repeat=repeat, note=note,
                default_text=default_text, required=required, positional=positional)
    return field(default=default, metadata=meta)


def field_kind(cls, f):
    """(base type, None allowed) of a field: int, float, str, bool or list (of str)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional else hint
    return (list if typing.get_origin(base) is list else base), optional


def flag_of(name):
    return "--" + name.replace("_", "-")


def help_text(f):
    meta, default = f.metadata, f.default
    shown = meta["default_text"] or ("on" if default is True else "off" if default is False else default)
    parts = [meta["accepted"].describe().strip()] if meta["accepted"] else []
    if shown is not None:
        parts.append(f"default{': ' if meta['default_text'] else ' '}{shown}{meta['note']}")
    return f"{meta['help']} ({'; '.join(parts)})" if parts else meta["help"]


def add_flags(parser, cls):
    """One argparse flag (or positional) per field of `cls`. Flags not given stay out of the
    namespace (argparse.SUPPRESS), so the caller knows exactly what the command line set."""
    for f in fields(cls):
        base, _ = field_kind(cls, f)
        meta = f.metadata
        if meta["positional"]:
            parser.add_argument(f.name, metavar=meta["metavar"], help=meta["help"], nargs="+" if meta["repeat"] else None)
            continue
        kw = dict(default=argparse.SUPPRESS, help=help_text(f), required=meta["required"])
        if base is bool:
            kw["action"] = "store_true"
        elif meta["repeat"]:
            kw.update(action="append", metavar=meta["metavar"])
        else:
            kw.update(type=base, choices=meta["choices"],
                      metavar=meta["metavar"] or {int: "N", float: "X"}.get(base) if not meta["choices"] else None)
        parser.add_argument(flag_of(f.name), **kw)


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (an unknown flag, a bad choice) are one line, exit status 2."""

    def error(self, message):
        raise Stop(EXIT_USAGE, f"error: {message} (see --help)")


def parser(prog, description, *classes, epilog=None):
    """A Parser with the flags of every settings dataclass in `classes`."""
    ap = Parser(prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in classes:
        add_flags(ap, cls)
    return ap


def parse_settings(prog, description, cls, argv, problems):
    """(settings, given) from the command line `argv` of a program whose flags are the fields of
    `cls`: parser(prog, description, cls) parses it (argparse's own errors end the program at
    once), build_settings checks every value (unfit ones go to `problems`); `given` holds the
    names the command line set."""
    values = vars(parser(prog, description, cls).parse_args(argv))
    return build_settings(cls, values, {}, problems), frozenset(values)


def expected_text(cls, f):
    """What a field accepts, in words: "an integer >= 1", "one of xx, xy, hybrid", ..."""
    base, optional = field_kind(cls, f)
    meta = f.metadata
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list of strings"}[base]
    return meta["accepted"].describe(kind) if meta["accepted"] else kind


def value_fits(cls, f, value):
    """Whether `value` (from the command line, a JSON file or a saved run) suits field `f`."""
    base, optional = field_kind(cls, f)
    meta = f.metadata
    if value is None:
        return optional
    if isinstance(value, bool) != (base is bool):
        return False
    if base is float and isinstance(value, (int, float)) or base is int and isinstance(value, int):
        return meta["accepted"] is None or meta["accepted"].accepts(value)
    if base is list:
        return isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    if base is str:
        return isinstance(value, str) and (not meta["choices"] or value in meta["choices"])
    return base is bool


def build_settings(cls, values, origins, problems):
    """An instance of `cls` from `values` (field name -> value); each unfit value is reported
    (naming its flag, where it came from and what is accepted) and replaced by the default."""
    kept = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if f.metadata["repeat"] and isinstance(value, str):
            value = [value]
        base, _ = field_kind(cls, f)
        if not value_fits(cls, f, value):
            shown = f.metadata["metavar"] if f.metadata["positional"] else flag_of(f.name)
            problems.bad_value(shown, value, expected_text(cls, f), origins.get(f.name, ""))
            continue
        kept[f.name] = float(value) if base is float and value is not None else value
    return cls(**kept)


def read_config(path, cls, problems):
    """Settings from a JSON file {"name": value} (names with dashes or underscores). Unknown
    names are reported with the closest known one; values are checked by `build_settings`."""
    where = f"--config {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as e:
        problems.add(f"{where}: cannot read it ({e.strerror or e})")
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.add(f"{where}: not valid JSON ({e})")
        return {}
    if not isinstance(doc, dict):
        problems.add(f"{where}: expected a JSON object of settings, e.g. {{\"lr\": 3e-5}}")
        return {}
    known = [f.name for f in fields(cls)]
    values = {}
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name in known:
            values[name] = value
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else " (see --help for the settings)"
        problems.add(f"{where}: unknown setting {key!r}{hint}")
    return values


# ----------------------------------------------------------------------------- paths and devices

def parse_list(flag, text, problems):
    """A comma-separated list: items stripped, empty items reported, duplicates dropped."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        problems.add(f"{flag} {json.dumps(text)}: an empty name in the list; expected names separated by "
                     "commas, e.g. ar,de,en")
        return []
    return list(dict.fromkeys(items))


def check_input_dir(flag, path, problems):
    if not os.path.isdir(path):
        problems.add(f"{flag} {path}: " + ("a file, not a folder" if os.path.exists(path) else "no such folder"))
        return False
    return True


def check_output_file(flag, path, problems):
    """An output file: not a folder, and its folder can be created (reported if not)."""
    if os.path.isdir(path):
        problems.add(f"{flag} {path}: a folder; expected a file name")
        return
    make_folder(flag, os.path.dirname(os.path.abspath(path)), problems)


def make_folder(flag, path, problems):
    """Create folder `path` (and its parents) now, so the work cannot fail on it later; a refused
    run removes them again (Problems.stop_if_any)."""
    if os.path.isfile(path):
        problems.add(f"{flag} {path}: a file; expected a folder")
        return
    try:
        problems.created += make_folders(path)
    except OSError as e:
        problems.add(f"{flag} {path}: cannot create this folder ({e.strerror or e})")


def check_device(flag, device, problems):
    """A cuda device must be usable now (CuPy importable, a GPU visible), not after loading."""
    if device == "cpu":
        return
    try:
        Backend(device, tf32=None)
    except DeviceError as e:
        problems.add(f"{flag} {device}: {one_line(e).rstrip('.')}; expected cpu, or cuda where CuPy sees a GPU")
