"""Quality metrics as llama.cpp's perplexity tool defines them, from a reference and a test model's logits.

Per scored position (the second half of each context window, each position predicting the next
token) the reference's full distribution is kept, as llama-perplexity's --kl-divergence-base does:
log-probabilities quantized to uint16 on a per-position linear scale over [max(min log p, -40), 0]
(error at most 3e-4 nats per entry; anything rarer than e^-40 is clamped there), plus its argmax
and its exact log-probability of the true next token. The test model's logits are reduced at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LOGP_FLOOR = -40.0
LEVELS = 65535


@dataclass
class RefPositions:
    """The reference's view of the scored positions."""

    logp_u16: np.ndarray  # uint16 [n, vocab]: log p = lo + u * step
    lo: np.ndarray  # float32 [n]
    step: np.ndarray  # float32 [n]
    top1: np.ndarray  # int32 [n]
    target_logp: np.ndarray  # float32 [n]

    FIELDS = ("logp_u16", "lo", "step", "top1", "target_logp")

    def __len__(self) -> int:
        return self.top1.shape[0]

    def rows(self, sl: slice) -> "RefPositions":
        return RefPositions(*(getattr(self, f)[sl] for f in self.FIELDS))

    def logp(self) -> np.ndarray:
        """Decoded log-probabilities, renormalised: float32 [n, vocab]."""
        lp = self.logp_u16.astype(np.float32)
        lp *= self.step[:, None]
        lp += self.lo[:, None]
        m = lp.max(axis=1, keepdims=True)
        z = np.log(np.exp(lp - m).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
        lp -= m + z
        return lp

    @staticmethod
    def concat(parts: list["RefPositions"]) -> "RefPositions":
        return RefPositions(*(np.concatenate([getattr(p, f) for p in parts]) for f in RefPositions.FIELDS))


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
    hi = np.zeros_like(lo)
    step = ((hi - lo) / LEVELS).astype(np.float32)
    step = np.where(step > 0, step, np.float32(1.0))
    u = np.rint((np.maximum(lp, lo[:, None]) - lo[:, None]) / step[:, None])
    u = np.clip(u, 0, LEVELS).astype(np.uint16)
    target = lp[np.arange(len(targets)), targets]
    return RefPositions(u, lo, step, lp.argmax(axis=1).astype(np.int32), target.astype(np.float32))


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


def score(ref: RefPositions, logits: np.ndarray, targets: np.ndarray) -> PositionScores:
    """Compare the test model's logits [n, vocab] with the reference at the same positions."""
    lq = log_softmax(logits)
    n = len(targets)
    nll = -lq[np.arange(n), targets].astype(np.float64)
    lp = ref.logp()
    diff = lp - lq
    np.exp(lp, out=lp)  # lp now holds p
    kld = np.maximum(np.einsum("ij,ij->i", lp, diff, dtype=np.float64), 0.0)
    same = lq.argmax(axis=1) == ref.top1
    return PositionScores(nll, -ref.target_logp.astype(np.float64), kld, same)


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
