"""Per-language centring (minihbt.evaluation.center_languages, evaluate.py --center-languages)
on a hand-made case: two languages whose embeddings are one content vector plus a language
offset, so that same-language texts outrank translations until the offsets are removed."""
import json
import os

import numpy as np
import pytest

from minihbt.data import load_lareqa
from minihbt.evaluation import center_languages, evaluate

S2 = 1 / np.sqrt(2)


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def write_set(d, lang, sentences, qas):
    context, breaks = "", []
    for s in sentences:
        breaks.append([len(context), len(context) + len(s)])
        context += s + " "
    doc = {"data": [{"title": "t", "paragraphs": [{"context": context, "sentences": sentences,
                                                   "sentence_breaks": breaks,
                                                   "qas": [{"id": i, "question": q, "answers": [{"answer_start": a}]}
                                                           for i, q, a in qas]}]}]}
    with open(os.path.join(d, f"{lang}.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f)


@pytest.fixture
def offset_world(tmp_path):
    """Languages aa, bb; questions q1, q2, each answered by sentence 1 / 2 of its language.
    Content vectors e1 = (1,0,0), e2 = (0,1,0); language offsets along e3: aa queries +3,
    aa candidates +2, bb queries -1, bb candidates -2 (roles differ on purpose)."""
    write_set(str(tmp_path), "aa", ["A1.", "A2."], [("q1", "qa1", 0), ("q2", "qa2", 4)])
    write_set(str(tmp_path), "bb", ["B1.", "B2."], [("q1", "qb1", 0), ("q2", "qb2", 4)])
    rs = load_lareqa(str(tmp_path))                                # candidates A1 A2 B1 B2
    q = {"aa": np.stack([unit([1, 0, 3]), unit([0, 1, 3])]), "bb": np.stack([unit([1, 0, -1]), unit([0, 1, -1])])}
    c = np.stack([unit([1, 0, 2]), unit([0, 1, 2]), unit([1, 0, -2]), unit([0, 1, -2])])
    return rs, q, c


def test_centred_vectors_by_hand(offset_world):
    rs, q, c = offset_world
    cq, cc = center_languages(q, c, rs.cand_lang)
    # each language's two rows are u1 + o and u2 + o (scaled alike): the mean is (u1 + u2) / 2 + o,
    # so the centred rows are +-(u1 - u2) / 2, re-normalised: +-(1, -1, 0) / sqrt(2)
    expected = np.array([[S2, -S2, 0], [-S2, S2, 0]], dtype=np.float32)
    for lang in ("aa", "bb"):
        np.testing.assert_allclose(cq[lang], expected, atol=1e-7)
    np.testing.assert_allclose(cc, np.concatenate([expected, expected]), atol=1e-7)
    assert cq["aa"].dtype == np.float32 and cc.dtype == np.float32
    np.testing.assert_array_equal(q["aa"], np.stack([unit([1, 0, 3]), unit([0, 1, 3])]))    # inputs untouched


def test_centring_makes_translations_the_nearest_neighbours(offset_world):
    rs, q, c = offset_world
    before = evaluate(rs, q, c)
    # plain: the aa query q1 = (1,0,3)/sqrt(10) scores A1 7/sqrt(50), the wrong aa sentence A2 6/sqrt(50),
    # its translation B1 only -5/sqrt(50): in the pool the wrong same-language sentence comes first
    assert before["multi"]["per_language"]["aa"]["r@1"] == pytest.approx(0.5)
    assert before["multi"]["per_language"]["aa"]["map"] == pytest.approx((1 + 2 / 3) / 2)   # gold at ranks 0, 2
    assert before["bias"]["per_language"]["aa"] == pytest.approx(2.0)
    cq, cc = center_languages(q, c, rs.cand_lang)
    after = evaluate(rs, cq, cc)
    assert after["cross"]["map"] == pytest.approx(1.0) and after["cross"]["r@1"] == pytest.approx(1.0)
    assert after["multi"]["map"] == pytest.approx(1.0)                   # both gold sentences on top
    assert after["bias"]["rank_distance"] == pytest.approx(1.0)          # ranks 0 and 1: the least possible


def test_a_language_with_one_text_stays_finite():
    q = {"aa": np.array([[0.6, 0.8]], dtype=np.float32)}
    c = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    cq, cc = center_languages(q, c, ["bb", "bb", "aa"])
    np.testing.assert_array_equal(cq["aa"], [[0.0, 0.0]])               # its own mean: nothing left
    np.testing.assert_array_equal(cc[2], [0.0, 0.0])
    np.testing.assert_allclose(cc[:2], [[S2, -S2], [-S2, S2]], atol=1e-7)


def test_evaluate_cli_center_languages(tmp_path):
    import evaluate as cli
    from minihbt import demo
    world = demo.make_world(seed=1, n_languages=2, n_entities=6, n_relations=2)
    data = demo.lareqa_files(world, str(tmp_path / "eval"), "eval")
    model = demo.make_model(world, str(tmp_path / "model"))
    base = ["--model", model, "--data", data, "--cache", str(tmp_path / "cache")]
    plain = cli.main(base + ["--out", str(tmp_path / "plain.json")])
    centred = cli.main(base + ["--center-languages", "--out", str(tmp_path / "centred.json")])
    assert plain["center_languages"] is False and centred["center_languages"] is True
    assert json.loads((tmp_path / "centred.json").read_text())["center_languages"] is True
    # the same figures as centring the cached embeddings by hand
    import minihbt
    m = minihbt.load_model(model)
    rs = load_lareqa(data)
    q = {l: minihbt.encode(m, [t for _, t in rs.queries[l]], kind="query") for l in rs.languages}
    cq, cc = center_languages(q, minihbt.encode(m, rs.cand_text, kind="passage"), rs.cand_lang)
    assert evaluate(rs, cq, cc)["multi"] == centred["multi"]
