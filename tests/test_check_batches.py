"""`python -m minihbt.check batches` and `log`: minihbt's own batch logs pass; logs that break
one rule fail with that rule (and only that one) named at its first batch; bad input is one
line with exit status 2. The expected distributions come from the sampler's own tables
(HBTSampler.distributions), checked here against values worked out by hand.

The logs over real data use ../shared/data/mlqa-r (7 languages, 4,199 examples, parallel
groups of 2-4 languages); those tests are skipped when ../shared is absent.
"""
import json
import math
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest

import train
from conftest import TINY, shared_path
from minihbt.check import __main__ as dispatcher
from minihbt.check import batches as check_batches
from minihbt.check import fit, log_cmd
from minihbt.batchlog import BatchLog, batch_record, read_batch_log, sampler_batches, write_batch_log
from minihbt.data import Example, read_training_data
from minihbt.sampler import HBTSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLQA_R = shared_path("data", "mlqa-r")
needs_mlqa_r = pytest.mark.skipif(not os.path.isdir(MLQA_R),
                                  reason=f"../shared is absent ({MLQA_R} not found): the real-data logs are skipped")


@pytest.fixture(scope="module")
def mlqa_r():
    return read_training_data(MLQA_R)[0]


def make_log(path, examples, sampler, alpha=0.5, weighting="uniform", batches=1000, batch_size=8, seed=0):
    s = HBTSampler(examples, batch_size, sampler=sampler, alpha=alpha, seed=seed, xx_language_weighting=weighting)
    write_batch_log(sampler_batches(s, batches), str(path))
    return str(path)


def check(capsys, log, data, *flags):
    """(exit status, {rule: status}, stdout, stderr) of the batches subcommand."""
    argv = [log] + [a for d in data for a in ("--data", d)] + list(flags)
    try:
        status = check_batches.main(argv)
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    rules = {line.split()[1]: line.split()[0] for line in out.out.splitlines() if line[:4] in ("ok  ", "FAIL", "skip")}
    return status, rules, out.out, out.err


def broken(rules):
    return {rule for rule, status in rules.items() if status == "FAIL"}


