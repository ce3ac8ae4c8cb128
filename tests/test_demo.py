"""The built-in demo shows the paper's effect, on a shortened run: X-X batches leave the
synthetic languages unaligned, X-Y and hybrid batches align them while still retrieving
well within a language. The README's demo table is what the demo prints today."""
import os
import re

import train
from minihbt import demo
from minihbt.data import load_lareqa

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_world_is_parallel_with_disjoint_vocabularies(tmp_path):
    world = demo.make_world(seed=3, n_languages=3, n_entities=10, n_relations=4)
    vocabs = [set(world["vocab"][l].values()) for l in world["languages"]]
    assert all(not (a & b) for i, a in enumerate(vocabs) for b in vocabs[i + 1:])
    rs = load_lareqa(demo.lareqa_files(world, str(tmp_path / "eval"), "eval"))
    assert len(rs.cand_text) == 3 * 10 * 4
    ids = {l: {q for q, _ in rs.queries[l]} for l in rs.languages}
    assert ids[rs.languages[0]] == ids[rs.languages[1]] == ids[rs.languages[2]] and ids[rs.languages[0]]
    train_rs = load_lareqa(demo.lareqa_files(world, str(tmp_path / "train"), "train"))
    assert not (ids[rs.languages[0]] & {q for q, _ in train_rs.queries[rs.languages[0]]})   # held out
    # the gold sentence states the asked fact: it shares the entity and relation words
    qid, question = rs.queries["qa"][0]
    words = world["vocab"]["qa"]
    assert set(question.split()) - {"?", words["which"], words["of"]} <= set(rs.cand_text[rs.gold[(qid, "qa")]].split())


def test_shortened_demo_shows_the_effect(tmp_path):
    table = demo.run(train.main, str(tmp_path), seeds=(0,), steps=150, n_entities=24, log=lambda *a: None)[0]
    xx, xy, hy = table["xx"], table["xy"], table["hybrid"]
    for r in (xy, hy):
        assert r["cross"]["map"] > xx["cross"]["map"] + 0.3
        assert r["multi"]["map"] > xx["multi"]["map"] + 0.2
        assert r["bias"]["rank_distance"] < xx["bias"]["rank_distance"] / 2
    assert xx["mono"]["map"] > 0.9                                 # xx learns each language alone
    assert xx["cross"]["map"] < 0.2                                # ... and nothing across
    assert hy["mono"]["map"] > 0.8 and xy["mono"]["map"] > 0.8       # aligned, and still good within a language


def readme_demo_rows(seed):
    """The rows of README.md's demo table for `seed`."""
    with open(README, encoding="utf-8") as f:
        return [line.rstrip() for line in f if re.match(rf"\| {seed} \| (xx|xy|hybrid) \|", line)]


def test_readme_demo_table_is_what_the_demo_prints(tmp_path):
    """SLOW: the full seed-0 demo, three 300-step trainings (about 20 s on an idle 2-core CPU).
    When the training code changes the numbers, regenerate the README table with
    `python train.py --demo --demo-seeds 0,1,2` and check the paragraph around it still holds."""
    table = demo.run(train.main, str(tmp_path), seeds=(0,), log=lambda *a: None)
    printed = demo.format_table(table).splitlines()[2:]            # without the header
    assert len(printed) == 3 and readme_demo_rows(0) == printed
