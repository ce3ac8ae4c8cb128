"""`python -m minihbt.check log --data PATH --sampler S [...] --batches N --out FILE`

Writes the first N batches minihbt's sampler (minihbt.sampler.HBTSampler) composes for
this data and these settings, in the batch-log schema (docs/batch-log.md): the batches of
training steps 1..N of `train.py` with the same --train, --sampler, --alpha, --xx-weighting,
--batch-size, --max-negatives and --seed, without training. A reference to compare another
trainer's log with, and a log that `python -m minihbt.check batches` must pass.
"""
import os
from dataclasses import dataclass

from .. import cli
from ..batchlog import sampler_batches, write_batch_log
from ..cli import AT_LEAST_0, AT_LEAST_1, setting
from .common import SamplerSettings, build_sampler, check_sampler_flags

PROG = "python -m minihbt.check log"


@dataclass
class LogSettings(SamplerSettings):
    batch_size: int = setting(100, "triplets per batch", accepted=AT_LEAST_1)
    max_negatives: int = setting(1, "hard negatives per triplet", accepted=AT_LEAST_0)
    seed: int = setting(0, "seed of the batches", accepted=AT_LEAST_0)
    batches: int = setting(1000, "batches to write", accepted=AT_LEAST_1)
    out: str = setting(None, "the log to write", metavar="FILE", required=True)
    overwrite: bool = setting(False, "replace --out if it exists", default_text="refuse")


def check_args(argv):
    problems = cli.Problems()
    args, given = cli.parse_settings(PROG, __doc__, LogSettings, argv, problems)
    check_sampler_flags(args, given, problems)
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