def edit_log(src, dst, line, edit):
    """Copy the log at `src` to `dst`, with `edit(batch dict)` applied to the batch at `line` (from 1)."""
    with open(src, encoding="utf-8") as f:
        lines = f.read().splitlines()
    batch = json.loads(lines[line - 1])
    edit(batch)
    lines[line - 1] = json.dumps(batch, ensure_ascii=False)
    with open(dst, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(dst)


def first_line(log, kind, source=None):
    return next(b.line for b in read_batch_log(log) if b.kind == kind and source in (None, b.source))


# ----------------------------------------------------------------------------- minihbt's own logs pass

@needs_mlqa_r
@pytest.mark.parametrize("sampler", ["xx", "xy", "hybrid"])
def test_minihbt_logs_pass(tmp_path, capsys, mlqa_r, sampler):
    log = make_log(tmp_path / "log.jsonl", mlqa_r, sampler)
    status, rules, out, err = check(capsys, log, [MLQA_R], "--sampler", sampler)
    assert status == 0 and not broken(rules) and "verdict: every rule holds" in out, out + err
    assert len(rules) == 8
    tested = {"xx": {"xx-languages"}, "xy": {"xy-pairs"}, "hybrid": {"xx-languages", "xy-pairs"}}[sampler]
    assert {r for r, s in rules.items() if s == "skip"} == {"xx-languages", "xy-pairs"} - tested
    assert "1000 batches" in out


@needs_mlqa_r
def test_alpha_declared_wrongly_breaks_xx_share(tmp_path, capsys, mlqa_r):
    log = make_log(tmp_path / "a03.jsonl", mlqa_r, "hybrid", alpha=0.3)
    status, rules, out, _ = check(capsys, log, [MLQA_R], "--sampler", "hybrid", "--alpha", "0.5")
    assert status == 1 and broken(rules) == {"xx-share"}, out
    assert "--alpha 0.5 expects 0.5" in out and "verdict: 1 rule broken (xx-share)" in out
    assert check(capsys, log, [MLQA_R], "--sampler", "hybrid", "--alpha", "0.3")[0] == 0
    assert broken(check(capsys, log, [MLQA_R], "--sampler", "xy")[1]) == {"xx-share"}


@needs_mlqa_r
def test_the_declared_weighting_sets_the_expected_languages(tmp_path, capsys, mlqa_r):
    """en has 1,148 of the 4,199 examples: proportional batches are en 27% of the time, not 1/7."""
    log = make_log(tmp_path / "prop.jsonl", mlqa_r, "xx", weighting="proportional")
    assert check(capsys, log, [MLQA_R], "--sampler", "xx", "--xx-weighting", "proportional")[0] == 0
    status, rules, out, _ = check(capsys, log, [MLQA_R], "--sampler", "xx")
    assert status == 1 and broken(rules) == {"xx-languages"} and "mlqa-r en:" in out, out


@needs_mlqa_r
def test_xy_pairs_missing_a_language_break_xy_pairs(tmp_path, capsys, mlqa_r):
    """A trainer that never pairs en: every triplet is valid, but the pairs are not HBT's."""
    log = make_log(tmp_path / "no-en.jsonl", [ex for ex in mlqa_r if ex.lang != "en"], "xy")
    status, rules, out, _ = check(capsys, log, [MLQA_R], "--sampler", "xy")
    assert status == 1 and broken(rules) == {"xy-pairs"}, out
    assert "en" in out.split("furthest from expected:")[1]


@needs_mlqa_r
def test_the_expected_pairs_are_the_groups_not_uniform(tmp_path, mlqa_r):
    """minihbt's xy triplets fit the pairs its groups give and not a uniform spread over the 42 pairs."""
    counts = fit.xy_pair_counts(read_batch_log(make_log(tmp_path / "xy.jsonl", mlqa_r, "xy")))
    derived = HBTSampler(mlqa_r, 1, sampler="xy").distributions()["xy_pairs"]
    assert len(derived["mlqa-r"]) == 42
    uniform = {"mlqa-r": dict.fromkeys(derived["mlqa-r"], 1 / 42)}
    assert fit.goodness_of_fit("xy-pairs", counts, derived, "xy triplets").status == "ok"
    assert fit.goodness_of_fit("xy-pairs", counts, uniform, "xy triplets").status == "FAIL"


@needs_mlqa_r
def test_a_same_language_xy_triplet_breaks_xy_two_languages(tmp_path, capsys, mlqa_r):
    log = make_log(tmp_path / "h.jsonl", mlqa_r, "hybrid")
    line = first_line(log, "xy")
    by_query = {(ex.lang, ex.query): ex for ex in mlqa_r}

    def same_language(batch):
        t = batch["triplets"][0]
        ex = by_query[(t["query_lang"], t["query"])]                # the query's own example: its language
        t.update(positive=ex.positive, negatives=list(ex.negatives[:1]), passage_lang=ex.lang)
    bad = edit_log(log, tmp_path / "bad.jsonl", line, same_language)
    status, rules, out, _ = check(capsys, bad, [MLQA_R], "--sampler", "hybrid")
    assert status == 1 and broken(rules) == {"xy-two-languages"}, out
    assert f"line {line}: triplet 1 has its query and passages all in" in out
    assert "(1 of 1000 batches break it)" in out


@needs_mlqa_r
def test_a_repeated_text_breaks_distinct_texts(tmp_path, capsys, mlqa_r):
    log = make_log(tmp_path / "h.jsonl", mlqa_r, "hybrid")
    line = first_line(log, "xx")
    bad = edit_log(log, tmp_path / "bad.jsonl", line, lambda b: b["triplets"].__setitem__(1, b["triplets"][0]))
    status, rules, out, _ = check(capsys, bad, [MLQA_R], "--sampler", "hybrid")
    assert status == 1 and broken(rules) == {"distinct-texts"}, out
    assert f"line {line}: triplet 2: the query" in out


def write_source(path, langs, n_groups):
    """A .jsonl source: n_groups parallel groups, each in every language of `langs`."""
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path, "w", encoding="utf-8") as f:
        for g in range(n_groups):
            for lang in langs:
                f.write(json.dumps({"lang": lang, "query": f"{name} q{g} {lang}", "positive": f"{name} p{g} {lang}",
                                    "negatives": [f"{name} n{g} {lang}"], "group": f"g{g}"}) + "\n")
    return str(path)


