"""`python -m minihbt.check log --data PATH --sampler S [...] --batches N --out FILE`

Writes the first N batches minihbt's sampler (minihbt.sampler.HBTSampler) composes for
this data and these settings, in the batch-log schema (docs/batch-log.md): the batches of
training steps 1..N of `train.py` with the same --train, --sampler, --alpha, --xx-weighting,
--batch-size, --max-negatives and --seed, without training. A reference to compare another
trainer's log with, and a log that `python -m minihbt.check batches` must pass.
"""
import argparse
import os

from .. import cli
from ..batchlog import sampler_batches, write_batch_log
from .common import Parser, add_sampler_flags, build_sampler, check_sampler_flags

PROG = "python -m minihbt.check log"


def build_parser():
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampler_flags(ap)
    ap.add_argument("--batch-size", type=int, default=100, metavar="N", help="triplets per batch (default 100)")
    ap.add_argument("--max-negatives", type=int, default=1, metavar="N",
                    help="hard negatives per triplet, >= 0 (default 1)")
    ap.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the batches, >= 0 (default 0)")
    ap.add_argument("--batches", type=int, default=1000, metavar="N", help="batches to write, >= 1 (default 1000)")
    ap.add_argument("--out", required=True, metavar="FILE", help="the log to write")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    return ap


def check_args(argv):
    args = build_parser().parse_args(argv)
    problems = cli.Problems()
    check_sampler_flags(args, problems)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-negatives", args.max_negatives, 0),
                             ("--seed", args.seed, 0), ("--batches", args.batches, 1)):
        if value < low:
            problems.bad_value(flag, value, f"an integer >= {low}")
    if os.path.isfile(args.out) and not args.overwrite:
        problems.add(f"--out {args.out}: already exists; add --overwrite to replace it")
    cli.check_output_file("--out", args.out, problems)
    problems.stop_if_any()
    return args


@cli.program(PROG)
def main(argv=None):
    args = check_args(argv)
    sampler = build_sampler(args)
    write_batch_log(sampler_batches(sampler, args.batches), args.out)
    print(f"{args.out}: {args.batches} batches of {args.batch_size} ({args.sampler}"
          + (f", alpha {args.alpha:g}" if args.sampler == "hybrid" else "") + f", seed {args.seed})")
    return 0
