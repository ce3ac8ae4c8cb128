"""`python -m minihbt.check step BUNDLE THEIRS [--worst N]`

Compares another implementation's tensors of one training step (THEIRS: a folder of
.safetensors files, or one file, with the bundle's tensor names; any subset) with a golden
bundle written by `python -m minihbt.check export`. Tensors are compared in the order the
step computes them: forward (tokens, each side's hidden states, pooling, scores, loss), then
backward (the scores' gradient, the embeddings', then each block from the last to the
first: the gradient at its output and its parameters' gradients), then the update. A tensor
is within tolerance when

    max|theirs - ours| <= tol * max(1, max|ours|)

with the tolerance of its family at the bundle's dtype (manifest.json says each and why).
Floating tensors must have the bundle's dtype (a float32 bundle also takes float64), token
ids and masks an integer or bool dtype; anything else is bad input, named before any
comparison. The first tensor out of tolerance is where the implementation diverges:
"first divergence: passage/encoder.layer.3.output".

The word table's gradient and update may be given as the bundle's rows (the ids in
rows/embeddings.word_embeddings.weight) or as the whole table.

A tensor of another shape than the bundle's (token ids of another length, say, from another
tokenisation or prefix) is a divergence too, named with both shapes.

Exit status 0 when every provided tensor is within tolerance, 1 at a divergence, 2 for bad
input (a bundle of another format version or whose tensors are not what its manifest says, a
tensor of a dtype the bundle does not take, a missing path, a file that cannot be read).
"""
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from .. import cli
from ..cli import AT_LEAST_1, setting
from . import bundle

PROG = "python -m minihbt.check step"
SHOWN_MISSING = 12
# The dtypes a submission's floating tensors may have, by the bundle's dtype: a float64 bundle's
# tolerances (1e-9 and below) are out of float32's reach; a float32 bundle takes either.
ACCEPTED = {"float64": ("float64",), "float32": ("float32", "float64")}


class Row(NamedTuple):
    name: str
    phase: str
    family: str
    max_abs: float
    rel: float
    tol: float
    shapes: str = ""                           # set when the shapes differ: "THEIRS [..], the bundle [..]"

    @property
    def ok(self):
        return bool(self.rel <= self.tol)          # NaN is never within tolerance

    @property
    def badness(self):
        if self.tol > 0:
            return self.rel / self.tol
        return 0.0 if self.rel == 0 else float("inf")


@dataclass
class CompareSettings:
    bundle: str = setting(None, "a bundle folder written by `python -m minihbt.check export`", positional=True,
                          metavar="BUNDLE")
    theirs: str = setting(None, "the other implementation's tensors: a folder of .safetensors files or one "
                                ".safetensors file, named as the bundle's", positional=True, metavar="THEIRS")
    worst: Optional[int] = setting(None, "print only the N rows nearest to (or furthest past) their tolerance",
                                   accepted=AT_LEAST_1, metavar="N", default_text="every row")


def check_args(argv):
    problems = cli.Problems()
    args, _ = cli.parse_settings(PROG, __doc__, CompareSettings, argv, problems)
    cli.check_input_dir("BUNDLE", args.bundle, problems)
    if not os.path.exists(args.theirs):
        problems.add(f"THEIRS {args.theirs}: no such file or folder; expected a folder of .safetensors files or one")
    problems.stop_if_any()
    return args


def dtype_problems(manifest, ours, theirs):
    """One line naming each tensor whose dtype the comparison cannot take, or None: first the
    bundle's own tensors (a broken bundle: a dtype other than its manifest's entry), then THEIRS'.
    Both follow one rule: floating tensors ACCEPTED[the bundle's dtype], token ids and masks an
    integer or bool dtype."""
    entries = {e["name"]: e for e in manifest["tensors"]}
    floats = ACCEPTED[manifest["dtype"]]

    def accepted(name, a):
        return a.dtype.kind in "biu" if entries[name]["family"] == "tokens" else str(a.dtype) in floats

    broken = [f"{name} holds {a.dtype}, the manifest says {entries[name]['dtype']}" for name, a in ours.items()
              if str(a.dtype) != entries[name]["dtype"]]
    broken += [f"{name} holds {a.dtype} in a {manifest['dtype']} bundle" for name, a in ours.items()
               if str(a.dtype) == entries[name]["dtype"] and not accepted(name, a)]
    if broken:
        return f"BUNDLE is broken: {names_line(broken)}; export it again"
    bad = [f"{name} is {a.dtype}" for name, a in theirs.items() if not accepted(name, a)]
    if bad:
        return (f"THEIRS: {names_line(bad)}; a {manifest['dtype']} bundle takes {' or '.join(floats)} for floating "
                "tensors and an integer or bool dtype for token ids and masks")
    return None


