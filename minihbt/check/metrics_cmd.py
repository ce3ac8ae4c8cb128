"""`python -m minihbt.check metrics [--data DIR --write-order ORDER.json] [--data DIR --embeddings
THEIRS.npz [--out RESULTS.json]] [--cases CASES.json]`

Scores another implementation's embeddings with minihbt's exact retrieval and metrics on a
LAReQA set (XQuAD-R, MLQA-R), so that a difference in figures is a difference in the
embeddings, not in the evaluation:

  --write-order ORDER.json  the texts to embed, in the order of the rows: "queries" (every
                            question, by language in the order of "languages", then in file
                            order) and "candidates" (every sentence, the same way)
  --embeddings THEIRS.npz   arrays `queries` [number of queries, D] and `candidates`
                            [number of candidates, D], rows in that order; rows are
                            L2-normalised here, so scores are cosines. Prints the table
                            evaluate.py prints (Mo./Cr./Mul. mAP and recall, language bias);
                            --out writes evaluate.py's results JSON
  --cases CASES.json        hand-made metric cases (small rankings with their values worked
                            out by hand) to run another metric code on

Exit status 2 for a bad setting or input (wrong shapes name both shapes), 1 for an error
while working.
"""
import os
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import cli
from ..cli import setting
from ..data import DataError, load_lareqa
from ..evaluation import evaluate, summary_table
from ..files import write_json
from . import cases

PROG = "python -m minihbt.check metrics"
ARRAYS = ("queries", "candidates")
ROW = {"queries": "query", "candidates": "candidate"}


@dataclass
class MetricsSettings:
    data: Optional[str] = setting(None, "LAReQA folder of {lang}.json files, e.g. ../shared/data/mlqa-r", metavar="DIR")
    embeddings: Optional[str] = setting(None, "an .npz of arrays `queries` and `candidates`, rows in the order "
                                              "--write-order lists; needs --data", metavar="FILE")
    write_order: Optional[str] = setting(None, "write the texts of the rows (JSON); needs --data", metavar="FILE")
    out: Optional[str] = setting(None, "with --embeddings: write the results JSON (as evaluate.py --out)",
                                 metavar="FILE")
    cases: Optional[str] = setting(None, "write the hand-made metric cases (JSON)", metavar="FILE")


def check_args(argv):
    """Every setting before anything is read: one line per problem, exit status 2."""
    problems = cli.Problems()
    args, _ = cli.parse_settings(PROG, __doc__, MetricsSettings, argv, problems)
    if not (args.embeddings or args.write_order or args.cases):
        problems.add("nothing to do: expected --embeddings FILE or --write-order FILE (each with --data DIR), "
                     "or --cases FILE")
    elif args.data and not (args.embeddings or args.write_order):
        problems.add(f"--data {args.data}: only with --embeddings or --write-order")
    for flag, value in (("--embeddings", args.embeddings), ("--write-order", args.write_order)):
        if value and not args.data:
            problems.add(f"{flag}: needs --data DIR, the LAReQA set the rows belong to")
    if args.out and not args.embeddings:
        problems.add(f"--out {args.out}: only with --embeddings (the results of scoring them)")
    if args.data and cli.check_input_dir("--data", args.data, problems):
        if not any(f.endswith(".json") for f in os.listdir(args.data)):
            problems.add(f"--data {args.data}: no {{lang}}.json files in it (expected e.g. data/mlqa-r)")
    if args.embeddings and not os.path.isfile(args.embeddings):
        problems.add(f"--embeddings {args.embeddings}: " + ("a folder" if os.path.isdir(args.embeddings)
                                                            else "no such file") + "; expected an .npz file")
    problems.stop_if_any()
    for flag, path in (("--write-order", args.write_order), ("--out", args.out), ("--cases", args.cases)):
        if path:
            cli.check_output_file(flag, path, problems)
    problems.stop_if_any()
    return args


