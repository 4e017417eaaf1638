"""Quality metrics as llama.cpp's perplexity tool defines them, from a reference and a test model's logits.

Per scored position (the second half of each context window, each position predicting the next
token) the reference's full distribution is kept, as llama-perplexity's --kl-divergence-base does:
log-probabilities quantized to uint16 on a per-position linear scale over [max(min log p, -40), 0]
(error at most 3e-4 nats per entry; anything rarer than e^-40 is clamped there), plus its argmax,
its exact log-probability of the true next token, and two sums over the decoded distribution that
every comparison needs (sum p log p and sum p), so they are computed once, not once per test model.

Scoring a test model is then, per position, KLD = sum p log p - sum p (x - m) + log sum e^(x - m) * sum p
(x its logits, m their max): one decode of the stored row and five passes over the logits, in row
chunks small enough to stay in cache, spread over threads (numpy releases the GIL).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

LOGP_FLOOR = -40.0
LEVELS = 65535
CHUNK_ROWS = 8  # rows scored at a time: two float32 temporaries of 8 x vocab stay in cache


@dataclass
class RefPositions:
    """The reference's view of the scored positions."""

    logp_u16: np.ndarray  # uint16 [n, vocab]: log p = lo + u * step (lo includes the renormalisation)
    lo: np.ndarray  # float32 [n]
    step: np.ndarray  # float32 [n]
    top1: np.ndarray  # int32 [n]
    target_logp: np.ndarray  # float32 [n]
    neg_entropy: np.ndarray  # float64 [n]: sum p log p of the decoded distribution
    mass: np.ndarray  # float64 [n]: sum p of the decoded distribution (1 to float32 rounding)

    FIELDS = ("logp_u16", "lo", "step", "top1", "target_logp", "neg_entropy", "mass")

    def __len__(self) -> int:
        return self.top1.shape[0]

    def rows(self, sl: slice) -> "RefPositions":
        return RefPositions(*(getattr(self, f)[sl] for f in self.FIELDS))

    def logp(self) -> np.ndarray:
        """Decoded log-probabilities: float32 [n, vocab]."""
        return _decode(self.logp_u16, self.lo, self.step)

    @staticmethod
    def concat(parts: list["RefPositions"]) -> "RefPositions":
        return RefPositions(*(np.concatenate([getattr(p, f) for p in parts]) for f in RefPositions.FIELDS))


def _decode(u: np.ndarray, lo: np.ndarray, step: np.ndarray) -> np.ndarray:
    lp = u.astype(np.float32)
    lp *= step[:, None]
    lp += lo[:, None]
    return lp


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (float64 for the normaliser)."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    z = np.log(np.exp(x - m, dtype=np.float32).sum(axis=-1, keepdims=True, dtype=np.float64))
    return (x - m - z.astype(np.float32)).astype(np.float32)


def reference_positions(logits: np.ndarray, targets: np.ndarray) -> RefPositions:
    """Reduce reference logits [n, vocab] (positions predicting `targets` [n]) to what eval keeps."""
    lp = log_softmax(logits)
    lo = np.maximum(lp.min(axis=1), LOGP_FLOOR).astype(np.float32)
    step = (-lo / LEVELS).astype(np.float32)
    step = np.where(step > 0, step, np.float32(1.0))
    u = np.rint((np.maximum(lp, lo[:, None]) - lo[:, None]) / step[:, None])
    u = np.clip(u, 0, LEVELS).astype(np.uint16)
    target = lp[np.arange(len(targets)), targets]
    top1 = lp.argmax(axis=1).astype(np.int32)
    del lp
    dec = _decode(u, lo, step)  # renormalise what is stored, so the decoded rows are distributions
    m = dec.max(axis=1, keepdims=True)
    lo = (lo - (m[:, 0] + np.log(np.exp(dec - m).sum(axis=1, dtype=np.float64))).astype(np.float32)).astype(np.float32)
    dec = _decode(u, lo, step)
    p = np.exp(dec)
    neg_entropy = (p.astype(np.float64) * dec).sum(axis=1)
    mass = p.sum(axis=1, dtype=np.float64)
    return RefPositions(u, lo, step, top1, target.astype(np.float32), neg_entropy, mass)


@dataclass
class PositionScores:
    """Per scored position: the test model's NLL of the true token, KLD from the reference, same argmax."""

    nll: np.ndarray
    ref_nll: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray

    @staticmethod
    def concat(parts: list["PositionScores"]) -> "PositionScores":
        return PositionScores(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                                ("nll", "ref_nll", "kld", "same_top")))


def _score_rows(ref: RefPositions, x: np.ndarray, targets: np.ndarray, out: PositionScores, sl: slice) -> None:
    x = np.asarray(x, dtype=np.float32)
    m = x.max(axis=1)
    top = x.argmax(axis=1)
    p = np.exp(_decode(ref.logp_u16, ref.lo, ref.step))
    t = x - m[:, None]
    p *= t
    cross = p.sum(axis=1, dtype=np.float64)  # sum p (x - m)
    np.exp(t, out=t)
    lse = np.log(t.sum(axis=1, dtype=np.float64))  # log sum e^(x - m)
    n = len(targets)
    out.nll[sl] = lse - (x[np.arange(n), targets] - m)
    out.kld[sl] = np.maximum(ref.neg_entropy - cross + lse * ref.mass, 0.0)
    out.same_top[sl] = top == ref.top1


_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def score(ref: RefPositions, logits: np.ndarray, targets: np.ndarray, threads: int = 0) -> PositionScores:
    """Compare the test model's logits [n, vocab] with the reference at the same positions (`logits` may be
    a view into a runtime's buffer: it is only read)."""
    global _pool
    n = len(targets)
    out = PositionScores(np.empty(n), -ref.target_logp.astype(np.float64), np.empty(n), np.empty(n, bool))
    chunks = [slice(i, min(n, i + CHUNK_ROWS)) for i in range(0, n, CHUNK_ROWS)]
    work = lambda sl: _score_rows(ref.rows(sl), logits[sl], targets[sl], out, sl)  # noqa: E731
    threads = threads or _threads()
    if threads > 1 and len(chunks) > 1:
        if _pool is None or _pool._max_workers != threads:
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="qwqq-score")
        list(_pool.map(work, chunks))
    else:
        for sl in chunks:
            work(sl)
    return out


@dataclass
class Summary:
    tokens: int
    ppl: float
    ppl_err: float
    ref_ppl: float
    kld_mean: float
    kld_err: float
    kld_median: float
    kld_p99: float
    kld_max: float
    same_top: float
    same_top_err: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def summarize(s: PositionScores) -> Summary:
    """PPL, KLD mean (with its standard error), median, p99, max, and the same-top-token rate, as
    llama-perplexity --kl-divergence reports them."""
    n = len(s.nll)
    mean_nll = float(s.nll.mean())
    ppl = math.exp(mean_nll)
    ppl_err = ppl * float(s.nll.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    kld = s.kld
    p = float(s.same_top.mean())
    return Summary(
        tokens=n, ppl=ppl, ppl_err=ppl_err, ref_ppl=math.exp(float(s.ref_nll.mean())),
        kld_mean=float(kld.mean()), kld_err=float(kld.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan"),
        kld_median=float(np.median(kld)), kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld.max()),
        same_top=p, same_top_err=math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan"))
