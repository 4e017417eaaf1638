"""qwqq eval: how much did quantization cost? One harness for every format, over the same tokens.

The text is tokenized once (the reference's tokenizer), cut into windows of `ctx` tokens, and each
window scored on its second half, as llama-perplexity does. The reference's view of those positions
(every log-prob, stored as uint16 steps, see qwqq.eval.metrics) is computed once and cached on disk, keyed by the
reference's identity (its files' names, sizes and mtimes) and the exact tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from qwqq.cache import cache_root, identity
from qwqq.errors import QwqqError
from qwqq.eval.logits import LogitsModel, check_logits_source, open_logits
from qwqq.eval.metrics import PositionScores, RefPositions, Summary, reference_positions, score, summarize
from qwqq.calib.text import read_text as read_utf8
from qwqq.progress import step_progress

DEFAULT_CTX = 512
CACHE_VERSION = 2  # 2: lo renormalised, neg_entropy and mass stored


@dataclass
class EvalResult:
    model: str
    ref: str
    ctx: int
    windows: int
    seconds: float
    ref_seconds: float
    ref_cached: bool
    summary: Summary

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "summary"}
        d.update(self.summary.as_dict())
        return d


def default_text() -> str:
    """The evaluation text shipped with qwqq (held apart from the calibration sample)."""
    return resources.files("qwqq").joinpath("data", "eval.txt").read_text(encoding="utf-8")


def read_text(path: Path | str | None) -> str:
    if path is None:
        return default_text()
    return read_utf8(path, "evaluation text")


def windows_of(ids: np.ndarray, ctx: int, max_tokens: int | None = None) -> np.ndarray:
    if ctx < 16:
        raise QwqqError("--ctx must be at least 16")
    n = ids.size if max_tokens is None else min(ids.size, max_tokens)
    if n < ctx:
        raise QwqqError(f"the text holds {ids.size} tokens, fewer than one window of --ctx {ctx}")
    k = n // ctx
    return ids[: k * ctx].reshape(k, ctx)


def cache_dir() -> Path:
    return cache_root() / "eval"


def cache_key(ref: Path, windows: np.ndarray, first: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "ref": identity(ref), "first": first,
                         "shape": list(windows.shape)}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(windows, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def _load_cached(folder: Path, n: int) -> RefPositions | None:
    """The cached reference (its big array memory-mapped), or None."""
    try:
        arrays = [np.load(folder / f"{f}.npy", mmap_mode="r" if f == "logp_u16" else None, allow_pickle=False)
                  for f in RefPositions.FIELDS]
    except (OSError, ValueError):
        return None
    ref = RefPositions(*arrays)
    return ref if len(ref) == n and ref.logp_u16.shape[0] == n else None


class _CacheWriter:
    """Writes the reference window by window into a temporary folder, renamed into place when complete."""

    def __init__(self, folder: Path, n: int, vocab: int):
        self.folder = folder
        self.tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.big = np.lib.format.open_memmap(self.tmp / "logp_u16.npy", mode="w+", dtype=np.uint16, shape=(n, vocab))
        self.small = []
        self.at = 0

    def add(self, part: RefPositions) -> None:
        k = len(part)
        self.big[self.at: self.at + k] = part.logp_u16
        self.at += k
        self.small.append(part)

    def finish(self) -> None:
        self.big.flush()
        del self.big
        for f in RefPositions.FIELDS[1:]:
            np.save(self.tmp / f"{f}.npy", np.concatenate([getattr(p, f) for p in self.small]))
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(self.tmp, self.folder)

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def reference(ref_model: LogitsModel, ref_path: Path, windows: np.ndarray, first: int, *, use_cache: bool = True,
              tick=None) -> tuple[RefPositions, bool]:
    """The reference's positions: from the cache, or computed (and cached) window by window.

    Cached, the big array stays on disk (memory-mapped); uncached, it is held in memory."""
    n = windows.shape[0] * (windows.shape[1] - 1 - first)
    folder = cache_dir() / cache_key(ref_path, windows, first)
    if use_cache and (hit := _load_cached(folder, n)) is not None:
        return hit, True
    writer = _CacheWriter(folder, n, ref_model.n_vocab) if use_cache else None
    parts = []
    try:
        for w, logits in enumerate(ref_model.logits(windows, first)):
            part = reference_positions(logits, windows[w, first + 1:])
            if writer:
                writer.add(part)
            else:
                parts.append(part)
            if tick:
                tick()
        if writer:
            writer.finish()
            return _load_cached(folder, n), False
    except BaseException:
        if writer:
            writer.abandon()
        raise
    return RefPositions.concat(parts), False


def evaluate(model: str | Path, ref: str | Path, *, text: str | None = None, ctx: int = DEFAULT_CTX,
             max_tokens: int | None = None, threads: int = 0, use_cache: bool = True, progress: bool = True
             ) -> EvalResult:
    model, ref = Path(model), Path(ref)
    text = default_text() if text is None else text
    t0 = time.perf_counter()
    check_logits_source(model)  # a wrong model path fails now, not after the reference pass
    ref_model = open_logits(ref, ctx, threads)
    try:
        tok = ref_model.tokenize
        ids = tok(text) if tok is not None else None
        if ids is None:
            raise QwqqError("the reference has no tokenizer qwqq can use", ref)
        probe = text[:2000]
        probe_ids = tok(probe)
        windows = windows_of(ids, ctx, max_tokens)
        first = ctx // 2
        with step_progress(progress, windows.shape[0], "reference") as tick:
            ref_pos, cached = reference(ref_model, ref, windows, first, use_cache=use_cache, tick=tick)
    finally:
        ref_model.close()
    t_ref = time.perf_counter() - t0

    t1 = time.perf_counter()
    test_model = open_logits(model, ctx, threads)
    try:
        if test_model.n_vocab != ref_pos.logp_u16.shape[1]:
            raise QwqqError(f"its vocabulary ({test_model.n_vocab}) differs from the reference's "
                            f"({ref_pos.logp_u16.shape[1]})", model)
        if test_model.tokenize is not None:
            if not np.array_equal(test_model.tokenize(probe), probe_ids):
                raise QwqqError("tokenizes the text differently from the reference: not the same model family", model)
        n_pos = windows.shape[1] - 1 - first
        parts = []
        with step_progress(progress, windows.shape[0], "eval") as tick:
            for w, logits in enumerate(test_model.logits(windows, first)):
                sl = slice(w * n_pos, (w + 1) * n_pos)
                parts.append(score(ref_pos.rows(sl), logits, windows[w, first + 1:], threads))
                if tick:
                    tick()
    finally:
        test_model.close()
    summary = summarize(PositionScores.concat(parts))
    return EvalResult(str(model), str(ref), ctx, int(windows.shape[0]), time.perf_counter() - t1, t_ref, cached,
                      summary)
