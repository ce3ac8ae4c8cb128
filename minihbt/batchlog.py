"""The batch log: the batches a trainer takes its steps on, one JSON object a line.

    {"step": 1, "kind": "xy", "source": "mlqa-r", "triplets": [
        {"query": "...", "query_lang": "de", "positive": "...", "negatives": ["...", ...],
         "passage_lang": "en", "group": "..."}, ...]}

`kind` is "xx" or "xy"; `source` names the data source the batch is drawn from (the file or
folder name, as minihbt's data readers name it); `passage_lang` is the language of the
positive and the negatives. `step`, `group` and any other field are optional and not read.
docs/batch-log.md is the full description. minihbt writes its own batches in this schema
(train.py --batch-log, `python -m minihbt.check log`); `read_batch_log` reads any trainer's.
"""
import json
from dataclasses import dataclass
from typing import Tuple

from .files import atomic_path

KINDS = ("xx", "xy")


class LogError(ValueError):
    """A batch log that does not follow the schema; the message names the file and line."""


@dataclass(frozen=True)
class LoggedTriplet:
    query: str
    query_lang: str
    positive: str
    negatives: Tuple[str, ...]
    passage_lang: str


@dataclass(frozen=True)
class LoggedBatch:
    line: int                      # line number in the log, from 1
    kind: str
    source: str
    triplets: Tuple[LoggedTriplet, ...]


# ----------------------------------------------------------------------------- writing

def batch_record(batch, step=None):
    """A minihbt sampler Batch as one log object; `step` (from 1) is added when given."""
    record = {} if step is None else {"step": step}
    record.update(kind=batch.kind, source=batch.source, triplets=[
        {"query": t.query, "query_lang": t.query_lang, "positive": t.positive, "negatives": list(t.negatives),
         "passage_lang": t.passage_lang, "group": t.group} for t in batch.triplets])
    return record


def batch_line(batch, step):
    """One line of the log: the batch of training step `step` (from 1) as JSON, newline-terminated."""
    return json.dumps(batch_record(batch, step), ensure_ascii=False) + "\n"


def sampler_batches(sampler, count):
    """The batches of training steps 0 .. count-1: epoch 0's batches in order, then epoch 1's, ..."""
    epoch = 0
    while count > 0:
        batches = sampler.batches(epoch)[:count]
        yield from batches
        count -= len(batches)
        epoch += 1


def write_batch_log(batches, path):
    """Write `batches` (minihbt sampler Batches, in step order) to `path`, one line each, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for step, batch in enumerate(batches, 1):
            f.write(batch_line(batch, step))


class BatchLog:
    """train.py's --batch-log: each batch a step was taken on, one line as it is taken.
    A run starting at step N > 0 (a resume) first writes the batches of steps 1..N again,
    composed by the sampler (a pure function of its seed and the epoch), so the file holds
    the whole run as if it had never stopped. Without a path it does nothing."""

    def __init__(self, path, sampler, start_step):
        self.path, self.sampler, self.step, self.file = path, sampler, start_step, None

    def __enter__(self):
        if self.path:
            self.file = open(self.path, "w", encoding="utf-8")
            for step, batch in enumerate(sampler_batches(self.sampler, self.step), 1):
                self.file.write(batch_line(batch, step))
            self.file.flush()
        return self

    def add(self, batch):
        """Log the batch of the step just taken."""
        self.step += 1
        if self.file:
            self.file.write(batch_line(batch, self.step))
            self.file.flush()

    def __exit__(self, *exc):
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------- reading

def _text(obj, key, where):
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise LogError(f"{where}: field {key!r} must be a non-empty string, got {json.dumps(value)[:60]}")
    return value


def _triplet(obj, where):
    if not isinstance(obj, dict):
        raise LogError(f"{where}: expected a triplet object, got {type(obj).__name__}")
    negatives = obj.get("negatives", [])
    if not isinstance(negatives, list) or not all(isinstance(t, str) and t for t in negatives):
        raise LogError(f"{where}: field 'negatives' must be a list of non-empty strings")
    return LoggedTriplet(query=_text(obj, "query", where), query_lang=_text(obj, "query_lang", where),
                         positive=_text(obj, "positive", where), negatives=tuple(negatives),
                         passage_lang=_text(obj, "passage_lang", where))


def parse_batch(obj, where, line):
    """A LoggedBatch from one decoded line; LogError naming `where` and the field otherwise."""
    if not isinstance(obj, dict):
        raise LogError(f"{where}: expected a JSON object (one batch), got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise LogError(f"{where}: field 'kind' must be \"xx\" or \"xy\", got {json.dumps(kind)[:60]}")
    source = _text(obj, "source", where)
    triplets = obj.get("triplets")
    if not isinstance(triplets, list) or not triplets:
        raise LogError(f"{where}: field 'triplets' must be a non-empty list of triplet objects")
    return LoggedBatch(line=line, kind=kind, source=source,
                       triplets=tuple(_triplet(t, f"{where}: triplet {i}") for i, t in enumerate(triplets, 1)))


def read_batch_log(path):
    """The batches of a log file (blank lines skipped); LogError for anything off the schema."""
    batches = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                obj = json.loads(line) if line.strip() else None
            except UnicodeDecodeError:
                raise LogError(f"{path}:{n}: not UTF-8 text; a batch log is JSON lines (docs/batch-log.md)") from None
            except json.JSONDecodeError as e:
                raise LogError(f"{path}:{n}: not JSON ({e.msg}); a batch log has one JSON object per line "
                               "(docs/batch-log.md)") from None
            if line.strip():
                batches.append(parse_batch(obj, f"{path}:{n}", n))
    if not batches:
        raise LogError(f"{path}: no batches in it")
    return batches
