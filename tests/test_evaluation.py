"""LAReQA readers (counts of the paper's tables), the evaluation protocol on a hand-made
set, and evaluate.py end to end on a tiny model."""
import json
import os

import numpy as np
import pytest

from minihbt.data import DataError, first_groups, load_lareqa
from minihbt.evaluation import evaluate
from conftest import TINY, shared_path

XQUAD_CANDIDATES = {"ar": 1222, "de": 1276, "el": 1234, "en": 1180, "es": 1215, "hi": 1244, "ru": 1219,
                    "th": 852, "tr": 1167, "vi": 1209, "zh": 1196}
MLQA_COUNTS = {"ar": (517, 2545), "de": (512, 2362), "en": (1148, 6264), "es": (500, 1787), "hi": (507, 2426),
               "vi": (511, 2828), "zh": (504, 2322)}


def need_shared(*parts):
    p = shared_path("data", *parts)
    if not os.path.exists(p):
        pytest.skip(f"../shared is absent ({p} not found)")
    return p


def test_xquad_r_counts():
    rs = load_lareqa(need_shared("xquad-r"))
    assert rs.languages == sorted(XQUAD_CANDIDATES)
    assert {l: len(rs.queries[l]) for l in rs.languages} == {l: 1190 for l in XQUAD_CANDIDATES}
    assert {l: len(rs.candidates_of(l)) for l in rs.languages} == XQUAD_CANDIDATES
    assert len(rs.cand_text) == 13014 and sum(rs.dropped.values()) == 0
    # every query has 11 relevant candidates in the pooled setting, one per language
    for lang in rs.languages:
        for qid, _ in rs.queries[lang]:
            gold = [rs.gold[(qid, l)] for l in rs.languages if (qid, l) in rs.gold]
            assert len(gold) == 11 and sorted(rs.cand_lang[g] for g in gold) == rs.languages
    # the gold sentence contains the answer text
    import json as _json
    with open(shared_path("data", "xquad-r", "en.json"), encoding="utf-8") as f:
        qa = _json.load(f)["data"][0]["paragraphs"][0]["qas"][0]
    assert qa["answers"][0]["text"] in rs.cand_text[rs.gold[(qa["id"], "en")]]


def test_mlqa_r_counts():
    rs = load_lareqa(need_shared("mlqa-r"))
    assert {l: (len(rs.queries[l]), len(rs.candidates_of(l))) for l in rs.languages} == MLQA_COUNTS
    assert len(rs.cand_text) == 20534
    for lang in rs.languages:
        for qid, _ in rs.queries[lang]:
            assert 2 <= sum((qid, l) in rs.gold for l in rs.languages) <= 4


def write_set(d, lang, paragraphs):
    with open(os.path.join(d, f"{lang}.json"), "w", encoding="utf-8") as f:
        json.dump({"data": [{"title": "t", "paragraphs": paragraphs}]}, f)


def para(sentences, qas):
    context, breaks = "", []
    for s in sentences:
        start = len(context)
        context += s + " "
        breaks.append([start, start + len(s)])
    return {"context": context, "sentences": sentences, "sentence_breaks": breaks,
            "qas": [{"id": i, "question": q, "answers": [{"answer_start": a, "text": "x"}]} for i, q, a in qas]}


def test_reader_errors_and_dropped(tmp_path):
    d = str(tmp_path)
    write_set(d, "aa", [para(["S0 one.", "S1 two."], [("q1", "Q1?", 0), ("q2", "Q2?", 9), ("q3", "Q3?", 500)])])
    rs = load_lareqa(d)
    assert rs.dropped == {"aa": 1} and [q for q, _ in rs.queries["aa"]] == ["q1", "q2"]
    assert rs.gold[("q2", "aa")] == 1
    (tmp_path / "bb.json").write_text("{broken")
    with pytest.raises(DataError, match="bb.json.*not valid JSON"):
        load_lareqa(d)
    (tmp_path / "bb.json").write_text(json.dumps({"data": [{"paragraphs": [{"context": "x", "qas": []}]}]}))
    with pytest.raises(DataError, match="bb.json.*sentences"):
        load_lareqa(d)
    with pytest.raises(DataError, match="not found"):
        load_lareqa(str(tmp_path / "missing"))


def test_first_groups_keeps_their_questions_and_paragraphs(tmp_path):
    """Three parallel groups in two paragraphs; the first two groups are the first paragraph's."""
    d = str(tmp_path)
    write_set(d, "aa", [para(["A0.", "A1."], [("q1", "qa1", 0), ("q2", "qa2", 4)]),
                        para(["A2.", "A3.", "A4."], [("q3", "qa3", 4)])])
    write_set(d, "bb", [para(["B0.", "B1.", "B2."], [("q2", "qb2", 4), ("q1", "qb1", 0)]),
                        para(["B3."], [("q3", "qb3", 0)])])
    rs = load_lareqa(d)                                    # candidates A0..A4 (0..4), B0..B3 (5..8)
    small, groups = first_groups(rs, 2)
    assert groups == 3
    assert small.cand_text == ["A0.", "A1.", "B0.", "B1.", "B2."] and small.cand_lang == ["aa"] * 2 + ["bb"] * 3
    assert small.queries == {"aa": [("q1", "qa1"), ("q2", "qa2")], "bb": [("q2", "qb2"), ("q1", "qb1")]}
    assert small.gold == {("q1", "aa"): 0, ("q2", "aa"): 1, ("q2", "bb"): 3, ("q1", "bb"): 2}
    assert all(small.cand_text[i] == rs.cand_text[rs.gold[key]] for key, i in small.gold.items())
    whole, _ = first_groups(rs, 10)
    assert whole.cand_text == rs.cand_text and whole.gold == rs.gold and whole.queries == rs.queries