def test_a_batch_that_mixes_sources_breaks_one_source(tmp_path, capsys):
    big, small = write_source(tmp_path / "big.jsonl", ["en", "de", "fr"], 90), \
        write_source(tmp_path / "small.jsonl", ["en", "de", "sw"], 30)
    examples = read_training_data(big)[0] + read_training_data(small)[0]
    log = make_log(tmp_path / "two.jsonl", examples, "hybrid", batches=300, batch_size=4)
    assert check(capsys, log, [big, small], "--sampler", "hybrid")[0] == 0
    line = next(b.line for b in read_batch_log(log) if b.kind == "xx" and b.source == "big"
                and b.triplets[0].query_lang == "en")

    def foreign(batch):
        batch["triplets"][0] = {"query": "small q7 en", "query_lang": "en", "positive": "small p7 en",
                                "negatives": ["small n7 en"], "passage_lang": "en"}
    status, rules, out, _ = check(capsys, edit_log(log, tmp_path / "bad.jsonl", line, foreign), [big, small],
                                  "--sampler", "hybrid")
    assert status == 1 and broken(rules) == {"one-source"}, out
    assert f"line {line}: triplet 1 is from source small, the batch from big" in out
    # a triplet in no source's data breaks parallel-group instead; so does a positive of another group
    for positive, words in (("made up", "is not a en positive of big"), ("big p8 en", "share no parallel group")):
        def wrong(batch):
            batch["triplets"][0] = {"query": "big q7 en", "query_lang": "en", "positive": positive,
                                    "passage_lang": "en"}
        status, rules, out, _ = check(capsys, edit_log(log, tmp_path / "bad.jsonl", line, wrong), [big, small],
                                      "--sampler", "hybrid")
        assert status == 1 and broken(rules) == {"parallel-group"} and words in out, out


def test_an_xx_batch_in_two_languages_breaks_xx_one_language(tmp_path, capsys):
    big = write_source(tmp_path / "big.jsonl", ["en", "de", "fr"], 90)
    log = make_log(tmp_path / "xx.jsonl", read_training_data(big)[0], "xx", batches=100, batch_size=4)

    def mixed(batch):
        lang = batch["triplets"][0]["query_lang"]
        other = "de" if lang != "de" else "en"
        batch["triplets"][0] = {"query": f"big q89 {other}", "query_lang": other, "positive": f"big p89 {other}",
                                "passage_lang": other}
    status, rules, out, _ = check(capsys, edit_log(log, tmp_path / "bad.jsonl", 5, mixed), [big], "--sampler", "xx")
    assert status == 1 and broken(rules) == {"xx-one-language"}, out
    assert "line 5: an xx batch in 2 languages" in out


# ----------------------------------------------------------------------------- expected distributions

