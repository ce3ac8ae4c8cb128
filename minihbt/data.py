"""Training and evaluation data: SQuAD-format QA files, LAReQA retrieval sets, JSONL.

A training example is (query, positive passage, hard negatives) in one language; examples
that translate each other share a `group` (for SQuAD-format sets: the question id, which
XQuAD and MLQA share across languages).
"""
import json
import os
import re
from dataclasses import dataclass, field, replace
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


def first_groups(rs, n):
    """(rs cut to its first n parallel question groups, how many groups it has): the questions
    whose id is among the first n (in file order, the first language first) and, as candidates,
    the sentences of their gold sentences' paragraphs. A quick look: a smaller ranking, whose
    figures are not the whole set's."""
    ids = list(dict.fromkeys(qid for lang in rs.languages for qid, _ in rs.queries[lang]))
    kept = set(ids[:n])
    paragraphs = {(rs.cand_lang[i], rs.cand_context[i]) for (qid, _), i in rs.gold.items() if qid in kept}
    keep = [i for i, key in enumerate(zip(rs.cand_lang, rs.cand_context)) if key in paragraphs]
    new_index = {old: new for new, old in enumerate(keep)}
    return replace(rs, cand_lang=[rs.cand_lang[i] for i in keep], cand_text=[rs.cand_text[i] for i in keep],
                   cand_context=[rs.cand_context[i] for i in keep],
                   queries={lang: [(q, t) for q, t in rs.queries[lang] if q in kept] for lang in rs.languages},
                   gold={key: new_index[i] for key, i in rs.gold.items() if key[0] in kept}), len(ids)