def compare(entry, theirs, ours, manifest):
    """One Row: the error of THEIRS' tensor against the bundle's for manifest entry `entry`
    (`theirs`, `ours`: {name: array}; a whole word table is cut to the bundle's rows first); a
    tensor of another shape is out of tolerance by an infinite error."""
    name = entry["name"]
    tol = manifest["tolerances"][manifest["dtype"]][entry["family"]]
    given, expected, stored = theirs[name], ours[name], manifest.get("row_stored", {}).get(name)
    if stored and list(given.shape) == stored["full_shape"]:
        given = given[ours[stored["rows"]]]
    if given.shape != expected.shape:
        shapes = f"THEIRS {list(given.shape)}, the bundle {list(expected.shape)}"
        return Row(name, entry["phase"], entry["family"], float("inf"), float("inf"), tol, shapes)
    a, b = given.astype(np.float64), expected.astype(np.float64)
    max_abs = float(np.abs(a - b).max()) if a.size else 0.0
    scale = max(1.0, float(np.abs(b).max()) if b.size else 0.0)
    return Row(name, entry["phase"], entry["family"], max_abs, max_abs / scale, tol)


def print_table(rows, worst):
    shown = rows if worst is None else sorted(rows, key=lambda r: r.badness, reverse=True)[:worst]
    width = max(len(r.name) for r in shown)
    print(f"{'':6}{'tensor':{width}}  {'max abs':>9}  {'rel':>9}  {'tol':>9}  family")
    for r in shown:
        if r.shapes:
            print(f"{'FAIL':6}{r.name:{width}}  shape: {r.shapes}")
            continue
        print(f"{'ok' if r.ok else 'FAIL':6}{r.name:{width}}  {r.max_abs:9.2e}  {r.rel:9.2e}  {r.tol:9.2e}  {r.family}")


def names_line(names):
    head = ", ".join(names[:SHOWN_MISSING])
    return head + (f" and {len(names) - SHOWN_MISSING} more" if len(names) > SHOWN_MISSING else "")


def read_inputs(args):
    """(manifest, the bundle's tensors THEIRS has, THEIRS' tensors of the bundle's names, THEIRS' other names)."""
    try:
        manifest = bundle.read_manifest(args.bundle)
        theirs = bundle.read_tensors(bundle.theirs_files(args.theirs))
        entries = {t["name"] for t in manifest["tensors"]}
        wanted = {n for n in theirs if n in entries} | {bundle.WORD_ROWS}
        ours = bundle.read_tensors([os.path.join(args.bundle, f) for f in bundle.FILES.values()], wanted)
    except bundle.BundleError as e:
        raise cli.Stop(cli.EXIT_USAGE, f"error: {cli.one_line(e)}") from None
    missing = sorted(wanted - set(ours))
    if missing:
        raise cli.Stop(cli.EXIT_USAGE, f"error: {args.bundle}: the manifest lists {missing[0]}, which its tensor "
                                       "files do not hold")
    extra = sorted(n for n in theirs if n not in entries)
    return manifest, ours, {n: a for n, a in theirs.items() if n in entries}, extra


@cli.program(PROG)
def main(argv=None):
    args = check_args(argv)
    manifest, ours, theirs, extra = read_inputs(args)
    problem = dtype_problems(manifest, ours, theirs)
    if problem:
        raise cli.Stop(cli.EXIT_USAGE, f"error: {problem}")
    if not theirs:
        raise cli.Stop(cli.EXIT_USAGE, f"error: THEIRS {args.theirs}: none of its {len(extra)} tensors has a name of "
                                       f"the bundle (e.g. {names_line(extra[:3]) or 'none'}); see manifest.json")
    entries = manifest["tensors"]
    rows = [compare(e, theirs, ours, manifest) for e in entries if e["name"] in theirs]
    b = manifest["batch"]
    print(f"bundle {args.bundle}: {manifest['dtype']}, {b['triplets']} triplets ({b.get('kind') or 'unknown kind'}), "
          f"{len(entries)} tensors; THEIRS {args.theirs}: {len(rows)} of them")
    print_table(rows, args.worst)
    not_given = [e["name"] for e in entries if e["name"] not in theirs]
    if not_given:
        print(f"not provided ({len(not_given)}): {names_line(not_given)}")
    if extra:
        print(f"ignored, not in the bundle ({len(extra)}): {names_line(extra)}")
    failed = [r for r in rows if not r.ok]
    if failed:
        r = failed[0]
        why = f"shape: {r.shapes}" if r.shapes else f"max abs {r.max_abs:.3g}, rel {r.rel:.3g} > tol {r.tol:.3g}"
        print(f"first divergence: {r.name} ({r.phase}; {why})")
        print(f"verdict: DIVERGES; {len(failed)} of {len(rows)} provided tensors out of tolerance")
        return 1
    print(f"verdict: OK; all {len(rows)} provided tensors within tolerance ({bundle.RULE})")
    return 0
