"""`python -m minihbt.check batches LOG --data PATH --sampler S [--alpha A] [--xx-weighting W]`

Checks another trainer's batch log (docs/batch-log.md: one JSON line per batch) against
HBT's batch rules, on the training data the batches were drawn from:

  per batch (each broken rule is named with its first batch, by line):
    xx-one-language   an xx batch has one language, for every query and passage
    xy-two-languages  an xy triplet has its query in one language, its passages in another
    parallel-group    each triplet is in the data: query and positive of one parallel group,
                      in the languages the log gives them; the negatives passages of the
                      passage language
    distinct-texts    no query text twice in a batch, no passage text twice
    one-source        each triplet comes from the batch's source
  over the log, against what minihbt's sampler draws for this data and these settings:
    xx-share          the share of xx batches: its 99.9% Clopper-Pearson interval holds
                      alpha (hybrid), 1 (xx) or 0 (xy)
    xx-languages      the languages of xx batches (chi-square, p > 0.001)
    xy-pairs          the (query, passage) language pairs of xy triplets (chi-square, p > 0.001)

Exit status 0 when every rule holds, 1 when one is broken (each broken rule in one line),
2 for bad input (a log that is not JSON lines, a log source not among --data, a bad flag).
"""
import os
from dataclasses import dataclass

from .. import cli
from ..batchlog import LogError, read_batch_log
from ..cli import setting
from ..data import DataError
from ..sampler import HBTSampler
from . import fit
from .common import SamplerSettings, check_sampler_flags, read_sources
from .rules import RULES, DataIndex, batch_problems

PROG = "python -m minihbt.check batches"


@dataclass
class BatchesSettings(SamplerSettings):
    log: str = setting(None, "the batch log to check: one JSON object per line, one line per batch, in the order "
                             "trained on (docs/batch-log.md)", positional=True, metavar="LOG")


def check_args(argv):
    """The settings, checked before anything is read: one line per problem, exit status 2."""
    problems = cli.Problems()
    args, given = cli.parse_settings(PROG, __doc__, BatchesSettings, argv, problems)
    if not os.path.isfile(args.log):
        problems.add(f"{args.log}: " + ("a folder; expected a batch log file" if os.path.isdir(args.log)
                                        else "no such file; expected a batch log (docs/batch-log.md)"))
    check_sampler_flags(args, given, problems)
    problems.stop_if_any()
    return args


def rule_findings(batches, index):
    """One Finding per batch rule: ok, or FAIL with its first batch and how many break it."""
    first, count = {}, dict.fromkeys(RULES, 0)
    for batch in batches:
        for rule, message in batch_problems(batch, index).items():
            first.setdefault(rule, f"line {batch.line}: {message}")
            count[rule] += 1
    return [fit.Finding(rule, "FAIL", f"{first[rule]} ({count[rule]} of {len(batches)} batches break it)")
            if count[rule] else fit.Finding(rule, "ok", f"holds in all {len(batches)} batches") for rule in RULES]


def distribution_findings(batches, expected, declared, weighting):
    """xx-share, xx-languages and xy-pairs against the sampler's own distributions `expected`;
    `declared` and `weighting` name the settings in the messages."""
    out = [fit.share_finding(batches, expected["xx"], declared)]
    if expected["xx"] == 0.0:
        out.append(fit.Finding("xx-languages", "skip", f"{declared} draws no xx batches (see xx-share)"))
    else:
        found = fit.goodness_of_fit("xx-languages", fit.xx_language_counts(batches), expected["xx_languages"],
                                    "xx batches")
        out.append(found._replace(detail=f"{found.detail} (--xx-weighting {weighting})"))
    if expected["xx"] == 1.0:
        out.append(fit.Finding("xy-pairs", "skip", f"{declared} draws no xy batches (see xx-share)"))
    else:
        out.append(fit.goodness_of_fit("xy-pairs", fit.xy_pair_counts(batches), expected["xy_pairs"],
                                       "xy triplets"))
    return out


def check_log(batches, examples, sampler, alpha, xx_weighting):
    """Every Finding for `batches` (LoggedBatch) drawn from `examples` by the declared sampler.
    The expected distributions come from minihbt's sampler built on the same examples (its
    batch size does not change them)."""
    reference = HBTSampler(examples, 1, sampler=sampler, alpha=alpha, xx_language_weighting=xx_weighting)
    declared = f"--sampler {sampler}" + (f" --alpha {alpha:g}" if sampler == "hybrid" else "")
    return rule_findings(batches, DataIndex(examples)) + \
        distribution_findings(batches, reference.distributions(), declared, xx_weighting)


def read_inputs(args):
    """(batches, examples); bad input (the log, the data, a source of the log not in the
    data) ends the program with one line and exit status 2."""
    try:
        batches = read_batch_log(args.log)
        examples = read_sources(args.data)
    except (LogError, DataError) as e:
        raise cli.Stop(cli.EXIT_USAGE, f"error: {cli.one_line(e)}") from None
    known = sorted({ex.source for ex in examples})
    for batch in batches:
        if batch.source not in known:
            raise cli.Stop(cli.EXIT_USAGE, f"error: {args.log}:{batch.line}: source {batch.source!r} is none of "
                                           f"the --data sources ({', '.join(known)}); a source is named after "
                                           "its file or folder")
    return batches, examples


def report(findings, batches, path):
    """The verdict, one line per rule; returns the exit status (1 if a rule is broken)."""
    kinds = sum(b.kind == "xx" for b in batches)
    print(f"{path}: {len(batches)} batches ({kinds} xx, {len(batches) - kinds} xy), "
          f"{sum(len(b.triplets) for b in batches)} triplets")
    width = max(len(f.rule) for f in findings)
    for f in findings:
        print(f"{f.status:4s}  {f.rule:{width}s}  {f.detail}")
    broken = [f.rule for f in findings if f.status == "FAIL"]
    print(f"verdict: {len(broken)} rule{'s' if len(broken) != 1 else ''} broken ({', '.join(broken)})" if broken
          else "verdict: every rule holds")
    return cli.EXIT_ERROR if broken else 0


@cli.program(PROG)
def main(argv=None):
    args = check_args(argv)
    batches, examples = read_inputs(args)
    try:
        findings = check_log(batches, examples, args.sampler, args.alpha, args.xx_weighting)
    except ValueError as e:                     # the data cannot give the declared batches (no parallel group)
        raise cli.Stop(cli.EXIT_USAGE, f"error: --data: {cli.one_line(e)}") from None
    return report(findings, batches, args.log)
