"""Exact properties of the HBT batch samplers (minihbt.sampler) on synthetic data.

The data: source "big" has 300 parallel groups in en/de/fr (900 examples); source "small"
has 100 groups in en/de/sw (300 examples, so sizes are 3:1 and sw exists only there). Every
text names its source, group and language, so a triplet's provenance can be checked; the
`noisy` variant adds deliberately repeated queries, positives and negatives.
"""
import collections
import itertools
import json

import pytest

from minihbt.data import Example
from minihbt.sampler import Batch, HBTSampler, Triplet


def parallel_source(source, langs, n_groups):
    """n_groups groups, each translated into every language of `langs`."""
    return [Example(id=f"{source}-{lang}-{g}", lang=lang, query=f"{source} q{g} [{lang}]",
                    positive=f"{source} p{g} [{lang}]",
                    negatives=(f"{source} n{g}a [{lang}]", f"{source} n{g}b [{lang}]"),
                    group=f"{source}-g{g}", source=source)
            for g in range(n_groups) for lang in langs]


def two_sources():
    return parallel_source("big", ["en", "de", "fr"], 300) + parallel_source("small", ["en", "de", "sw"], 100)


def noisy_source(source="big", n_groups=300, langs=("en", "de", "fr")):
    """Parallel data with many repeated texts within a language: every 10th group asks the same
    question, groups 2k and 2k+1 share one positive passage (as SQuAD questions share a
    context), and each example's negatives are other groups' positives, its own positive and a
    repeated negative."""
    examples = []
    for g in range(n_groups):
        for lang in langs:
            query = f"what is it? [{lang}]" if g % 10 == 0 else f"{source} q{g} [{lang}]"
            positive = f"{source} p{g // 2} [{lang}]"
            others = [f"{source} p{((g + k) % n_groups) // 2} [{lang}]" for k in (2, 7, 13)]
            negatives = tuple(others + [positive, f"{source} n{g} [{lang}]", f"{source} n{g} [{lang}]"])
            examples.append(Example(id=f"{source}-{lang}-{g}", lang=lang, query=query, positive=positive,
                                    negatives=negatives, group=f"{source}-g{g}", source=source))
    return examples


def many_batches(sampler, n):
    """The first n batches of epochs 0, 1, 2, ..."""
    out = []
    for epoch in itertools.count():
        if len(out) >= n:
            return out[:n]
        out.extend(sampler.batches(epoch))


def index(examples):
    """(source, group, lang) -> examples, for checking where a triplet's texts come from."""
    out = collections.defaultdict(list)
    for ex in examples:
        out[(ex.source, ex.group, ex.lang)].append(ex)
    return out


def assert_no_duplicate_texts(batch):
    queries = [t.query for t in batch.triplets]
    passages = [p for t in batch.triplets for p in (t.positive,) + tuple(t.negatives)]
    assert len(queries) == len(set(queries)), f"repeated query in {batch}"
    assert len(passages) == len(set(passages)), f"repeated passage in {batch}"


# 1. X-X batches are monolingual
def test_xx_batches_are_single_language():
    examples = two_sources()
    known = {(ex.source, ex.lang, ex.query, ex.positive, ex.negatives) for ex in examples}
    sampler = HBTSampler(examples, batch_size=8, sampler="xx", seed=1)
    batches = sampler.batches(0) + sampler.batches(1)
    assert {b.kind for b in batches} == {"xx"}
    for b in batches:
        assert b.lang in {"en", "de", "fr", "sw"}
        for t in b.triplets:
            assert t.query_lang == t.passage_lang == b.lang
            assert t.source == b.source
            assert (b.source, b.lang, t.query, t.positive, t.negatives) in known   # one real example of that language
    assert {b.lang for b in batches if b.source == "small"} == {"en", "de", "sw"}
    assert {b.lang for b in batches if b.source == "big"} == {"en", "de", "fr"}


# 2. X-Y triplets cross languages within one parallel group
def test_xy_triplets_cross_languages_within_a_group():
    examples = noisy_source() + parallel_source("small", ["en", "de", "sw"], 100)
    by_key = index(examples)
    sampler = HBTSampler(examples, batch_size=8, sampler="xy", seed=2)
    batches = sampler.batches(0) + sampler.batches(1)
    assert {b.kind for b in batches} == {"xy"}
    for b in batches:
        assert b.lang == ""
        assert len({t.query_lang for t in b.triplets} | {t.passage_lang for t in b.triplets}) >= 2
        for t in b.triplets:
            assert t.query_lang != t.passage_lang
            assert t.source == b.source
            queries = [ex.query for ex in by_key[(t.source, t.group, t.query_lang)]]
            passages = [ex for ex in by_key[(t.source, t.group, t.passage_lang)] if ex.positive == t.positive]
            assert t.query in queries, f"query {t.query!r} is not from group {t.group} in {t.query_lang}"
            assert passages, f"positive {t.positive!r} is not from group {t.group} in {t.passage_lang}"
            assert set(t.negatives) <= set(passages[0].negatives)


