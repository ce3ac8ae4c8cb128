"""One training step of hybrid batch training, in plain array code: the InfoNCE loss with its
candidate masks, the gradient of every parameter through the encoder, gradient clipping, AdamW
and the learning-rate schedule. `loss_and_grads` and `train_step` at the bottom put it together.

InfoNCE. Scores are cosine similarities (the embeddings are L2-normalised) divided by a
temperature tau (default 0.05, as sentence-transformers). Candidate columns are the batch's
positives (column i is query i's positive) followed by all its negatives. Which columns count
for query i is a boolean mask:
- `inbatch` (default): every positive and every negative of the batch; the target is the
  query's own positive (sentence-transformers MultipleNegativesRankingLoss, Tevatron).
- `paper`: exactly the denominator of the HBT paper's Eq. 1: the query's own positive plus
  all negatives of the batch, not the other queries' positives.
- in both, a candidate whose text duplicates the target's text is masked (a copy of the
  positive is no negative), and repeated texts count once.
- `symmetric=True` adds the passage -> query term (each positive scored against the batch's
  queries) and averages the two directions, as MultipleNegativesSymmetricRankingLoss.
The loss is the mean over queries of -log softmax(scores)[target].

AdamW (Loshchilov & Hutter) with the update of `torch.optim.AdamW`, step t = 1, 2, ...:
    p <- p * (1 - lr * wd)                      decoupled weight decay
    m <- m + (1 - b1) (g - m)                   (torch's lerp form of b1 m + (1 - b1) g)
    v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
No weight decay on biases and LayerNorm weights, as Hugging Face's Trainer (`no_decay`).
Clipping: the global L2 norm over all gradients, scaled by max_norm / (norm + 1e-6) when above
max_norm (torch.nn.utils.clip_grad_norm_). Schedule: linear warm-up from 0 over `warmup` steps,
then constant or linear decay to 0 at `total` (transformers' get_linear_schedule_with_warmup).

Dropout: text i of role r (0 queries, 1 passages) gets the masks of seed [seed, r, i] (dropout.py).
"""
import math

import numpy as np

from . import encoder
from .backend import to_numpy
from .dropout import DropoutStreams

CANDIDATES = ("inbatch", "paper")
SCHEDULES = ("constant", "linear")
QUERY, PASSAGE = 0, 1


def candidate_mask(target_texts, candidate_texts, own_only=None):
    """Boolean [B, M] mask of the candidates that count for each row; row i's target is column i.

    Column j is masked for row i when its text equals row i's target text (j != i), or when
    it repeats the text of an earlier column. `own_only`, if given (an int n), keeps of the
    first n columns only the row's own column (the `paper` denominator).
    """
    B, M = len(target_texts), len(candidate_texts)
    first = {}
    dup_of_earlier = np.zeros(M, dtype=bool)
    for j, t in enumerate(candidate_texts):
        if t in first:
            dup_of_earlier[j] = True
        else:
            first[t] = j
    mask = np.tile(~dup_of_earlier, (B, 1))                      # [B, M]
    for i, t in enumerate(target_texts):
        same = [j for j in range(M) if candidate_texts[j] == t] if t in first else []
        mask[i, same] = False
        mask[i, i] = True                                        # the target always counts
    if own_only is not None:
        mask[:, :own_only] &= np.eye(B, own_only, dtype=bool)
    return mask


def info_nce_forward(be, q, c, mask, temperature):
    """q [B, H], c [M, H] (L2-normalised), mask [B, M]; row i's target is column i.
    Returns (mean loss as a 0-d array, cache)."""
    xp = be.xp
    B = q.shape[0]
    scores = (q @ c.T) * (1.0 / temperature)                     # [B, M]
    scores = xp.where(xp.asarray(mask), scores, -xp.inf)
    row_max = scores.max(axis=1, keepdims=True)                  # [B, 1]
    shifted = scores - row_max
    lse = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))     # [B, 1]
    log_probs = shifted - lse                                    # [B, M], -inf where masked
    rows = xp.arange(B)
    loss = -log_probs[rows, rows].mean()
    return loss, (q, c, xp.exp(log_probs), temperature)


def info_nce_backward(be, d_loss, cache):
    """loss = mean_i(lse_i - s_ii), s = q c^T / tau
    => ds = (softmax(s) - onehot) / B;  dq = ds c / tau;  dc = ds^T q / tau."""
    q, c, probs, temperature = cache
    d_s = probs_minus_target(be, probs)                          # [B, M]
    d_s *= d_loss / (q.shape[0] * temperature)
    return d_s @ c, d_s.T @ q


def probs_minus_target(be, probs):
    """softmax(s) - onehot: each row's probabilities less 1 at its target, column i. [B, M]"""
    d_s = probs.copy()
    rows = be.xp.arange(probs.shape[0])
    d_s[rows, rows] -= 1.0
    return d_s