def test_protocol_on_hand_made_embeddings(tmp_path):
    """Two languages, two parallel questions; embeddings chosen so every figure is known."""
    d = str(tmp_path)
    write_set(d, "aa", [para(["A0.", "A1."], [("q1", "qa1", 0), ("q2", "qa2", 4)])])
    write_set(d, "bb", [para(["B0.", "B1.", "B2."], [("q1", "qb1", 0), ("q2", "qb2", 4)])])
    rs = load_lareqa(d)                       # candidates: A0 A1 B0 B1 B2 (indices 0..4)
    e = np.eye(5, dtype=np.float32)
    cands = np.stack([e[0], e[1], e[0] * 0.8 + e[2] * 0.6, e[3], e[4]])
    # aa queries: q1 hits A0 (score 1), B0 (0.8); q2 is orthogonal to all but B2 (a wrong one)
    q = {"aa": np.stack([e[0], e[4]]), "bb": np.stack([e[2], e[3]])}
    res = evaluate(rs, q, cands)
    mono = res["mono"]["per_language"]
    assert mono["aa"]["map"] == pytest.approx((1 + 1 / 2) / 2)      # q2: A1 ties with A0 at 0, A0 wins
    assert mono["aa"]["r@1"] == pytest.approx(0.5)
    assert mono["bb"]["map"] == pytest.approx(1.0)                  # qb1 -> B0 (0.6 > 0), qb2 -> B1
    cross = res["cross"]["per_pair"]
    assert cross["aa-bb"]["map"] == pytest.approx((1 + 1 / 3) / 2)  # q2 -> B1 behind B2, B0
    assert cross["bb-aa"]["map"] == pytest.approx((1 + 1 / 2) / 2)  # qb1 -> A0 (0.6); qb2: tie 0 -> A0 first
    # Mul.: q1 of aa: ranking A0 (1), B0 (0.8), A1, B1, B2 -> relevant A0, B0 at ranks 0, 1;
    # q2 of aa: ranking B2 (1), then the ties A0, A1, B0, B1 by index -> A1, B1 at ranks 2, 4
    multi = res["multi"]["per_language"]
    assert multi["aa"]["map"] == pytest.approx((1.0 + (1 / 3 + 2 / 5) / 2) / 2)
    assert multi["aa"]["r@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert res["bias"]["per_language"]["aa"] == pytest.approx((1 + 2) / 2)
    assert res["mono"]["map"] == pytest.approx((mono["aa"]["map"] + mono["bb"]["map"]) / 2)
    for key in ("mono", "cross", "multi"):
        assert {"map", "r@1", "r@10"} <= set(res[key])
    assert set(res["bias"]) == {"rank_distance", "per_language"}


def test_evaluate_cli_on_tiny_model(tmp_path):
    import evaluate as cli
    data = need_shared("mlqa-r")
    out, report, cache = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "cache"
    argv = ["--model", TINY["xlmr"], "--data", data, "--languages", "de,es", "--out", str(out),
            "--report", str(report), "--cache", str(cache)]
    res = cli.main(argv)
    saved = json.loads(out.read_text())
    assert saved["dataset"] == "mlqa-r" and saved["languages"] == ["de", "es"]
    assert set(saved["cross"]["per_pair"]) == {"de-es", "es-de"}
    assert set(saved["mono"]["per_language"]["de"]) >= {"map", "r@1"}
    assert set(saved["multi"]["per_language"]["es"]) >= {"map", "r@10"}
    assert "| de |" in report.read_text()
    assert len(os.listdir(cache)) == 1
    again = cli.main(argv)                                      # from the cache: identical numbers
    assert again["multi"]["map"] == res["multi"]["map"] and again["bias"] == res["bias"]


def test_evaluate_sample_is_marked(tmp_path, capsys):
    import evaluate as cli
    data = need_shared("xquad-r")
    out, report = tmp_path / "r.json", tmp_path / "r.md"
    res = cli.main(["--model", TINY["xlmr"], "--data", data, "--languages", "de,en", "--sample", "5",
                    "--out", str(out), "--report", str(report), "--cache", ""])
    note = "SAMPLE (--sample 5): the first 5 of 1190 parallel question groups"
    assert note in capsys.readouterr().out and note in json.loads(out.read_text())["sample"]
    assert note in report.read_text() and res["counts"]["queries"] == {"de": 5, "en": 5}
