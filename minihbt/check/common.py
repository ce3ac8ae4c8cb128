"""What the check subcommands share: one-line argument errors and reading the training data."""
import argparse
import os

from .. import cli
from ..data import DataError, read_training_data
from ..sampler import LANGUAGE_WEIGHTINGS, SAMPLERS, HBTSampler


class Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value outside the choices, a missing
    argument) end the program with one line and exit status 2, not the usage block."""

    def error(self, message):
        raise cli.Stop(cli.EXIT_USAGE, f"error: {message} (see --help)")


def add_sampler_flags(ap):
    """--data, --sampler, --alpha and --xx-weighting, as train.py has them (--data is its --train)."""
    ap.add_argument("--data", action="append", required=True, metavar="PATH",
                    help="training data, repeatable, one source each, as train.py's --train takes it: a folder of "
                         "SQuAD-format .json files (e.g. ../shared/data/mlqa-r), one such file, a .jsonl file, or "
                         "LANG=PATH; the source is named after the file or folder")
    ap.add_argument("--sampler", required=True, choices=SAMPLERS,
                    help="xx: one language per batch; xy: each triplet's query and passages in two languages of "
                         "one parallel group; hybrid: xx with probability --alpha, else xy")
    ap.add_argument("--alpha", type=float, default=None, metavar="A",
                    help="hybrid: probability of an xx batch, in [0, 1] (default 0.5)")
    ap.add_argument("--xx-weighting", choices=LANGUAGE_WEIGHTINGS, default=None,
                    help="xx and hybrid: the language of an xx batch is drawn uniformly over the source's "
                         "languages, or in proportion to their numbers of examples (default uniform)")


def check_sampler_flags(args, problems):
    """The combinations train.py refuses too; fills in the defaults (alpha 0.5, uniform)."""
    for spec in args.data:
        path = spec.split("=", 1)[1] if "=" in spec and not os.path.exists(spec) else spec
        if not os.path.exists(path):
            problems.add(f"--data {spec}: no such file or folder")
    if args.alpha is not None and args.sampler != "hybrid":
        problems.add(f"--alpha {args.alpha}: only with --sampler hybrid (the probability of an xx batch)")
    elif args.alpha is not None and not cli.FRACTION.accepts(args.alpha):
        problems.bad_value("--alpha", args.alpha, "a number in [0, 1]")
    if args.xx_weighting is not None and args.sampler == "xy":
        problems.add("--xx-weighting: only with --sampler xx or hybrid (xy batches have no single language)")
    args.alpha = 0.5 if args.alpha is None else args.alpha
    args.xx_weighting = args.xx_weighting or "uniform"


def read_sources(specs):
    """The examples of every --data source, as train.py reads its --train; two sources with
    one name are refused (a log names its batches' sources)."""
    examples, names = [], {}
    for spec in specs:
        found, _ = read_training_data(spec)
        for name in {ex.source for ex in found}:
            if name in names:
                raise cli.Stop(cli.EXIT_USAGE, f"error: --data {spec}: its source is named {name!r}, as is that "
                                               f"of --data {names[name]}; give sources distinct file or folder names")
            names[name] = spec
        examples += found
    return examples


def build_sampler(args):
    """minihbt's HBTSampler over --data with the checked sampler flags (as train.py builds it);
    a data error is one line, exit 2."""
    try:
        return HBTSampler(read_sources(args.data), args.batch_size, sampler=args.sampler, alpha=args.alpha,
                          seed=args.seed, xx_language_weighting=args.xx_weighting, max_negatives=args.max_negatives)
    except (DataError, ValueError) as e:
        raise cli.Stop(cli.EXIT_USAGE, f"error: --data: {cli.one_line(e)}") from None
