"""`python -m minihbt.check metrics`: the hand-made metric cases hold for minihbt's own ranking
and metric functions (and a wrong value is caught); the order file lists the rows of a LAReQA
set as the data loader does; embeddings are scored with figures worked out by hand; bad
shapes and files are refused in one line with exit status 2."""
import copy
import json

import numpy as np
import pytest

import minihbt.data
from minihbt.check import cases, metrics_cmd

SENTENCES = {"de": ["Eins ist da.", "Zwei ist hier.", "Drei geht."], "en": ["One is there.", "Two is here.",
                                                                           "Three goes."]}
QUESTIONS = {"de": ["Was ist da?", "Was ist hier?"], "en": ["What is there?", "What is here?"]}


def write_lareqa(folder):
    """Two languages, one paragraph of three sentences each; question q1 is answered by
    sentence 0, q2 by sentence 1, in both languages (parallel ids)."""
    folder.mkdir()
    for lang, sentences in SENTENCES.items():
        context = " ".join(sentences)
        breaks, start = [], 0
        for s in sentences:
            breaks.append([start, start + len(s)])
            start += len(s) + 1
        qas = [{"id": f"q{i + 1}", "question": q, "answers": [{"answer_start": breaks[i][0] + 1, "text": "x"}]}
               for i, q in enumerate(QUESTIONS[lang])]
        doc = {"data": [{"paragraphs": [{"context": context, "sentences": sentences, "sentence_breaks": breaks,
                                         "qas": qas}]}]}
        (folder / f"{lang}.json").write_text(json.dumps(doc))
    return str(folder)


def run(capsys, *argv):
    try:
        status = metrics_cmd.main(list(argv))
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


# ----------------------------------------------------------------------------- the hand-made cases

def test_minihbt_reproduces_every_case(tmp_path, capsys):
    path = str(tmp_path / "cases.json")
    assert run(capsys, "--cases", path)[0] == 0
    with open(path) as f:
        doc = json.load(f)
    assert len(doc["cases"]) == len(cases.RANKING_CASES) >= 7
    for case in doc["cases"]:
        assert set(case["metrics"]) == set(cases.FUNCTIONS) == set(case["working"])
        assert cases.mismatches(case) == [], case["name"]
    assert cases.macro_mismatches(doc["macro"]) == []
    assert doc["macro"]["map"] == pytest.approx(13 / 24)


def test_a_wrong_value_is_caught():
    case = cases.cases()["cases"][2]                                    # ranks 0 and 2: AP 5/6
    wrong = copy.deepcopy(case)
    wrong["metrics"]["ap"] = 0.75                                       # micro of precisions 1 and 1/2, say
    assert cases.mismatches(wrong) == [f"{case['name']}: ap {(1 / 1 + 2 / 3) / 2!r}, the case says 0.75"]
    wrong = copy.deepcopy(cases.cases()["cases"][3])                    # the tie: candidate 1 is at rank 1
    wrong["ranks"] = [0]
    assert cases.mismatches(wrong)[0].endswith("ranks [1], the case says [0]")
    macro = copy.deepcopy(cases.MACRO_CASE)
    macro["map"] = 11 / 18                                              # the mean over queries, not languages
    assert len(cases.macro_mismatches(macro)) == 1


# ----------------------------------------------------------------------------- the order and the scores

def test_write_order_lists_the_rows_as_the_loader_does(tmp_path, capsys):
    data, order = write_lareqa(tmp_path / "set"), str(tmp_path / "order.json")
    status, out, _ = run(capsys, "--data", data, "--write-order", order)
    assert status == 0 and "4 queries and 6 candidates" in out
    with open(order) as f:
        doc = json.load(f)
    assert doc["languages"] == ["de", "en"]
    assert [(q["row"], q["lang"], q["id"], q["text"]) for q in doc["queries"]] == [
        (0, "de", "q1", "Was ist da?"), (1, "de", "q2", "Was ist hier?"),
        (2, "en", "q1", "What is there?"), (3, "en", "q2", "What is here?")]
    assert [c["text"] for c in doc["candidates"]] == SENTENCES["de"] + SENTENCES["en"]
    rs = minihbt.data.load_lareqa(data)
    assert [c["text"] for c in doc["candidates"]] == rs.cand_text


