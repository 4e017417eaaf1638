"""GGUF writer: metadata and tokenizer through the gguf package's GGUFWriter, tensor data streamed.

The header (metadata + every tensor's name, shape, type and offset) is fully known from the plan,
so it is written first; then each tensor is read from the safetensors source in row chunks,
quantized by ggml's kernels on several threads, and appended. No tensor is ever whole in memory
(unless it is smaller than one chunk) and there is no intermediate F16 file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from qwqq.archs import Arch, GGUFTensor
from qwqq.errors import SourceError
from qwqq.gguf import kernels as ggml
from qwqq.gguf.header import ALIGN, build_header
from qwqq.gguf.vocab import Vocab
from qwqq.gguf.plan import Plan
from qwqq.gguf.types import row_bytes
from qwqq.source import Checkpoint, RowReader
from qwqq.gguf.imatrix_file import Imatrix


CHUNK_FLOATS = 4 * 2**20  # 16 MiB of float32 per chunk: the unit of reading and of progress
JOURNAL_EVERY_S = float(os.environ.get("QWQQ_JOURNAL_EVERY_S", "2"))  # how often resumable progress is recorded
# --------------------------------------------------------------------------- tensor data
@dataclass
class Job:
    """One planned tensor with where its rows come from.

    `imatrix`: the per-column importance llama-quantize would use, float32 [n_mat, cols]; row r of
    the tensor (counted across experts) takes row r // (rows / n_mat) of it, as llama-quant.cpp's
    imatrix_for_row does.
    """

    src: GGUFTensor
    type: T
    nbytes: int
    imatrix: np.ndarray | None = None

    def imatrix_span(self, g0: int, g1: int):
        """(start, stop, weights) runs of rows [g0, g1) that share one imatrix row (one expert)."""
        if self.imatrix is None:
            yield g0, g1, None
            return
        per = self.src.rows // self.imatrix.shape[0]
        while g0 < g1:
            e = g0 // per
            stop = min(g1, (e + 1) * per)
            yield g0, stop, self.imatrix[e]
            g0 = stop


def _permute_rows(rows: np.ndarray, head_dim_: int) -> np.ndarray:
    """HF rotate-half order -> GGUF interleaved pairs, within each head (llama q/k)."""
    n, cols = rows.shape
    return rows.reshape(n // head_dim_, 2, head_dim_ // 2, cols).swapaxes(1, 2).reshape(n, cols)


def elementwise(op: str, rows: np.ndarray, dtype: str) -> np.ndarray:
    """llama.cpp's converter's value transforms, bit for bit: computed in float32 (a bf16 source is widened
    first) or, for a float16 source, in float16 as torch computes it; -exp through torch's own kernel where
    torch is installed (numpy's exp differs in the last bit for some inputs), else in float64, rounded."""
    half = dtype == "F16"
    if op == "plus_one":
        out = rows.astype(np.float16) + np.float16(1) if half else rows + np.float32(1)
        return np.asarray(out, dtype=np.float32)
    if op == "neg_exp":
        try:
            import torch
        except ImportError:
            out = -np.exp(rows.astype(np.float64))
            return np.asarray(out.astype(np.float16) if half else out, dtype=np.float32)
        t = torch.from_numpy(np.ascontiguousarray(rows.astype(np.float16) if half else rows))
        return (-torch.exp(t)).to(torch.float32).numpy()
    raise ValueError(f"unknown tensor op {op}")


def gguf_rows(src: GGUFTensor, reader: RowReader, g0: int, g1: int) -> np.ndarray:
    """Rows [g0, g1) of a GGUF tensor (counted across its parts) as float32, with its column reorder, its
    transposed parts and its element-wise op applied: the values the writer quantizes (for sampling; the
    llama q/k row permutation, a reordering of whole rows, is left out)."""
    pieces, base = [], 0
    for part in src.parts:
        n = part.ref.cols if src.transposed else part.row1 - part.row0
        a, b = max(g0, base), min(g1, base + n)
        if a < b:
            if src.transposed:
                pieces.append(reader.read_f32(part.ref, part.row0, part.row1).T[a - base:b - base])
            else:
                pieces.append(reader.read_f32(part.ref, part.row0 + a - base, part.row0 + b - base))
        base += n
    rows = np.ascontiguousarray(np.concatenate(pieces) if len(pieces) > 1 else pieces[0])
    if src.col_perm is not None:
        rows = np.ascontiguousarray(rows[:, np.asarray(src.col_perm)])
    return elementwise(src.op, rows, src.parts[0].ref.dtype) if src.op is not None else rows


def _chunks(job: Job, cols: int):
    """(part, r0, r1, g0) chunks of at most CHUNK_FLOATS, aligned to whole heads for permuted tensors;
    g0 is the chunk's first row in the GGUF tensor (counted across experts)."""
    if job.src.transposed:  # one part per chunk (a head's block), written as its transpose
        base = 0
        for part in job.src.parts:
            yield part, part.row0, part.row1, base
            base += part.ref.cols
        return
    align = job.src.rows // job.src.permute_heads if job.src.permute_heads else 1
    step = max(align, (CHUNK_FLOATS // max(cols, 1)) // align * align)
    base = 0
    for part in job.src.parts:
        for r0 in range(part.row0, part.row1, step):
            yield part, r0, min(r0 + step, part.row1), base + r0 - part.row0
        base += part.row1 - part.row0


class TensorStreamer:
    """Reads, converts, checks and quantizes tensors chunk by chunk, keeping every core busy.

    One I/O thread reads chunk k+1 (pread, then bf16/f16 -> f32 with ggml's own converters) while
    the kernel threads work through chunk k, cut into small row blocks so no thread waits on
    another; chunk k-1 is written out meanwhile, in order. Each block is checked for NaN/Inf by the
    thread that quantizes it. Three reusable buffer sets: memory stays at a few chunks.
    """

    SLOTS = 3  # chunk being read, chunk in the kernels, chunk being written

    def __init__(self, threads: int):
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads)
        self.io = ThreadPoolExecutor(1)
        self.reader = RowReader()
        self.slots = [self._slot(CHUNK_FLOATS) for _ in range(self.SLOTS)]

    @staticmethod
    def _slot(n_floats: int) -> dict:
        return {"f32": np.empty(n_floats, np.float32), "raw": np.empty(n_floats * 2, np.uint8),
                "out": np.empty(0, np.uint8)}

    def close(self):
        self.io.shutdown(cancel_futures=True)
        self.pool.shutdown(cancel_futures=True)
        self.reader.close()

    def _read(self, k: int, job: Job, part, r0: int, r1: int) -> np.ndarray:
        cols, ref = job.src.cols, part.ref
        n = (r1 - r0) * cols
        if n > self.slots[k % self.SLOTS]["f32"].size:  # one row wider than a chunk
            self.slots[k % self.SLOTS] = self._slot(n)
        slot = self.slots[k % self.SLOTS]
        rows = self.reader.read_f32(ref, r0, r1, slot["f32"], slot["raw"], widen=ggml.to_f32)
        if job.src.permute_heads:
            rows = np.ascontiguousarray(_permute_rows(rows, job.src.rows // job.src.permute_heads))
        if job.src.transposed:
            rows = np.ascontiguousarray(rows.T)
        if job.src.col_perm is not None:
            rows = np.ascontiguousarray(rows[:, np.asarray(job.src.col_perm)])
        if job.src.op is not None:
            rows = elementwise(job.src.op, rows, ref.dtype)
        return rows

    @staticmethod
    def _block(t: T, rows: np.ndarray, dst: np.ndarray, part, imatrix: np.ndarray | None) -> None:
        total = np.add.reduce(rows, axis=None, dtype=np.float32) if rows.size else 0.0
        if not np.isfinite(total) and not np.isfinite(rows).all():  # the sum may overflow; then look closer
            raise SourceError(f"tensor {part.ref.name} holds NaN or Inf values: refusing to quantize it", part.ref.file)
        ggml.quantize_rows(int(t), rows, dst, imatrix)

    def _submit(self, k: int, job: Job, part, rows: np.ndarray, g0: int) -> tuple[np.ndarray, list]:
        n, rb = rows.shape[0], row_bytes(job.type, job.src.cols)
        slot = self.slots[k % self.SLOTS]
        if slot["out"].size < n * rb:
            slot["out"] = np.empty(n * rb, np.uint8)
        out = slot["out"][: n * rb]
        ggml.init(int(job.type))
        per = max(1, -(-n // (4 * self.threads)))  # small blocks: the last one finishes soon after the others
        futs = []
        for a, b, weights in job.imatrix_span(g0, g0 + n):  # blocks never straddle two experts
            for i in range(a - g0, b - g0, per):
                j = min(b - g0, i + per)
                futs.append(self.pool.submit(self._block, job.type, rows[i:j], out[i * rb:j * rb], part, weights))
        return out, futs

    def stream(self, jobs: list[Job], write: Callable[[Job, memoryview], None], tick: Callable[[Job, int], None]) -> None:
        items = [(job, part, r0, r1, g0) for job in jobs for part, r0, r1, g0 in _chunks(job, job.src.cols)]
        if not items:
            return
        reading = self.io.submit(self._read, 0, *items[0][:4])
        in_kernels = None  # (job, out, futures, n_elements) of the previous chunk
        for k, (job, part, r0, r1, g0) in enumerate(items):
            rows = reading.result()
            current = (job, *self._submit(k, job, part, rows, g0), rows.size)
            if k + 1 < len(items):
                reading = self.io.submit(self._read, k + 1, *items[k + 1][:4])
            if in_kernels is not None:
                self._finish(in_kernels, write, tick)
            in_kernels = current
        self._finish(in_kernels, write, tick)

    @staticmethod
    def _finish(chunk, write, tick) -> None:
        job, out, futs, n_elements = chunk
        for f in futs:
            f.result()
        write(job, memoryview(out))
        tick(job, n_elements)


def _padded(n: int) -> int:
    return n + (-n) % ALIGN


def _resume_point(path: Path, journal: Path, header: bytes, jobs: list[Job], imatrix_id: str | None = None) -> int:
    """How many leading tensors of an interrupted run can be kept (0: start over).

    Only tensors recorded in the journal count: the journal is written after the data it
    describes is fsynced, so a torn write after a SIGKILL is never trusted.
    """
    try:
        rec = json.loads(journal.read_text())
        with open(path, "rb") as f:
            same_header = f.read(len(header)) == header
    except (OSError, ValueError):
        return 0
    if not same_header or rec.get("header_sha256") != hashlib.sha256(header).hexdigest():
        return 0
    if rec.get("imatrix") != imatrix_id:  # other importance data: other bytes in every tensor
        return 0
    done = rec.get("done", [])
    names = [j.src.name for j in jobs]
    if not isinstance(done, int) or not 0 <= done <= len(jobs):
        return 0
    end = len(header) + sum(_padded(j.nbytes) for j in jobs[:done])
    if path.stat().st_size < end or rec.get("names") != names[:done][-1:]:
        return 0
    return done


def _record(journal: Path, header: bytes, jobs: list[Job], done: int, imatrix_id: str | None = None) -> None:
    tmp = journal.with_name(journal.name + ".tmp")
    tmp.write_text(json.dumps({"header_sha256": hashlib.sha256(header).hexdigest(), "done": done,
                               "names": [jobs[done - 1].src.name] if done else [], "imatrix": imatrix_id}))
    os.replace(tmp, journal)


def write_gguf(path: Path, ckpt: Checkpoint, arch: Arch, plan: Plan, vocab: Vocab, sources: dict[str, GGUFTensor],
               threads: int, progress: Callable[[str, int], None] | None = None, *, resume: bool = False,
               journal: Path | None = None, on_resume: Callable[[int, int], None] | None = None,
               imatrix: Imatrix | None = None, imatrix_rows: dict[str, np.ndarray] | None = None) -> int:
    """Write the whole GGUF to `path` (a temporary name; the caller renames). Returns bytes written.

    With a journal, progress is recorded (after an fsync of the data) every few seconds, and with
    `resume` the leading tensors an interrupted run finished are kept instead of redone.

    With an `imatrix`, `imatrix_rows` maps a quantized tensor's name to the float32 [n_mat, cols]
    weights its rows are quantized with (qwqq.gguf.quantize.imatrix_rows checks and builds it, as
    llama-quantize does); the file records the imatrix as llama-quantize does, and a resume
    only keeps tensors made with the very same importance data.
    """
    rows = imatrix_rows or {}
    imatrix_id = imatrix.digest() if imatrix is not None else None
    jobs = [Job(sources[tp.name], tp.type, tp.nbytes, rows.get(tp.name) if tp.quantized else None) for tp in plan.tensors]
    header = build_header(ckpt, arch, plan, vocab, imatrix)

    skip = _resume_point(path, journal, header, jobs, imatrix_id) if (resume and journal and path.is_file()) else 0
    keep = len(header) + sum(_padded(j.nbytes) for j in jobs[:skip])
    if resume and on_resume:
        on_resume(skip, len(jobs))
    streamer = TensorStreamer(threads)
    try:
        with open(path, "r+b" if skip else "wb") as f:
            if skip:
                f.truncate(keep)
                f.seek(keep)
                if progress:
                    for j in jobs[:skip]:
                        progress(j.src.name, 4 * j.src.rows * j.src.cols)
            else:
                f.write(header)
            written: dict[str, int] = {}
            state = {"done": skip, "last": time.monotonic()}

            def write(job: Job, data: memoryview) -> None:
                f.write(data)
                got = written[job.src.name] = written.get(job.src.name, 0) + len(data)
                if got == job.nbytes:
                    _pad(f)
                    state["done"] += 1
                    if journal is not None and time.monotonic() - state["last"] > JOURNAL_EVERY_S:
                        f.flush()
                        os.fsync(f.fileno())
                        _record(journal, header, jobs, state["done"], imatrix_id)
                        state["last"] = time.monotonic()

            streamer.stream(jobs[skip:], write, lambda job, n: progress(job.src.name, 4 * n) if progress else None)
            for job in jobs[skip:]:
                if written.get(job.src.name, 0) != job.nbytes:
                    raise RuntimeError(f"{job.src.name}: wrote {written.get(job.src.name, 0)} bytes, planned {job.nbytes}")
            f.flush()
            os.fsync(f.fileno())
            return f.tell()
    finally:
        streamer.close()


def _pad(f) -> None:
    n = f.tell()
    pad = (-n) % ALIGN
    if pad:
        f.write(b"\0" * pad)
