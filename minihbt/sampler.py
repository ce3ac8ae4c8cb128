"""Batch samplers for hybrid batch training (HBT, arXiv 2408.10536).

A batch is a tuple of triplets (query, positive, negatives) with metadata. Three samplers:

- ``"xx"`` (monolingual, X-X): every triplet of a batch is in one language L: query, positive
  and negatives come from one example of language L. L is drawn uniformly over the languages
  of the batch's source (the paper's rule), or in proportion to their numbers of examples with
  ``xx_language_weighting="proportional"``.
- ``"xy"`` (cross-lingual, X-Y): each triplet takes its query from an example in language X
  and its positive and negatives from an example in language Y != X of the same parallel
  ``group``; the ordered pair (X, Y) is drawn uniformly among the ordered pairs of languages
  that group has. Groups with a single language (or an empty ``group``) are never used.
- ``"hybrid"``: each batch is X-X with probability ``alpha``, else X-Y.

Rules common to all three:

- Each batch comes from one source, drawn with probability proportional to its number of
  examples; batches never mix sources.
- No query text appears twice in a batch, and no passage text (positive or negative) appears
  twice in a batch. A candidate whose query or positive is already in the batch is held back
  (it is tried first in the next batch from the same pool); a negative that repeats a passage
  already in the batch, or its own positive, is dropped from its triplet. ``max_negatives``
  keeps at most that many of the remaining negatives, in their original order.
- Epoch length: ``len(sampler) == total number of examples (all sources) // batch_size``, and
  every batch has exactly ``batch_size`` triplets.
- ``batches(epoch)`` is a pure function of ``(seed, epoch)``: all randomness comes from
  ``numpy.random.default_rng([seed, epoch])``, so identical inputs give identical batches
  (across calls and objects) and each epoch has its own order.
- Within an epoch, each pool (X-X: one source and language, walked by example; X-Y: one
  source, walked by parallel group) is visited in a shuffled order without replacement and
  reshuffled when exhausted, so every example is seen about equally often.

At construction, every pool the sampler can draw from must be able to fill a whole batch with
distinct texts; a ``ValueError`` names the pool and its counts otherwise. For that check a set
of mutually compatible candidates is found greedily; should a walk ever get stuck (all
remaining candidates clash with the batch so far, possible only with heavily duplicated
texts), the batch is drawn at random from that set instead.
"""
import bisect
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .data import Example

SAMPLERS = ("xx", "xy", "hybrid")
LANGUAGE_WEIGHTINGS = ("uniform", "proportional")


@dataclass(frozen=True)
class Triplet:
    query: str
    positive: str
    negatives: Tuple[str, ...]
    query_lang: str
    passage_lang: str              # language of the positive and the negatives
    group: str
    source: str


@dataclass(frozen=True)
class Batch:
    kind: str                      # "xx" or "xy"
    source: str
    lang: str                      # X-X: the batch's language; X-Y: "" (mixed)
    triplets: Tuple[Triplet, ...]


class _BatchBuilder:
    """Collects the triplets of one batch, refusing any that would repeat a query or passage text."""

    def __init__(self, examples, max_negatives):
        self.examples, self.max_negatives = examples, max_negatives
        self.triplets: List[Triplet] = []
        self.queries, self.passages = set(), set()

    def add(self, query_idx, passage_idx):
        """Add the triplet (query of example query_idx, passages of passage_idx); False if it clashes."""
        q_ex, p_ex = self.examples[query_idx], self.examples[passage_idx]
        if q_ex.query in self.queries or p_ex.positive in self.passages:
            return False
        kept, seen = [], {p_ex.positive}
        for neg in p_ex.negatives:
            if self.max_negatives is not None and len(kept) >= self.max_negatives:
                break
            if neg not in seen and neg not in self.passages:
                kept.append(neg)
                seen.add(neg)
        self.queries.add(q_ex.query)
        self.passages |= seen
        self.triplets.append(Triplet(q_ex.query, p_ex.positive, tuple(kept), q_ex.lang, p_ex.lang,
                                     p_ex.group, p_ex.source))
        return True


class _Pool:
    """What one kind of batch draws from: units (X-X: example indices; X-Y: parallel groups,
    each a sorted list of (lang, example indices)) and how a unit becomes a candidate triplet,
    i.e. a pair (query example index, passage example index)."""

    def __init__(self, kind, units):
        self.kind, self.units = kind, units
        self.compatible: List[Tuple[int, int]] = []   # filled by the construction-time check

    def candidate(self, unit, rng):
        """X-X: the example itself. X-Y: an ordered language pair (X, Y), X != Y, drawn uniformly
        from the group's languages, then an example of each (uniformly, if it has several)."""
        if self.kind == "xx":
            return unit, unit
        langs = unit                                                             # [(lang, [idx, ...]), ...]
        n = len(langs)
        x, y = divmod(int(rng.integers(n * (n - 1))), n - 1)                     # one of n(n-1) ordered pairs
        if y >= x:                                                               # skip the diagonal X == Y
            y += 1
        pick = lambda idxs: idxs[int(rng.integers(len(idxs)))] if len(idxs) > 1 else idxs[0]
        return pick(langs[x][1]), pick(langs[y][1])

    def example_indices(self):
        if self.kind == "xx":
            return list(self.units)
        return [i for unit in self.units for _, idxs in unit for i in idxs]

    def all_candidates(self, unit):
        """Every candidate a unit can give, in a fixed order (for the construction-time check)."""
        if self.kind == "xx":
            return [(unit, unit)]
        return [(qi, pi) for (_, q_idxs), (_, p_idxs) in itertools.permutations(unit, 2)
                for qi in q_idxs for pi in p_idxs]


