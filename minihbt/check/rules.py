"""HBT's rules for one batch, checked on a logged batch against the training data.

- xx-one-language: every triplet of an xx batch has its query and passages in one language,
  the same for the whole batch;
- xy-two-languages: every triplet of an xy batch has its query in one language and its
  passages in another;
- parallel-group: every triplet is in the data of the batch's source: the query is a query
  of its language, the positive a positive of its language, both of one parallel group (the
  same example, for xx), and every negative a passage (positive or hard negative) of the
  passage language;
- distinct-texts: no query text twice in a batch, no passage text (positive or negative) twice;
- one-source: every triplet comes from the batch's source (a triplet that is not in that
  source's data but is in another's breaks this rule, not parallel-group).

`batch_problems` gives, for one batch, the first problem of each rule it breaks.
"""
import json
from typing import Dict

RULES = ("xx-one-language", "xy-two-languages", "parallel-group", "distinct-texts", "one-source")


def short(text, width=40):
    """A text for a message: JSON-quoted, cut to `width` characters."""
    return json.dumps(text if len(text) <= width else text[:width - 1] + "…", ensure_ascii=False)


class DataIndex:
    """Where each text occurs in the training data, per (source, language): the parallel groups
    of each query and of each positive, and the set of passages (positives and negatives).
    An example without a group is a group of its own."""

    def __init__(self, examples):
        self.queries, self.positives, self.passages = {}, {}, {}
        for ex in examples:
            key, group = (ex.source, ex.lang), ex.group or ("example", ex.id)
            self.queries.setdefault(key, {}).setdefault(ex.query, set()).add(group)
            self.positives.setdefault(key, {}).setdefault(ex.positive, set()).add(group)
            self.passages.setdefault(key, set()).update((ex.positive,) + tuple(ex.negatives))
        self.sources = sorted({source for source, _ in self.queries})

    def problem(self, source, t):
        """Why triplet `t` is not a triplet of `source`'s data, or None if it is."""
        q_groups = self.queries.get((source, t.query_lang), {}).get(t.query)
        if not q_groups:
            return f"the query {short(t.query)} is not a {t.query_lang} query of {source}"
        p_groups = self.positives.get((source, t.passage_lang), {}).get(t.positive)
        if not p_groups:
            return f"the positive {short(t.positive)} is not a {t.passage_lang} positive of {source}"
        if not q_groups & p_groups:
            return (f"the query ({t.query_lang}) and the positive ({t.passage_lang}) share no parallel group in "
                    f"{source}: the positive does not answer the query")
        passages = self.passages[(source, t.passage_lang)]
        for neg in t.negatives:
            if neg not in passages:
                return f"the negative {short(neg)} is not a {t.passage_lang} passage of {source}"
        return None


def _languages(batch):
    if batch.kind == "xx":
        langs = sorted({t.query_lang for t in batch.triplets} | {t.passage_lang for t in batch.triplets})
        if len(langs) > 1:
            return {"xx-one-language": f"an xx batch in {len(langs)} languages ({', '.join(langs)})"}
        return {}
    for i, t in enumerate(batch.triplets, 1):
        if t.query_lang == t.passage_lang:
            return {"xy-two-languages": f"triplet {i} has its query and passages all in {t.query_lang}"}
    return {}


def _repeats(batch):
    queries, passages = set(), set()
    for i, t in enumerate(batch.triplets, 1):
        if t.query in queries:
            return f"triplet {i}: the query {short(t.query)} is already in the batch"
        queries.add(t.query)
        for text in (t.positive,) + t.negatives:
            if text in passages:
                return f"triplet {i}: the passage {short(text)} is already in the batch"
            passages.add(text)
    return None


def _provenance(batch, index):
    """{rule: message} for the triplets not in the data of the batch's source: one-source for
    the first that another source has, parallel-group for the first that no source has."""
    found = {}
    for i, t in enumerate(batch.triplets, 1):
        why = index.problem(batch.source, t)
        if why is None:
            continue
        elsewhere = [s for s in index.sources if s != batch.source and index.problem(s, t) is None]
        if elsewhere:
            found.setdefault("one-source", f"triplet {i} is from source {elsewhere[0]}, the batch from {batch.source}")
        else:
            found.setdefault("parallel-group", f"triplet {i}: {why}")
    return found


def batch_problems(batch, index) -> Dict[str, str]:
    """{rule: its first problem in `batch`} for each rule the batch breaks."""
    found = {**_provenance(batch, index), **_languages(batch)}
    repeat = _repeats(batch)
    if repeat:
        found["distinct-texts"] = repeat
    return found
