"""Training and evaluation data: SQuAD-format QA files, LAReQA retrieval sets, JSONL.

A training example is (query, positive passage, hard negatives) in one language; examples
that translate each other share a `group` (for SQuAD-format sets: the question id, which
XQuAD and MLQA share across languages).
"""
import json
import os
from dataclasses import dataclass, field
from typing import Tuple


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line) and the problem."""


@dataclass(frozen=True)
class Example:
    id: str                      # unique within its source
    lang: str                    # language of the query and (for X-X) the passages
    query: str
    positive: str                # the sentence/passage that answers the query
    negatives: Tuple[str, ...] = field(default_factory=tuple)   # hard negatives, same language as positive
    group: str = ""              # examples sharing a group translate each other
    source: str = ""             # which dataset this came from (samplers never mix sources in a batch)


# ----------------------------------------------------------------------------- LAReQA
LAREQA_LANGUAGES = {
    "xquad-r": ["ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"],
    "mlqa-r": ["ar", "de", "en", "es", "hi", "vi", "zh"],
}


@dataclass
class RetrievalSet:
    """A LAReQA-style retrieval set (XQuAD-R, MLQA-R).

    Candidates are the sentences of every paragraph of every language, in a fixed order
    (languages as given, then file order); `cand_lang[i]`, `cand_text[i]`, `cand_context[i]`
    describe candidate i. `queries[lang]` is a list of (question id, question text).
    `gold[(qid, lang)]` is the index of the sentence in `lang` containing that question's
    answer; questions with the same id in different languages are parallel.
    """
    name: str
    languages: list
    cand_lang: list
    cand_text: list
    cand_context: list
    queries: dict
    gold: dict
    dropped: dict          # lang -> number of questions whose answer lies in no sentence
    files: list            # the files read, for cache keys

    def candidates_of(self, lang):
        """Indices of the candidates in `lang`."""
        return [i for i, l in enumerate(self.cand_lang) if l == lang]


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def load_lareqa(data_dir, languages=None, name=None):
    """Read `{lang}.json` files of a LAReQA set (SQuAD format with `sentences` and
    `sentence_breaks` per paragraph) from `data_dir`.

    The gold candidate of a question is the sentence whose [start, end) break contains the
    answer's `answer_start`. Questions whose answer lies in no sentence are dropped and
    counted in `dropped`.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: data directory not found")
    if languages is None:
        languages = sorted(f[:-5] for f in os.listdir(data_dir) if f.endswith(".json"))
        if not languages:
            raise DataError(f"{data_dir}: no {{lang}}.json files")
    rs = RetrievalSet(name=name or os.path.basename(os.path.normpath(data_dir)), languages=list(languages),
                      cand_lang=[], cand_text=[], cand_context=[], queries={}, gold={}, dropped={}, files=[])
    for lang in languages:
        path = os.path.join(data_dir, f"{lang}.json")
        rs.files.append(path)
        doc = _load_json(path)
        rs.queries[lang], rs.dropped[lang] = [], 0
        try:
            paragraphs = [p for art in doc["data"] for p in art["paragraphs"]]
        except (KeyError, TypeError):
            raise DataError(f"{path}: expected SQuAD format {{'data': [{{'paragraphs': [...]}}]}}") from None
        for pi, p in enumerate(paragraphs):
            try:
                sentences, breaks, qas = p["sentences"], p["sentence_breaks"], p["qas"]
            except KeyError as e:
                raise DataError(f"{path}: paragraph {pi} has no {e.args[0]!r} field (a LAReQA file has "
                                "'sentences' and 'sentence_breaks')") from None
            if len(sentences) != len(breaks):
                raise DataError(f"{path}: paragraph {pi} has {len(sentences)} sentences but "
                                f"{len(breaks)} sentence_breaks")
            first = len(rs.cand_text)
            for s in sentences:
                rs.cand_lang.append(lang)
                rs.cand_text.append(s)
                rs.cand_context.append(p.get("context", ""))
            for qa in qas:
                try:
                    qid, question, start = qa["id"], qa["question"], qa["answers"][0]["answer_start"]
                except (KeyError, IndexError, TypeError):
                    raise DataError(f"{path}: paragraph {pi}: a question lacks id/question/answers[0].answer_start") \
                        from None
                hit = [k for k, (b, e) in enumerate(breaks) if b <= start < e]
                if not hit:
                    rs.dropped[lang] += 1
                    continue
                if (qid, lang) in rs.gold:
                    raise DataError(f"{path}: question id {qid!r} appears twice")
                rs.queries[lang].append((qid, question))
                rs.gold[(qid, lang)] = first + hit[0]
    return rs
