"""What the check subcommands share: the sampler's settings, as train.py has them, and reading the training data."""
import os
from dataclasses import dataclass
from typing import List, Optional

from .. import cli
from ..cli import FRACTION, setting
from ..data import DataError, read_training_data, spec_path
from ..sampler import LANGUAGE_WEIGHTINGS, SAMPLERS, HBTSampler
from ..training import check_sampler_combinations


@dataclass
class SamplerSettings:
    """--data, --sampler, --alpha and --xx-weighting, as train.py has them (--data is its --train)."""
    data: Optional[List[str]] = setting(None, "training data, repeatable, one source each, as train.py's --train "
                                              "takes it: a folder of SQuAD-format .json files (e.g. "
                                              "../shared/data/mlqa-r), one such file, a .jsonl file, or LANG=PATH; the "
                                              "source is named after the file or folder", repeat=True, metavar="PATH",
                                        required=True)
    sampler: Optional[str] = setting(None, "xx: one language per batch; xy: each triplet's query and passages in two "
                                           "languages of one parallel group; hybrid: xx with probability --alpha, "
                                           "else xy", choices=SAMPLERS, required=True)
    alpha: float = setting(0.5, "hybrid: probability of an xx batch", accepted=FRACTION, metavar="A")
    xx_weighting: str = setting("uniform", "xx and hybrid: the language of an xx batch is drawn uniformly over the "
                                           "source's languages, or in proportion to their numbers of examples",
                                choices=LANGUAGE_WEIGHTINGS)


def check_sampler_flags(s, given, problems):
    """The combinations train.py refuses too (`given`: the names the command line set)."""
    for spec in s.data or []:
        if not os.path.exists(spec_path(spec)[1]):
            problems.add(f"--data {spec}: no such file or folder")
    check_sampler_combinations(s, given, problems)


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


def build_sampler(s):
    """minihbt's HBTSampler over --data with the checked sampler flags (as train.py builds it);
    a data error is one line, exit 2."""
    try:
        return HBTSampler(read_sources(s.data), s.batch_size, sampler=s.sampler, alpha=s.alpha, seed=s.seed,
                          xx_language_weighting=s.xx_weighting, max_negatives=s.max_negatives)
    except (DataError, ValueError) as e:
        raise cli.Stop(cli.EXIT_USAGE, f"error: --data: {cli.one_line(e)}") from None