def _squad_paragraphs(path):
    """The paragraphs of a SQuAD-format file, every article's in order."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return [p for art in doc["data"] for p in art["paragraphs"]]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError):
        raise DataError(f"{path}: expected SQuAD format {{'data': [{{'paragraphs': [...]}}]}}") from None


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
        rs.queries[lang], rs.dropped[lang] = [], 0
        for pi, p in enumerate(_squad_paragraphs(path)):
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


# ----------------------------------------------------------------------------- training data
# file-name stems that name a language: ISO codes are used as they are
LANGUAGE_NAMES = {"arabic": "ar", "bengali": "bn", "english": "en", "finnish": "fi", "indonesian": "id",
                  "korean": "ko", "russian": "ru", "swahili": "sw", "telugu": "te", "german": "de",
                  "spanish": "es", "hindi": "hi", "vietnamese": "vi", "chinese": "zh", "greek": "el",
                  "thai": "th", "turkish": "tr", "arcd": "ar", "cmrc": "zh", "cmrc2018": "zh"}
_ISO = re.compile(r"^[a-z]{2,3}$")
_MLQA = re.compile(r"context-([a-z]{2,3})-question-([a-z]{2,3})")

# Sentence splitting for contexts without LAReQA `sentence_breaks`: a sentence ends after
# . ! ? ؟ (followed by whitespace), after 。！？।॥ (CJK and Devanagari stops, no space
# needed), or at a line break. Deterministic and language-agnostic; abbreviations such as
# "Dr." do split, which only makes the hard negatives a little shorter.
_SENTENCE_END = re.compile(r"(?<=[.!?\u061f])\s+|(?<=[\u3002\uff01\uff1f\u0964\u0965])\s*|\s*\n+\s*")


def split_sentences(context):
    """[(start, end)] character spans of the sentences of `context` (see _SENTENCE_END)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(context):
        if m.start() > start:
            spans.append((start, m.start()))
        start = m.end()
    if start < len(context):
        spans.append((start, len(context)))
    out = []
    for s, e in spans:                                   # trim surrounding whitespace
        while s < e and context[s].isspace():
            s += 1
        while e > s and context[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


def language_from_filename(path):
    """`ar.json` -> ar; `arabic_tydiqa_dev.json` -> ar; `arcd.json` -> ar; MLQA's
    `dev-context-ar-question-de.json` -> (ar, de) as a pair; None if no rule applies."""
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    m = _MLQA.search(stem)
    if m:
        return m.group(1), m.group(2)
    if _ISO.match(stem):
        return stem
    for token in re.split(r"[_\-.]", stem):
        if token in LANGUAGE_NAMES:
            return LANGUAGE_NAMES[token]
    return None


def read_squad(path, lang=None, source=None):
    """Training examples from a SQuAD-format file: (question, the sentence containing the
    answer, the other sentences of the paragraph as hard negatives), group = question id.

    Sentences come from LAReQA's `sentence_breaks` when present, else from split_sentences.
    Questions whose answer lies in no sentence are skipped. Returns (examples, n_skipped).
    """
    if lang is None:
        lang = language_from_filename(path)
        if isinstance(lang, tuple):
            if lang[0] != lang[1]:
                raise DataError(f"{path}: an MLQA file with context in {lang[0]} and questions in {lang[1]}; use the "
                                "same-language files (dev-context-X-question-X.json): the xy sampler pairs languages "
                                "itself through the shared question ids")
            lang = lang[0]
        if lang is None:
            raise DataError(f"{path}: cannot tell the language from the file name; name it like ar.json or give "
                            "--train LANG=PATH")
    source = source or os.path.splitext(os.path.basename(path))[0]
    examples, skipped = [], 0
    for pi, p in enumerate(_squad_paragraphs(path)):
        if "context" not in p or "qas" not in p:
            raise DataError(f"{path}: paragraph {pi} lacks 'context' or 'qas'")
        ctx = p["context"]
        if "sentence_breaks" in p and "sentences" in p:
            spans, texts = [tuple(b) for b in p["sentence_breaks"]], list(p["sentences"])
        else:
            spans = split_sentences(ctx)
            texts = [ctx[s:e] for s, e in spans]
        for qa in p["qas"]:
            try:
                qid, question = str(qa["id"]), qa["question"].strip()
                start = qa["answers"][0]["answer_start"] if qa.get("answers") else None
            except (KeyError, TypeError, AttributeError):
                raise DataError(f"{path}: paragraph {pi}: a question lacks 'id' or 'question'") from None
            hit = [k for k, (s, e) in enumerate(spans) if start is not None and s <= start < e]
            if not hit or not question:
                skipped += 1
                continue
            k = hit[0]
            negatives = tuple(t for j, t in enumerate(texts) if j != k and t != texts[k])
            examples.append(Example(id=qid, lang=lang, query=question, positive=texts[k], negatives=negatives,
                                    group=qid, source=source))
    return examples, skipped


def read_jsonl(path, source=None):
    """Training examples from JSON lines, one object a line:
        {"id": str, "lang": str, "query": str, "positive": str, "negatives": [str, ...], "group": str}
    `lang`, `query` and `positive` are required; `id` defaults to the line number, `negatives`
    to [], `group` (links translations of the same example) to the id."""
    source = source or os.path.splitext(os.path.basename(path))[0]
    examples = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            for key in ("lang", "query", "positive"):
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise DataError(f"{path}:{n}: field {key!r} is missing or not a non-empty string")
            negs = obj.get("negatives", [])
            if not isinstance(negs, list) or not all(isinstance(t, str) for t in negs):
                raise DataError(f"{path}:{n}: field 'negatives' must be a list of strings")
            ex_id = str(obj.get("id", n))
            examples.append(Example(id=ex_id, lang=obj["lang"], query=obj["query"], positive=obj["positive"],
                                    negatives=tuple(negs), group=str(obj.get("group", ex_id)), source=source))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def spec_path(spec):
    """(language or None, path) of a --train argument: `LANG=PATH` forces the language, unless
    the whole argument is an existing path."""
    if "=" in spec and not os.path.exists(spec):
        return tuple(spec.split("=", 1))
    return None, spec


def read_training_data(spec):
    """Examples from one --train argument: a SQuAD-format .json file, a directory of them, or
    a .jsonl file; `LANG=PATH` forces the language of SQuAD files. One source per argument,
    named after the file or directory. Returns (examples, report lines)."""
    lang, spec = spec_path(spec)
    path = spec.rstrip("/")
    source = os.path.splitext(os.path.basename(path))[0]
    if not os.path.exists(path):
        raise DataError(f"{path}: not found")
    if path.endswith(".jsonl"):
        ex = read_jsonl(path, source=source)
        return ex, [f"{path}: {len(ex)} examples"]
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
    if not files:
        raise DataError(f"{path}: no .json files")
    examples, report = [], []
    for f in files:
        guess = language_from_filename(f)
        if lang is None and isinstance(guess, tuple) and guess[0] != guess[1] and os.path.isdir(path):
            report.append(f"{f}: skipped (mixed-language MLQA file; xy batches pair languages by question id)")
            continue
        ex, skipped = read_squad(f, lang=lang, source=source)
        examples += ex
        report.append(f"{f}: {len(ex)} examples" + (f", {skipped} questions skipped (answer in no sentence)"
                                                    if skipped else ""))
    return examples, report