# 3. and 4. hybrid kind shares and source shares
def test_hybrid_share_and_source_proportions():
    sampler = HBTSampler(two_sources(), batch_size=4, sampler="hybrid", alpha=0.5, seed=3)
    batches = many_batches(sampler, 10_000)
    kinds = collections.Counter(b.kind for b in batches)
    assert abs(kinds["xx"] / 10_000 - 0.5) <= 0.02, kinds
    sources = collections.Counter(b.source for b in batches)
    assert abs(sources["big"] / 10_000 - 0.75) <= 0.02, sources          # 900 : 300 examples
    for b in batches:                                                     # never a mixed-source batch
        assert {t.source for t in b.triplets} == {b.source}
        assert (b.lang != "") == (b.kind == "xx")


def test_alpha_moves_the_share():
    examples = parallel_source("big", ["en", "de", "fr"], 300)
    batches = many_batches(HBTSampler(examples, batch_size=4, alpha=0.2, seed=4), 5_000)
    assert abs(sum(b.kind == "xx" for b in batches) / 5_000 - 0.2) <= 0.02
    assert {b.kind for b in HBTSampler(examples, 4, alpha=1.0).batches(0)} == {"xx"}
    assert {b.kind for b in HBTSampler(examples, 4, alpha=0.0).batches(0)} == {"xy"}


# 5. no repeated query or passage text in a batch
def test_no_duplicate_texts_in_a_batch():
    examples = noisy_source()
    # the data really repeats texts: unguarded batches of 8 consecutive examples of one language clash
    en = [ex for ex in examples if ex.lang == "en"]
    naive = [en[i:i + 8] for i in range(0, len(en), 8)]
    clashing = sum(len({p for ex in b for p in (ex.positive,) + ex.negatives})
                   < sum(1 + len(ex.negatives) for ex in b) for b in naive)
    assert clashing == len(naive)
    assert any(len({ex.query for ex in b}) < 8 for b in [en[i::30][:8] for i in range(30)])
    for kind in ("xx", "xy", "hybrid"):
        sampler = HBTSampler(examples, batch_size=8, sampler=kind, seed=5)
        for epoch in range(3):
            for b in sampler.batches(epoch):
                assert len(b.triplets) == 8
                assert_no_duplicate_texts(b)
                for t in b.triplets:
                    assert t.positive not in t.negatives
    capped = HBTSampler(examples, batch_size=8, sampler="hybrid", seed=5, max_negatives=2)
    lengths = {len(t.negatives) for b in capped.batches(0) for t in b.triplets}
    assert max(lengths) == 2 and all(assert_no_duplicate_texts(b) is None for b in capped.batches(0))


# 6. exact length
@pytest.mark.parametrize("kind,batch_size", [("xx", 4), ("xy", 7), ("hybrid", 16), ("hybrid", 5)])
def test_exact_length(kind, batch_size):
    examples = two_sources()
    sampler = HBTSampler(examples, batch_size=batch_size, sampler=kind, seed=6)
    assert len(sampler) == len(examples) // batch_size
    for epoch in range(4):
        batches = sampler.batches(epoch)
        assert len(batches) == len(sampler)
        assert all(isinstance(b, Batch) and len(b.triplets) == batch_size for b in batches)
        assert all(isinstance(t, Triplet) for b in batches for t in b.triplets)


def test_one_pool_sees_every_example_once_per_epoch():
    examples = parallel_source("big", ["en"], 400)
    sampler = HBTSampler(examples, batch_size=4, sampler="xx", seed=7)
    for epoch in range(3):
        queries = [t.query for b in sampler.batches(epoch) for t in b.triplets]
        assert sorted(queries) == sorted(ex.query for ex in examples)
    # with clashing texts, candidates held back from one batch go first in the next, so an
    # epoch still covers (nearly) every example once instead of losing the skipped ones
    noisy = [ex for ex in noisy_source() if ex.lang == "en"]
    sampler = HBTSampler(noisy, batch_size=4, sampler="xx", seed=7)
    for epoch in range(5):
        seen = collections.Counter((t.query, t.positive) for b in sampler.batches(epoch) for t in b.triplets)
        assert len(seen) >= len(noisy) - 3 and max(seen.values()) <= 2, (len(seen), max(seen.values()))


# 7. determinism
def test_determinism_and_state_dict():
    examples = two_sources()
    a = HBTSampler(examples, batch_size=4, seed=8)
    b = HBTSampler(list(examples), batch_size=4, seed=8)
    assert a.batches(3) == b.batches(3)
    a.batches(5)
    assert a.batches(3) == b.batches(3)                                   # no state carried between calls
    assert a.batches(0) != a.batches(1)
    assert HBTSampler(examples, batch_size=4, seed=9).batches(3) != a.batches(3)
    c = HBTSampler(examples, batch_size=8, sampler="xx", seed=123)
    c.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert c.state_dict() == a.state_dict() and len(c) == len(a)
    assert c.batches(2) == a.batches(2)
    with pytest.raises(ValueError, match="1200"):
        HBTSampler(examples[:100], batch_size=4).load_state_dict(a.state_dict())