def test_distributions_by_hand():
    """Source s: group g1 in en/de/fr, group g2 in en/de (5 examples); source t: one group in en/de.
    X-Y pairs of s: g1 gives each of its 6 ordered pairs 1/6, g2 each of its 2 pairs 1/2, and the
    groups are visited equally: (en, de) = (1/6 + 1/2) / 2 = 1/3, (en, fr) = (1/6 + 0) / 2 = 1/12."""
    def ex(source, group, lang):
        return Example(id=f"{source}{group}{lang}", lang=lang, query=f"q {source}{group}{lang}",
                       positive=f"p {source}{group}{lang}", group=group, source=source)
    examples = [ex("s", "g1", l) for l in ("en", "de", "fr")] + [ex("s", "g2", l) for l in ("en", "de")] + \
        [ex("t", "g1", l) for l in ("en", "de")]
    d = HBTSampler(examples, 1, sampler="hybrid", alpha=0.3).distributions()
    assert d["xx"] == 0.3 and d["sources"] == pytest.approx({"s": 5 / 7, "t": 2 / 7})
    assert d["xx_languages"]["s"] == pytest.approx({"de": 1 / 3, "en": 1 / 3, "fr": 1 / 3})
    assert d["xy_pairs"]["s"] == pytest.approx({("en", "de"): 1 / 3, ("de", "en"): 1 / 3, ("en", "fr"): 1 / 12,
                                                ("fr", "en"): 1 / 12, ("de", "fr"): 1 / 12, ("fr", "de"): 1 / 12})
    assert d["xy_pairs"]["t"] == pytest.approx({("en", "de"): 1 / 2, ("de", "en"): 1 / 2})
    proportional = HBTSampler(examples, 1, sampler="xx", xx_language_weighting="proportional").distributions()
    assert proportional["xx"] == 1.0 and proportional["xy_pairs"] == {}
    assert proportional["xx_languages"]["s"] == pytest.approx({"de": 2 / 5, "en": 2 / 5, "fr": 1 / 5})


def test_pool_cells_by_hand():
    o, e = fit.pool_cells([1, 2, 10, 20], [1.0, 3.0, 10.0, 20.0])       # 1 + 3 < 5, + 10 reaches it
    assert o.tolist() == [13, 20] and e.tolist() == [14.0, 20.0]
    o, e = fit.pool_cells([1, 5, 3], [2.0, 4.0, 4.5])                    # 2 + 4; 4.5 left short: joins them
    assert o.tolist() == [9] and e.tolist() == [10.5]


def test_goodness_of_fit_by_hand():
    """Two cells expected 20 each: 30/10 gives chi-square 10 on 1 df, p = erfc(sqrt(5)) = 0.00157
    (holds); 32/8 gives 14.4, p = erfc(sqrt(7.2)) = 0.000148 (broken)."""
    half = {"s": {"a": 0.5, "b": 0.5}}
    ok = fit.goodness_of_fit("r", {"s": Counter(a=30, b=10)}, half, "things")
    assert ok.status == "ok" and f"p = {math.erfc(math.sqrt(5)):.3g}" in ok.detail and "chi-square 10.0 on 1 df" in ok.detail
    bad = fit.goodness_of_fit("r", {"s": Counter(a=32, b=8)}, half, "things")
    assert bad.status == "FAIL" and "s a: 32 observed, 20.0 expected" in bad.detail
    never = fit.goodness_of_fit("r", {"s": Counter(a=30, c=1)}, half, "things")
    assert never.status == "FAIL" and "1 things of s in c, which the sampler never draws" in never.detail
    assert fit.goodness_of_fit("r", {"s": Counter(a=3, b=1)}, half, "things").status == "skip"   # 2 + 2 < 5


def test_share_by_hand():
    """10 of 10 xx: the 99.9% interval is [0.0005^(1/10), 1] = [0.468, 1]: holds 1 and 0.5, not 0.4."""
    def batches(kinds):
        return [SimpleNamespace(kind=k) for k in kinds]
    assert fit.share_finding(batches(["xx"] * 10), 1.0, "--sampler xx").status == "ok"
    assert "[0.468, 1.000]" in fit.share_finding(batches(["xx"] * 10), 1.0, "").detail
    assert fit.share_finding(batches(["xx"] * 10), 0.5, "").status == "ok"
    assert fit.share_finding(batches(["xx"] * 10), 0.4, "").status == "FAIL"
    assert fit.share_finding(batches(["xx"] * 9 + ["xy"]), 1.0, "").status == "FAIL"