def contrastive_loss(be, q, c, query_texts, candidate_texts, temperature=0.05, candidates="inbatch",
                     symmetric=False, record=None):
    """The loss and its gradients with respect to q [B, H] and c [M, H] (see module doc).
    record(name, array), if given, receives the loss's tensors (record_loss)."""
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    B = q.shape[0]
    mask = candidate_mask(candidate_texts[:B], candidate_texts, own_only=B if candidates == "paper" else None)
    loss, cache = info_nce_forward(be, q, c, mask, temperature)
    if not symmetric:
        d_q, d_c = info_nce_backward(be, 1.0, cache)
        loss, cache_pq = float(loss), None
    else:       # passage -> query: positive i against all queries, target query i
        mask_pq = candidate_mask(query_texts, query_texts)
        loss_pq, cache_pq = info_nce_forward(be, c[:B], q, mask_pq, temperature)
        d_q, d_c = info_nce_backward(be, 0.5, cache)
        d_p, d_q2 = info_nce_backward(be, 0.5, cache_pq)
        d_q += d_q2
        d_c[:B] += d_p
        loss = 0.5 * (float(loss) + float(loss_pq))
    if record is not None:
        record_loss(be, record, loss, mask, cache, cache_pq)
    return loss, d_q, d_c


def record_loss(be, record, loss, mask, cache, cache_pq=None):
    """record(name, array) of the scores s = q c^T / tau [B, M], their mask, the loss and
    d loss / d s = (softmax(s) - onehot) / B (info_nce_backward's ds before its 1 / tau); with the
    passage -> query term (cache_pq), half of that plus half of the term's, which scores
    positive i against query j at s[j, i]."""
    q, c, probs, temperature = cache
    B = q.shape[0]
    d_s = probs_minus_target(be, probs) / B                      # [B, M]
    if cache_pq is not None:
        d_s *= 0.5
        d_s[:, :B] += 0.5 * probs_minus_target(be, cache_pq[2]).T / B
    for name, x in (("scores", (q @ c.T) * (1.0 / temperature)), ("mask", mask), ("loss", loss), ("grad/scores", d_s)):
        record(name, x)


# ----------------------------------------------------------------------------- optimiser


def no_decay(name):
    """Biases and LayerNorm weights get no weight decay."""
    return name.endswith(".bias") or "LayerNorm" in name


def scheduled_lr(step, lr, warmup=0, schedule="constant", total=None):
    """Learning rate of optimiser step `step` (0-based): linear warm-up from 0 over `warmup`
    steps, then `constant` (lr from then on, so a run can be extended) or `linear` (decay to
    0 at step `total`)."""
    if schedule == "linear":
        if total is None:
            raise ValueError("schedule 'linear' needs total, the step at which the rate reaches 0")
        return linear_schedule(step, lr, warmup, total)
    if schedule != "constant":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return lr * min(1.0, step / warmup) if warmup else lr


def linear_schedule(step, lr, warmup, total):
    """Warm-up, then linear decay to 0 at step `total`; with warm-up, the first step has lr 0."""
    if step < warmup:
        return lr * step / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so that their global L2 norm is at most max_norm; returns
    the norm before clipping. Squares are summed in float64, tensor by tensor, in dict order."""
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm!r}")
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= g.dtype.type(coef)
    return total


def adamw_update(p, g, m, v, lr, weight_decay, betas, eps, t):
    """AdamW step t on one tensor (or on some rows of one), in place on p, m and v."""
    b1, b2 = betas
    p *= p.dtype.type(1 - lr * weight_decay)
    m += (g - m) * m.dtype.type(1 - b1)
    v *= v.dtype.type(b2)
    v += (g * g) * v.dtype.type(1 - b2)
    denom = v ** 0.5 * v.dtype.type(1 / math.sqrt(1 - b2 ** t)) + v.dtype.type(eps)
    p -= (m / denom) * p.dtype.type(lr / (1 - b1 ** t))


class AdamW:
    """AdamW over the tensors of `params` (name -> array); `backend`: the model's (default: NumPy)."""

    def __init__(self, params, lr=3e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, backend=None):
        self.xp = xp = np if backend is None else backend.xp
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.t = 0
        self.m = {k: xp.zeros_like(p) for k, p in params.items()}
        self.v = {k: xp.zeros_like(p) for k, p in params.items()}

    def step(self, params, grads, lr=None):
        """One in-place update of the tensors this optimiser was built over."""
        lr = self.lr if lr is None else lr
        self.t += 1
        for name in self.m:
            self.update(name, params[name], grads[name], lr)

    def update(self, name, p, g, lr):
        if g.shape != p.shape:
            raise ValueError(f"gradient of {name} has shape {g.shape}, parameter {p.shape}")
        wd = 0.0 if no_decay(name) else self.weight_decay
        adamw_update(p, g, self.m[name], self.v[name], lr, wd, self.betas, self.eps, self.t)

    def state_dict(self):
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay,
                "m": {k: to_numpy(a) for k, a in self.m.items()}, "v": {k: to_numpy(a) for k, a in self.v.items()}}

    def load_state_dict(self, state):
        """What state_dict saved: the step count, the moments and the constants (as torch's AdamW)."""
        self.t = int(state["t"])
        self.lr, self.betas, self.eps = state["lr"], tuple(state["betas"]), state["eps"]
        self.weight_decay = state["weight_decay"]
        for k in self.m:
            self.m[k][...] = self.xp.asarray(state["m"][k])
            self.v[k][...] = self.xp.asarray(state["v"][k])