def _draw(rng, cumulative):
    """Index i drawn with probability proportional to cumulative[i] - cumulative[i-1]."""
    return min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(cumulative) - 1)


class HBTSampler:
    """X-X, X-Y or hybrid batches over `examples`; see the module docstring for the rules."""

    def __init__(self, examples: Sequence[Example], batch_size: int, sampler: str = "hybrid",
                 alpha: float = 0.5, seed: int = 0, xx_language_weighting: str = "uniform",
                 max_negatives: Optional[int] = None):
        self.examples = list(examples)
        if not self.examples:
            raise ValueError("HBTSampler needs at least one example")
        self._configure(batch_size, sampler, alpha, seed, xx_language_weighting, max_negatives)

    def _configure(self, batch_size, sampler, alpha, seed, xx_language_weighting, max_negatives):
        """Validate the configuration and index the examples into pools."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
        if not 0.0 <= alpha <= 1.0:                                              # also rejects NaN
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if xx_language_weighting not in LANGUAGE_WEIGHTINGS:
            raise ValueError(f"unknown xx_language_weighting {xx_language_weighting!r}; "
                             f"expected one of {', '.join(LANGUAGE_WEIGHTINGS)}")
        if max_negatives is not None and (isinstance(max_negatives, bool) or
                                          not isinstance(max_negatives, (int, np.integer)) or max_negatives < 0):
            raise ValueError(f"max_negatives must be None or a non-negative integer, got {max_negatives!r}")
        self.batch_size, self.sampler, self.alpha, self.seed = int(batch_size), sampler, alpha, int(seed)
        self.xx_language_weighting = xx_language_weighting
        self.max_negatives = None if max_negatives is None else int(max_negatives)
        # probability that a batch is X-X: the pure samplers are hybrids with alpha 1 or 0
        self._p_xx = {"xx": 1.0, "xy": 0.0, "hybrid": alpha}[sampler]

        by_source: Dict[str, Dict[str, List[int]]] = {}                          # source -> lang -> [idx]
        groups: Dict[str, Dict[str, Dict[str, List[int]]]] = {}                  # source -> group -> lang -> [idx]
        for i, ex in enumerate(self.examples):
            by_source.setdefault(ex.source, {}).setdefault(ex.lang, []).append(i)
            if ex.group:
                groups.setdefault(ex.source, {}).setdefault(ex.group, {}).setdefault(ex.lang, []).append(i)
        self._sources = sorted(by_source)
        sizes = [sum(len(v) for v in by_source[s].values()) for s in self._sources]
        self._source_cum = list(itertools.accumulate(sizes))
        self._langs: Dict[str, Tuple[List[str], List[int]]] = {}                 # source -> (langs, cumulative weights)
        self._pools: Dict[Tuple[str, str, str], _Pool] = {}                      # (kind, source, lang) -> pool
        for source in self._sources:
            langs = sorted(by_source[source])
            weights = [len(by_source[source][l]) if xx_language_weighting == "proportional" else 1 for l in langs]
            self._langs[source] = (langs, list(itertools.accumulate(weights)))
            if self._p_xx > 0.0:
                for lang in langs:
                    pool = _Pool("xx", by_source[source][lang])
                    self._check(pool, f"source {source!r}, language {lang!r}: cannot fill an X-X batch of "
                                      f"{self.batch_size}: its {len(pool.units)} examples")
                    self._pools[("xx", source, lang)] = pool
            if self._p_xx < 1.0:
                parallel = [sorted(by_lang.items()) for _, by_lang in sorted(groups.get(source, {}).items())
                            if len(by_lang) >= 2]
                if not parallel:
                    raise ValueError(f"source {source!r} has no parallel group with 2+ languages (examples "
                                     f"sharing a `group` in different languages), so it cannot give X-Y batches; "
                                     f"use sampler='xx' or hybrid with alpha=1, or drop the source")
                pool = _Pool("xy", parallel)
                self._check(pool, f"source {source!r}: cannot fill an X-Y batch of {self.batch_size}: "
                                  f"its {len(parallel)} groups with 2+ languages")
                self._pools[("xy", source, "")] = pool

    def _check(self, pool, what):
        """Greedily find mutually compatible candidates; raise if they cannot fill one batch."""
        builder = _BatchBuilder(self.examples, self.max_negatives)
        for unit in pool.units:
            for query_idx, passage_idx in pool.all_candidates(unit):
                if builder.add(query_idx, passage_idx):
                    pool.compatible.append((query_idx, passage_idx))
                    break
        if len(pool.compatible) < self.batch_size:
            idxs = pool.example_indices()
            n_queries = len({self.examples[i].query for i in idxs})
            n_positives = len({self.examples[i].positive for i in idxs})
            raise ValueError(f"{what} have {n_queries} distinct queries and {n_positives} distinct positives, "
                             f"giving only {len(pool.compatible)} triplets with distinct texts")

    def __len__(self) -> int:
        """Batches per epoch: the total number of examples // batch_size."""
        return len(self.examples) // self.batch_size

    def batches(self, epoch: int) -> List[Batch]:
        """The `len(self)` batches of `epoch`, a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        queues: Dict[Tuple[str, str, str], deque] = {}                          # pool key -> units left this pass
        out = []
        for _ in range(len(self)):
            source = self._sources[_draw(rng, self._source_cum)]
            if rng.random() < self._p_xx:
                langs, cumulative = self._langs[source]
                key = ("xx", source, langs[_draw(rng, cumulative)])
            else:
                key = ("xy", source, "")
            triplets = self._fill(self._pools[key], queues.setdefault(key, deque()), rng)
            out.append(Batch(kind=key[0], source=source, lang=key[2], triplets=triplets))
        return out

    def _fill(self, pool, queue, rng):
        """Walk the pool's shuffled queue until the batch is full; clashing units are held back
        and put in front of the queue again for the next batch from this pool."""
        builder = _BatchBuilder(self.examples, self.max_negatives)
        held, refills = [], 0
        while len(builder.triplets) < self.batch_size:
            if not queue:
                if refills == 2:                     # a whole shuffled pass did not complete the batch
                    return self._fallback(pool, rng)
                queue.extend(rng.permutation(len(pool.units)).tolist())
                refills += 1
            position = queue.popleft()
            if not builder.add(*pool.candidate(pool.units[position], rng)):
                held.append(position)
        queue.extendleft(reversed(held))
        return tuple(builder.triplets)

    def _fallback(self, pool, rng):
        """A batch drawn at random from the compatible candidates found at construction (kept in
        their construction order, in which any subset is clash-free)."""
        chosen = np.sort(rng.choice(len(pool.compatible), size=self.batch_size, replace=False))
        builder = _BatchBuilder(self.examples, self.max_negatives)
        for c in chosen:
            if not builder.add(*pool.compatible[c]):
                raise RuntimeError("internal error: construction-time candidates clash")
        return tuple(builder.triplets)

    def distributions(self) -> dict:
        """The probabilities this sampler draws with, read from its own tables (for checking
        another sampler's batches against them, `python -m minihbt.check batches`):
        {"xx": P(a batch is X-X), "sources": {source: P(source)},
         "xx_languages": {source: {lang: P(lang | X-X batch of source)}},
         "xy_pairs": {source: {(X, Y): P(pair | X-Y triplet of source)}}}.
        An X-Y pool walks its parallel groups in shuffled passes, so each group gives about
        as many triplets as any other, and each triplet's ordered pair is uniform over the
        n(n-1) pairs of its group's n languages: P(X, Y) is the mean over the groups of
        1 / (n(n-1)) where the group has both X and Y. Sources without a pool of a kind the
        sampler draws are absent from that kind's table."""
        shares = np.diff([0] + self._source_cum) / self._source_cum[-1]
        out = {"xx": self._p_xx, "sources": dict(zip(self._sources, shares.tolist())),
               "xx_languages": {}, "xy_pairs": {}}
        for source in self._sources:
            langs, cumulative = self._langs[source]
            if self._p_xx > 0.0:
                weights = np.diff([0] + cumulative) / cumulative[-1]
                out["xx_languages"][source] = dict(zip(langs, weights.tolist()))
            pool = self._pools.get(("xy", source, ""))
            if pool is not None:
                pairs: Dict[Tuple[str, str], float] = {}
                for unit in pool.units:
                    n = len(unit)
                    for (x, _), (y, _) in itertools.permutations(unit, 2):
                        pairs[(x, y)] = pairs.get((x, y), 0.0) + 1.0 / (n * (n - 1) * len(pool.units))
                out["xy_pairs"][source] = pairs
        return out

    def state_dict(self) -> dict:
        """The configuration that, with the same examples, determines every epoch's batches (JSON-serialisable)."""
        return {"batch_size": self.batch_size, "sampler": self.sampler, "alpha": self.alpha, "seed": self.seed,
                "xx_language_weighting": self.xx_language_weighting, "max_negatives": self.max_negatives,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a configuration saved by `state_dict` (the examples must be the same)."""
        state = dict(state)
        n = state.pop("num_examples", len(self.examples))
        if n != len(self.examples):
            raise ValueError(f"state_dict was saved for {n} examples, this sampler has {len(self.examples)}")
        self._configure(**state)