# ----------------------------------------------------------------------------- bad input: one line, exit 2

def test_a_log_that_is_not_json_lines(tmp_path, capsys):
    big = write_source(tmp_path / "big.jsonl", ["en", "de"], 10)
    log = make_log(tmp_path / "log.jsonl", read_training_data(big)[0], "xy", batches=3, batch_size=2)
    with open(log, "a", encoding="utf-8") as f:
        f.write("this is not JSON\n")
    status, _, out, err = check(capsys, log, [big], "--sampler", "xy")
    assert status == 2 and out == ""
    assert err == f"python -m minihbt.check batches: error: {log}:4: not JSON (Expecting value); a batch log has " \
                  "one JSON object per line (docs/batch-log.md)\n"
    r = subprocess.run([sys.executable, "-m", "minihbt.check", "batches", log, "--data", big, "--sampler", "xy"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and f"{log}:4: not JSON" in r.stderr


@pytest.mark.parametrize("line,words", [
    ('{"kind": "zz", "source": "big", "triplets": []}', ":1: field 'kind' must be \"xx\" or \"xy\", got \"zz\""),
    ('{"kind": "xy", "source": "big", "triplets": [{"query": "q"}]}', ":1: triplet 1: field 'query_lang' must be"),
    ('[1, 2]', ":1: expected a JSON object (one batch), got list"),
    ('{"kind": "xy", "source": "elsewhere", "triplets": [{"query": "q", "query_lang": "en", "positive": "p", '
     '"passage_lang": "de"}]}', ":1: source 'elsewhere' is none of the --data sources (big)"),
])
def test_a_log_off_the_schema(tmp_path, capsys, line, words):
    big = write_source(tmp_path / "big.jsonl", ["en", "de"], 10)
    (tmp_path / "log.jsonl").write_text(line + "\n")
    status, _, _, err = check(capsys, str(tmp_path / "log.jsonl"), [big], "--sampler", "xy")
    assert status == 2 and len(err.splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("flags,words", [
    (["--sampler", "hybrid", "--alpha", "1.5"], "error: --alpha 1.5: expected a number in [0, 1]"),
    (["--sampler", "xx", "--alpha", "0.5"], "error: --alpha 0.5: only with --sampler hybrid"),
    (["--sampler", "xy", "--xx-weighting", "uniform"], "error: --xx-weighting: only with --sampler xx or hybrid"),
    (["--sampler", "mixed"], "argument --sampler: invalid choice: 'mixed'"),
    (["--sampler", "xx", "--xx-weighting", "square"], "argument --xx-weighting: invalid choice: 'square'"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, monkeypatch, flags, words):
    monkeypatch.setattr(check_batches, "read_batch_log", lambda path: pytest.fail("read before the flags were checked"))
    big = write_source(tmp_path / "big.jsonl", ["en", "de"], 10)
    status, _, _, err = check(capsys, big, [big], *flags)
    assert status == 2 and len(err.splitlines()) == 1 and words in err, err
    status, _, _, err = check(capsys, str(tmp_path / "missing.jsonl"), [big], "--sampler", "xx")
    assert status == 2 and "missing.jsonl: no such file" in err


def test_two_sources_with_one_name_are_refused(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = write_source(tmp_path / "a" / "s.jsonl", ["en", "de"], 10), write_source(tmp_path / "b" / "s.jsonl",
                                                                                         ["en", "de"], 10)
    log = make_log(tmp_path / "log.jsonl", read_training_data(one)[0], "xy", batches=3, batch_size=2)
    status, _, _, err = check(capsys, log, [one, two], "--sampler", "xy")
    assert status == 2 and len(err.splitlines()) == 1 and f"--data {two}: its source is named 's'" in err, err


def test_dispatcher(capsys):
    assert dispatcher.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in dispatcher.COMMANDS)
    for argv, words in (([], "expected a subcommand, one of batches, log, metrics"),
                        (["bogus"], "unknown subcommand 'bogus'")):
        with pytest.raises(SystemExit) as e:
            dispatcher.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and words in err


# ----------------------------------------------------------------------------- writing logs

def test_log_subcommand_writes_the_samplers_batches_and_refuses_an_existing_file(tmp_path, capsys):
    big = write_source(tmp_path / "big.jsonl", ["en", "de", "fr"], 30)
    out = str(tmp_path / "ref.jsonl")
    argv = ["--data", big, "--sampler", "hybrid", "--alpha", "0.25", "--batch-size", "4", "--batches", "20",
            "--seed", "3", "--out", out]
    assert log_cmd.main(argv) == 0
    expected = make_log(tmp_path / "direct.jsonl", read_training_data(big)[0], "hybrid", alpha=0.25, batches=20,
                        batch_size=4, seed=3)
    with open(out) as a, open(expected) as b:
        assert a.read() == b.read()
    with pytest.raises(SystemExit) as e:
        log_cmd.main(argv)
    assert e.value.code == 2 and "already exists; add --overwrite" in capsys.readouterr().err
    assert log_cmd.main(argv + ["--overwrite"]) == 0


def test_batch_log_of_a_resumed_run_is_the_uninterrupted_one(tmp_path):
    big = write_source(tmp_path / "big.jsonl", ["en", "de", "fr"], 30)
    sampler = HBTSampler(read_training_data(big)[0], 4, sampler="hybrid", seed=1)     # 22 batches an epoch
    whole, resumed = str(tmp_path / "whole.jsonl"), str(tmp_path / "resumed.jsonl")
    with BatchLog(whole, sampler, 0) as log:
        for batch in sampler_batches(sampler, 30):
            log.add(batch)
    with BatchLog(resumed, sampler, 25) as log:
        for batch in list(sampler_batches(sampler, 30))[25:]:
            log.add(batch)
    with open(whole) as a, open(resumed) as b:
        lines = a.read()
        assert lines == b.read() and lines.count("\n") == 30
    assert [json.loads(line)["step"] for line in lines.splitlines()] == list(range(1, 31))
    with BatchLog(None, sampler, 0) as log:                       # no path: nothing written
        log.add(sampler.batches(0)[0])


def test_train_writes_its_batches_and_refuses_an_existing_log(tmp_path, capsys):
    big = write_source(tmp_path / "big.jsonl", ["aa", "bb", "cc"], 40)
    log = str(tmp_path / "batches.jsonl")

    def argv(out):
        return ["--model", TINY["xlmr"], "--train", big, "--batch-size", "4", "--steps", "3", "--out", out,
                "--quiet", "--batch-log", log]
    train.main(argv(str(tmp_path / "run")))
    sampler = HBTSampler(read_training_data(big)[0], 4, sampler="hybrid", max_negatives=1)
    expected = [batch_record(batch, step) for step, batch in enumerate(sampler_batches(sampler, 3), 1)]
    with open(log) as f:
        assert [json.loads(line) for line in f] == expected
    with pytest.raises(SystemExit) as e:
        train.main(argv(str(tmp_path / "run2")))
    assert e.value.code == 2 and f"--batch-log {log}: already exists; add --overwrite" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run2" / "log.jsonl")
    with open(log, "w") as f:                                     # a damaged log: a resume writes it whole again
        f.write("cut")
    train.main(["--resume", str(tmp_path / "run"), "--steps", "5", "--quiet"])
    expected = [batch_record(batch, step) for step, batch in enumerate(sampler_batches(sampler, 5), 1)]
    with open(log) as f:
        assert [json.loads(line) for line in f] == expected