# 8. X-X language choice
def test_xx_language_weighting():
    examples = [Example(id=f"{lang}{i}", lang=lang, query=f"q{i} {lang}", positive=f"p{i} {lang}", source="s")
                for lang, n in (("en", 400), ("de", 200), ("fr", 100)) for i in range(n)]
    for weighting, expected in (("uniform", (1 / 3, 1 / 3, 1 / 3)), ("proportional", (4 / 7, 2 / 7, 1 / 7))):
        sampler = HBTSampler(examples, batch_size=4, sampler="xx", seed=10, xx_language_weighting=weighting)
        counts = collections.Counter(b.lang for b in many_batches(sampler, 7_000))
        for lang, p in zip(("en", "de", "fr"), expected):
            assert abs(counts[lang] / 7_000 - p) <= 0.03, (weighting, counts)


# 9. X-Y language pairs
def test_xy_pairs_uniform_over_available_pairs():
    examples = (parallel_source("s", ["en", "de", "fr"], 150)
                + [ex for ex in parallel_source("s", ["en", "de"], 300) if int(ex.group[3:]) >= 150]
                + [ex for ex in parallel_source("s", ["fr"], 400) if int(ex.group[3:]) >= 300])
    assert len({ex.id for ex in examples}) == len(examples)
    three = {f"s-g{g}" for g in range(150)}
    two = {f"s-g{g}" for g in range(150, 300)}
    sampler = HBTSampler(examples, batch_size=4, sampler="xy", seed=11)
    pairs = {"three": collections.Counter(), "two": collections.Counter()}
    for b in many_batches(sampler, 5_000):
        for t in b.triplets:
            assert t.group in three or t.group in two                      # single-language groups never used
            pairs["three" if t.group in three else "two"][(t.query_lang, t.passage_lang)] += 1
    n3, n2 = sum(pairs["three"].values()), sum(pairs["two"].values())
    assert set(pairs["three"]) == set(itertools.permutations(["en", "de", "fr"], 2))
    assert set(pairs["two"]) == {("en", "de"), ("de", "en")}
    assert all(abs(c / n3 - 1 / 6) <= 0.02 for c in pairs["three"].values()), pairs["three"]
    assert all(abs(c / n2 - 1 / 2) <= 0.02 for c in pairs["two"].values()), pairs["two"]


# 10. clear errors
def test_errors():
    examples = two_sources()
    small_lang = examples + [Example(id=f"ja{i}", lang="ja", query=f"q{i} ja", positive=f"p{i} ja",
                                     group=f"small-g{i}", source="small") for i in range(3)]
    with pytest.raises(ValueError, match=r"'small'.*'ja'.*3 examples.*3 distinct queries"):
        HBTSampler(small_lang, batch_size=4, sampler="xx")
    repeated = [Example(id=str(i), lang="en", query="same" if i < 3 else f"q{i}", positive=f"p{i}", source="s")
                for i in range(5)]
    with pytest.raises(ValueError, match=r"'s'.*'en'.*5 examples.*3 distinct queries.*only 3 triplets"):
        HBTSampler(repeated, batch_size=4, sampler="xx")
    HBTSampler(repeated, batch_size=3, sampler="xx")                       # three distinct queries are enough
    monolingual = [Example(id=str(i), lang="en", query=f"q{i}", positive=f"p{i}", group=f"g{i}", source="mono")
                   for i in range(50)]
    for kind in ("xy", "hybrid"):
        with pytest.raises(ValueError, match=r"'mono' has no parallel group with 2\+ languages"):
            HBTSampler(monolingual, batch_size=4, sampler=kind)
    assert len(HBTSampler(monolingual, batch_size=4, sampler="hybrid", alpha=1.0).batches(0)) == 12
    with pytest.raises(ValueError, match=r"X-Y batch of 8.*5 groups with 2\+ languages"):
        HBTSampler(parallel_source("tiny", ["en", "de"], 5), batch_size=8, sampler="xy")
    with pytest.raises(ValueError, match="unknown sampler 'mixed'"):
        HBTSampler(examples, batch_size=4, sampler="mixed")
    for alpha in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="alpha"):
            HBTSampler(examples, batch_size=4, alpha=alpha)
    with pytest.raises(ValueError, match="batch_size"):
        HBTSampler(examples, batch_size=0)
    with pytest.raises(ValueError, match="xx_language_weighting"):
        HBTSampler(examples, batch_size=4, xx_language_weighting="sqrt")
    with pytest.raises(ValueError, match="at least one example"):
        HBTSampler([], batch_size=4)


def test_full_batches_even_when_a_walk_gets_stuck():
    # (qA, pA) clashes with both others; a walk that takes it first cannot complete a batch of 2
    examples = [Example(id=str(i), lang="en", query=q, positive=p, source="s")
                for i, (q, p) in enumerate([("qA", "pB"), ("qB", "pA"), ("qA", "pA")])]
    sampler = HBTSampler(examples, batch_size=2, sampler="xx")
    seen = set()
    for epoch in range(60):
        (batch,) = sampler.batches(epoch)
        assert len(batch.triplets) == 2
        assert_no_duplicate_texts(batch)
        seen.add(tuple(sorted(t.query for t in batch.triplets)))
    assert seen == {("qA", "qB")}