def text_order(rs):
    """The rows an .npz must hold, as a JSON-ready document."""
    listed = [(lang, qid, text) for lang in rs.languages for qid, text in rs.queries[lang]]
    queries = [{"row": i, "lang": lang, "id": qid, "text": text} for i, (lang, qid, text) in enumerate(listed)]
    candidates = [{"row": i, "lang": lang, "text": text} for i, (lang, text) in enumerate(zip(rs.cand_lang,
                                                                                              rs.cand_text))]
    return {"dataset": rs.name, "languages": list(rs.languages),
            "about": "embed queries[i].text as row i of the array `queries`, candidates[j].text as row j of "
                     "`candidates` (docs/check-your-implementation.md)",
            "queries": queries, "candidates": candidates}


def usage_error(message):
    return cli.Stop(cli.EXIT_USAGE, f"error: {message}")


def load_arrays(path):
    """The two arrays of the .npz at `path`, as they are stored."""
    try:
        z = np.load(path, allow_pickle=False)
    except OSError as e:
        raise usage_error(f"--embeddings {path}: cannot read it ({e.strerror or cli.one_line(e)})") from None
    except (ValueError, EOFError, zipfile.BadZipFile):
        raise usage_error(f"--embeddings {path}: not a NumPy .npz file; expected arrays {' and '.join(ARRAYS)} "
                          "written by np.savez") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise usage_error(f"--embeddings {path}: one array; expected an .npz with arrays {' and '.join(ARRAYS)} "
                          "(np.savez(path, queries=..., candidates=...))")
    with z:
        missing = [name for name in ARRAYS if name not in z.files]
        if missing:
            raise usage_error(f"--embeddings {path}: no array {', '.join(missing)}; expected {' and '.join(ARRAYS)}, "
                              f"found {', '.join(z.files) or 'none'}")
        return z["queries"], z["candidates"]


def read_embeddings(path, rs):
    """({lang: [n, D]} query rows and [N, D] candidate rows, L2-normalised float32) from the
    .npz at `path`; anything off (shapes, widths, values) ends with one line, exit status 2."""
    arrays = dict(zip(ARRAYS, load_arrays(path)))
    counts = {"queries": sum(len(rs.queries[lang]) for lang in rs.languages), "candidates": len(rs.cand_text)}
    for name, a in arrays.items():
        if a.ndim != 2 or a.shape[0] != counts[name]:
            raise usage_error(f"--embeddings {path}: {name} has shape {a.shape}, expected ({counts[name]}, D): one "
                              f"row per {ROW[name]} of {rs.name}, in the order --write-order lists")
        if a.dtype.kind not in "fiu":
            raise usage_error(f"--embeddings {path}: {name} holds {a.dtype}; expected numbers")
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        if bad.size:
            raise usage_error(f"--embeddings {path}: {name} has non-finite values in {bad.size} rows (row {bad[0]} "
                              "first)")
    if arrays["queries"].shape[1] != arrays["candidates"].shape[1]:
        raise usage_error(f"--embeddings {path}: queries {arrays['queries'].shape} and candidates "
                          f"{arrays['candidates'].shape} differ in width; expected one width D for both")
    unit = {}
    for name, a in arrays.items():
        a = a.astype(np.float64)
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        unit[name] = (a / np.where(norm > 0, norm, 1.0)).astype(np.float32)
    ends = np.cumsum([len(rs.queries[lang]) for lang in rs.languages])
    queries = dict(zip(rs.languages, np.split(unit["queries"], ends[:-1])))
    return queries, unit["candidates"]


@cli.program(PROG)
def main(argv=None):
    args = check_args(argv)
    if args.cases:
        write_json(args.cases, cases.cases(), indent=1)
        print(f"{args.cases}: {len(cases.RANKING_CASES)} ranking cases and a macro-average case")
    if not args.data:
        return 0
    try:
        rs = load_lareqa(args.data)
    except DataError as e:
        raise usage_error(cli.one_line(e)) from None
    if args.write_order:
        order = text_order(rs)
        write_json(args.write_order, order, indent=1)
        print(f"{args.write_order}: {len(order['queries'])} queries and {len(order['candidates'])} candidates of "
              f"{rs.name} ({', '.join(rs.languages)})")
    if args.embeddings:
        queries, candidates = read_embeddings(args.embeddings, rs)
        res = evaluate(rs, queries, candidates)
        print(summary_table(res))
        if args.out:
            write_json(args.out, {**res, "embeddings": os.path.abspath(args.embeddings)}, indent=1)
    return 0