# ----------------------------------------------------------------------------- the step


def check_texts(texts, what="texts"):
    """A list of str, or a TypeError naming the first bad item."""
    if isinstance(texts, str):
        raise TypeError(f"{what}: expected a list of texts, not a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, not str")
    return texts


def check_batch(queries, positives, negatives):
    """The batch's lists, checked: B queries, B positives, None or B lists of negatives."""
    queries, positives = check_texts(queries, "queries"), check_texts(positives, "positives")
    B = len(queries)
    if B == 0 or len(positives) != B:
        raise ValueError(f"need as many positives as queries (got {B} queries, {len(positives)} positives)")
    if negatives is not None:
        if len(negatives) != B:
            raise ValueError(f"negatives must be a list of {B} lists (one per query), got {len(negatives)}")
        negatives = [check_texts(n, f"negatives[{i}]") for i, n in enumerate(negatives)]
    return queries, positives, negatives


def batch_texts(model, queries, positives, negatives):
    """The texts as the encoder sees them: queries with the query prefix; candidates (every
    positive, then every triplet's negatives in order) with the passage prefix."""
    q_pre, p_pre = model.prefixes["query"], model.prefixes["passage"]
    candidates = positives + [t for negs in (negatives or []) for t in negs]
    return [q_pre + t for t in queries], [p_pre + t for t in candidates]


def dropout_seeds(seed, role, start, n, dropout):
    """Dropout seeds of texts start .. start + n - 1 of a side (None: dropout off)."""
    return [[seed, role, start + i] for i in range(n)] if dropout else None


def tokenize(model, texts, max_length, seeds=None):
    """Texts -> padded (input_ids, attention_mask, token_type_ids) [B, T] and their
    DropoutStreams (None without seeds)."""
    ids, types = model.tokenizer.encode(texts, max_length=min(max_length, model.max_length))
    streams = DropoutStreams(seeds, [len(x) for x in ids]) if seeds is not None else None
    return model.tokenizer.pad(ids, types) + (streams,)


def loss_and_grads(model, queries, positives, negatives=None, temperature=0.05, candidates="inbatch",
                   dropout=False, symmetric=False, seed=None, max_query_length=512, max_passage_length=512):
    """InfoNCE loss of a batch and the gradient of every parameter of `model`: (loss, grads),
    grads a dict of numpy arrays with the names and shapes of model.params. Each side (the
    queries; the candidates) runs as one padded batch. dropout: its masks are a function of
    `seed` (None draws one) and of each text's place in the batch, so a step can be replayed."""
    queries, positives, negatives = check_batch(queries, positives, negatives)
    if dropout and seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    be, params, config, pooling = model.backend, model.params, model.config, model.pooling
    query_texts, cand_texts = batch_texts(model, queries, positives, negatives)
    embs, caches = [], []
    for texts, max_len, role in ((query_texts, max_query_length, QUERY), (cand_texts, max_passage_length, PASSAGE)):
        *batch, streams = tokenize(model, texts, max_len, dropout_seeds(seed, role, 0, len(texts), dropout))
        emb, cache = encoder.forward(be, params, config, pooling, *batch, streams=streams)   # [n, H]
        embs.append(emb)
        caches.append(cache)
    loss, d_q, d_c = contrastive_loss(be, embs[0], embs[1], query_texts, cand_texts, temperature, candidates, symmetric)
    grads = {}
    for d_emb, cache in zip((d_q, d_c), caches):
        encoder.backward(be, params, config, pooling, d_emb, cache, grads)
    return loss, {name: to_numpy(grads[name]) if name in grads else np.zeros(p.shape, p.dtype)
                  for name, p in params.items()}


def train_step(model, optimizer, queries, positives, negatives=None, lr=None, max_grad_norm=1.0, **loss_options):
    """One step of training: the loss and gradients, clipping, AdamW. Returns (loss, gradient norm)."""
    loss, grads = loss_and_grads(model, queries, positives, negatives, **loss_options)
    grads = {name: model.backend.asarray(g) for name, g in grads.items()}
    norm = clip_grad_norm(grads, max_grad_norm) if max_grad_norm else float("nan")
    optimizer.step(model.params, grads, lr)
    return loss, norm