def test_embeddings_are_scored_with_figures_worked_out_by_hand(tmp_path, capsys):
    """Sentence k is e_k in both languages, q1 is e_0 and q2 e_1, except de q2, which is e_2 (wrong).
    Mo.: de (1 + 1/3) / 2 (q2's gold is behind e_2's sentence and, tied at 0, sentence 0), en 1:
    mAP 5/6, R@1 (1/2 + 1) / 2. Cr. the same. Mul.: de q2's golds sit at ranks 3 and 5 (both
    e_2 sentences first): AP (1/4 + 2/6) / 2 = 7/24, rank distance 2; every other query AP 1,
    distance 1: mAP ((1 + 7/24) / 2 + 1) / 2 = 79/96, bias ((1 + 2) / 2 + 1) / 2 = 1.25."""
    data = write_lareqa(tmp_path / "set")
    e = np.eye(3) * 2.0                                                  # not unit length: normalised there
    np.savez(tmp_path / "emb.npz", queries=e[[0, 2, 0, 1]], candidates=e[[0, 1, 2, 0, 1, 2]])
    out_json = str(tmp_path / "res.json")
    status, out, err = run(capsys, "--data", data, "--embeddings", str(tmp_path / "emb.npz"), "--out", out_json)
    assert status == 0, err
    assert "Mo.     map        0.833" in out and "Mo.     r@1        0.750" in out and "Mul.    map        0.823" in out
    with open(out_json) as f:
        res = json.load(f)
    assert res["mono"]["map"] == pytest.approx(5 / 6) and res["cross"]["map"] == pytest.approx(5 / 6)
    assert res["mono"]["r@1"] == pytest.approx(0.75) and res["cross"]["r@1"] == pytest.approx(0.75)
    assert res["multi"]["map"] == pytest.approx(79 / 96) and res["bias"]["rank_distance"] == pytest.approx(1.25)


@pytest.mark.parametrize("arrays,words", [
    ({"queries": np.ones((3, 4)), "candidates": np.ones((6, 4))}, "queries has shape (3, 4), expected (4, D)"),
    ({"queries": np.ones((4, 4)), "candidates": np.ones(6)}, "candidates has shape (6,), expected (6, D)"),
    ({"queries": np.ones((4, 4)), "candidates": np.ones((6, 5))},
     "queries (4, 4) and candidates (6, 5) differ in width"),
    ({"queries": np.ones((4, 4)), "embeddings": np.ones((6, 4))}, "no array candidates; expected queries and "
                                                                  "candidates, found queries, embeddings"),
    ({"queries": np.full((4, 4), np.nan), "candidates": np.ones((6, 4))}, "non-finite values in 4 rows"),
    ({"queries": np.array([["a"] * 4] * 4), "candidates": np.ones((6, 4))}, "queries holds <U1; expected numbers"),
])
def test_bad_embeddings_are_one_line(tmp_path, capsys, arrays, words):
    data = write_lareqa(tmp_path / "set")
    np.savez(tmp_path / "emb.npz", **arrays)
    status, out, err = run(capsys, "--data", data, "--embeddings", str(tmp_path / "emb.npz"))
    assert status == 2 and out == "" and len(err.splitlines()) == 1 and words in err, err


def test_bad_files_and_settings_are_one_line_before_loading(tmp_path, capsys, monkeypatch):
    data = write_lareqa(tmp_path / "set")
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "one.npy", np.ones(3))
    for name, words in (("text.npz", "not a NumPy .npz file"), ("one.npy", "one array; expected an .npz")):
        status, _, err = run(capsys, "--data", data, "--embeddings", str(tmp_path / name))
        assert status == 2 and len(err.splitlines()) == 1 and words in err, err
    monkeypatch.setattr(metrics_cmd, "load_lareqa", lambda *a: pytest.fail("data loaded before the settings"))
    for argv, words in (([], "nothing to do"), (["--embeddings", str(tmp_path / "one.npy")], "--embeddings: needs --data DIR"),
                        (["--data", data, "--cases", str(tmp_path / "c.json")], "only with --embeddings or --write-order"),
                        (["--data", str(tmp_path / "nope"), "--write-order", "o.json"], "no such folder"),
                        (["--data", data, "--embeddings", str(tmp_path / "missing.npz")], "no such file"),
                        (["--cases", "c.json", "--out", "r.json"], "--out r.json: only with --embeddings"),
                        (["--bogus"], "unrecognized arguments: --bogus")):
        status, _, err = run(capsys, *argv)
        assert status == 2 and len(err.splitlines()) == 1 and words in err, (argv, err)
