"""GPTQ checkpoints: a streaming writer for the folder that transformers (through GPTQModel), vLLM,
SGLang and llama.cpp's convert_hf_to_gguf.py load (the packed layout: gptq/packing.py).

The writer lays out every safetensors shard from the plan first (names, dtypes and shapes follow from
the source checkpoint, bits and group size), then takes tensors one at a time in any order: packed
linears from the solver, and the unquantized tensors (embeddings, norms, biases, the MoE router,
lm_head), which it streams from the source in fp16 (the AutoGPTQ-era convention, and Qwen's own GPTQ
releases) or bf16 (what GPTQModel 7.7 keeps for a bf16 source). Scales are fp16 either way.
Memory: one tensor.
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from qwqq import __version__
from qwqq.archs import FUSED_EXPERT, SKIPPED, arch_of, check_config
from qwqq.errors import OutputError, QwqqError, SourceError
from qwqq.outputs import atomic_output, fsync_dir
from qwqq.progress import tensor_progress
from qwqq.hf_folder import (Layout, ShardFiles, check_folder_output, copy_side_files, layout_shards,
                                     pwrite_all, side_files, write_json)
from qwqq.gptq.linears import GPTQLinear, TextNames, float_tensors, gptq_linears, order_key, quantized, text_names
from qwqq.gptq.packing import FORMATS, GPTQ_BITS, PACKED, to_numpy, default_g_idx, linear_bytes, packed_shapes
from qwqq.source import FLOAT_DTYPES, Checkpoint, RowReader, TensorRef, open_checkpoint

MAX_SHARD_BYTES = 4 * 10**9  # GPTQModel's DEFAULT_MAX_SHARD_SIZE "4GB"
CHUNK_ELEMENTS = 4 * 2**20  # source elements per row chunk when copying unquantized tensors
QUANT_CONFIG_FILE = "quantize_config.json"  # GPTQModel's own copy of quantization_config
STORED_FLOAT_DTYPES = {"float16": "F16", "bfloat16": "BF16"}  # how unquantized tensors may be stored (gptq_output float_dtype)

# =========================================================================== what a checkpoint holds
# (qwqq.gptq.linears: which tensors are quantized linears, under which names)


def gptq_bytes(shapes: Mapping[str, tuple[int, ...]], bits: int, group_size: int,
               names: TextNames = TextNames()) -> int:
    """Exact bytes of tensor data (safetensors headers excluded) in the GPTQ checkpoint of a source
    whose tensors (Hugging Face names) have these shapes: packed linears plus 2 bytes (fp16 or bf16)
    per element for the rest. `names`: how the source's family names its text model (text_names(config)),
    which decides the linears as plan_gptq decides them (a release's vision tower and MTP block stay float)."""
    total = 0
    for name, shape in shapes.items():
        if SKIPPED.search(name):
            continue
        m = quantized(names, name)
        if m is None:
            total += 2 * math.prod(shape)
        elif m.re is not FUSED_EXPERT:
            total += linear_bytes(shape[0], shape[1], bits, group_size)
        else:
            e, rows, cols = shape
            if m.group(2) == "down_proj":
                total += e * linear_bytes(rows, cols, bits, group_size)
            else:
                total += 2 * e * linear_bytes(rows // 2, cols, bits, group_size)
    return total


# =========================================================================== the plan
@dataclass
class GPTQPlan:
    bits: int
    group_size: int
    linears: list[GPTQLinear]
    floats: list[TensorRef]
    arrays: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # (name, dtype, shape) stored
    float_dtype: str = "float16"

    @property
    def tensor_bytes(self) -> int:
        sizes = {"I32": 4, "F16": 2, "BF16": 2}
        return sum(math.prod(s) * sizes[d] for _, d, s in self.arrays)


def plan_gptq(ckpt: Checkpoint, bits: int, group_size: int, float_dtype: str = "float16") -> GPTQPlan:
    arch = arch_of(ckpt.config, ckpt.root / "config.json", "gptq")
    check_config(ckpt.config, arch, ckpt.root / "config.json")
    if bits not in GPTQ_BITS:
        raise QwqqError(f"unknown --bits {bits} for GPTQ; choose one of {', '.join(map(str, GPTQ_BITS))}")
    if group_size != -1 and group_size <= 0:
        raise QwqqError(f"--group-size must be positive or -1 (per channel), not {group_size}")
    if float_dtype not in STORED_FLOAT_DTYPES:
        raise QwqqError(f"unknown float dtype {float_dtype!r}; choose one of {', '.join(STORED_FLOAT_DTYPES)}")
    for ref in ckpt.tensors.values():
        if ref.dtype not in FLOAT_DTYPES and not SKIPPED.search(ref.name):
            raise SourceError(f"tensor {ref.name}: dtype {ref.dtype} is not a float type qwqq can quantize", ref.file)
    linears, floats = gptq_linears(ckpt), float_tensors(ckpt)
    key = order_key(text_names(ckpt.config))
    if not linears:
        raise SourceError("no linear layers to quantize", ckpt.root)
    items: list[tuple[tuple, str, str, tuple]] = []
    for lin in linears:
        try:
            shapes = packed_shapes(lin.out_features, lin.in_features, bits, group_size)
        except ValueError as e:
            raise QwqqError(f"{lin.name}: {e}", ckpt.root) from None
        for suffix, (dtype, shape) in shapes.items():
            items.append((key(lin.name), f"{lin.name}.{suffix}", dtype, shape))
    for ref in floats:
        items.append((key(ref.name), ref.name, STORED_FLOAT_DTYPES[float_dtype], ref.shape))
    items.sort(key=lambda t: t[0])
    return GPTQPlan(bits, group_size, linears, floats, [(n, d, s) for _, n, d, s in items], float_dtype)


def gptq_layout(plan: GPTQPlan, max_shard_bytes: int = MAX_SHARD_BYTES) -> Layout:
    """Shards filled in model order; within a shard, wider dtypes first (every array stays aligned)."""
    return layout_shards(plan.arrays, max_shard_bytes, "pt", order=lambda s: (-(s.nbytes // max(1, math.prod(s.shape))), s.name))


def quantization_config(bits: int, group_size: int, *, sym: bool, desc_act: bool, damp_percent: float,
                        true_sequential: bool = True, act_group_aware: bool = False, checkpoint_format: str = "gptq",
                        **extra) -> dict:
    """config.json's quantization_config (and quantize_config.json): the keys transformers' GPTQConfig
    takes (checkpoint_format is its legacy alias of format), the keys GPTQModel's QuantizeConfig.to_dict
    writes (method, format, pack_dtype, meta), and those vLLM reads (bits, group_size, desc_act, sym,
    lm_head, checkpoint_format)."""
    if not 0 < damp_percent < 1:
        raise ValueError("damp_percent must be between 0 and 1 (transformers' GPTQConfig refuses others)")
    cfg = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
        "quant_method": "gptq",
        "method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,
        "static_groups": False,
        "act_group_aware": act_group_aware,
        "meta": {"quantizer": [f"qwqq:{__version__}"], "damp_percent": damp_percent,
                 "true_sequential": true_sequential, "static_groups": False, "act_group_aware": act_group_aware},
    }
    cfg.update(extra)
    return cfg


def gptq_config(ckpt: Checkpoint, qcfg: dict, float_dtype: str = "float16") -> dict:
    config = dict(ckpt.config)
    config["quantization_config"] = qcfg
    config["dtype"] = float_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = float_dtype
    return config


def _to_bf16_bits(rows: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; exact for a bf16 source."""
    u = rows.view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(rows)
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)  # stays a NaN
    return out


# =========================================================================== the writer
class GPTQWriter:
    """Takes the tensors of a laid-out GPTQ checkpoint one at a time, in any order."""

    def __init__(self, folder: Path, plan: GPTQPlan, lay: Layout, files: ShardFiles, *, desc_act: bool,
                 checkpoint_format: str, tick: Callable[[str, int], None] | None = None):
        self.folder, self.plan, self.lay, self.files = folder, plan, lay, files
        self.desc_act, self.checkpoint_format, self.tick = desc_act, checkpoint_format, tick
        self.written: set[str] = set()
        self._linears = {lin.name: lin for lin in plan.linears}

    def _put(self, name: str, arr: np.ndarray) -> None:
        slot = self.lay.slots.get(name)
        if slot is None:
            raise ValueError(f"{name} is not a tensor of this checkpoint")
        want = {"I32": np.int32, "F16": np.float16, "BF16": np.uint16}[slot.dtype]
        if arr.dtype != want:
            raise ValueError(f"{name}: dtype {arr.dtype}, expected {np.dtype(want)}")
        if tuple(arr.shape) != slot.shape:
            raise ValueError(f"{name}: shape {tuple(arr.shape)}, expected {slot.shape}")
        data = memoryview(np.ascontiguousarray(arr)).cast("B")
        pwrite_all(self.files.fds[slot.shard], data, slot.offset)

    def write_linear(self, name: str, packed: Mapping) -> None:
        """One quantized linear (module name, no .weight) as `pack` returns it."""
        lin = self._linears.get(name)
        if lin is None:
            raise ValueError(f"{name} is not a quantized linear of this checkpoint")
        arrays = {k: to_numpy(packed[k]) for k in PACKED}
        if not self.desc_act:  # without act-order, vLLM and the exllama/marlin kernels ignore g_idx
            if not np.array_equal(arrays["g_idx"], default_g_idx(lin.in_features, self.plan.group_size)):
                raise ValueError(f"{name}: g_idx is permuted but desc_act is False (readers would ignore it)")
        for k in PACKED:
            self._put(f"{name}.{k}", arrays[k])
        self.written.add(name)
        if self.tick:
            self.tick(name, sum(p.row1 - p.row0 for p in lin.parts) * lin.in_features * lin.parts[0].ref.itemsize)

    def write_floats(self, reader: RowReader) -> None:
        """Every unquantized tensor, read from the source in row chunks and stored in the plan's
        float dtype (fp16 by default)."""
        bf16 = self.plan.float_dtype == "bfloat16"
        for ref in self.plan.floats:
            step = max(1, CHUNK_ELEMENTS // max(1, ref.cols))
            for r0 in range(0, ref.rows, step):
                r1 = min(ref.rows, r0 + step)
                rows = reader.read_f32(ref, r0, r1)
                if bf16:
                    half = _to_bf16_bits(rows)
                else:
                    half = rows.astype(np.float16)
                    if not np.isfinite(half).all() and np.isfinite(rows).all():
                        raise QwqqError(f"tensor {ref.name} overflows float16 (|x| > 65504); "
                                        "store unquantized tensors as bfloat16", ref.file)
                self._put_rows(ref, half, r0, r1)
            self.written.add(ref.name)
            if self.tick:
                self.tick(ref.name, ref.end - ref.start)

    def _put_rows(self, ref: TensorRef, half: np.ndarray, r0: int, r1: int) -> None:
        slot = self.lay.slots[ref.name]
        data = memoryview(np.ascontiguousarray(half)).cast("B")
        if len(data) != (r1 - r0) * slot.row_bytes:
            raise ValueError(f"{ref.name}: rows {r0}..{r1} do not match the layout")
        pwrite_all(self.files.fds[slot.shard], data, slot.offset + r0 * slot.row_bytes)

    def missing(self) -> list[str]:
        names = [lin.name for lin in self.plan.linears] + [ref.name for ref in self.plan.floats]
        return [n for n in names if n not in self.written]


@dataclass
class GPTQWritten:
    path: Path
    size: int  # bytes on disk, all files
    tensor_bytes: int
    seconds: float
    plan: GPTQPlan


def default_output(ckpt: Checkpoint, bits: int, group_size: int) -> Path:
    return Path.cwd() / f"{ckpt.name}-gptq-{bits}bit-g{group_size if group_size != -1 else 'channel'}"


@contextmanager
def gptq_output(source: str | Path | Checkpoint, out: Path | None = None, *, bits: int = 4, group_size: int = 128,
                sym: bool = True, desc_act: bool = False, damp_percent: float = 0.05, true_sequential: bool = True,
                act_group_aware: bool = False, checkpoint_format: str = "gptq", float_dtype: str = "float16", force: bool = False,
                max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = False,
                extra_config: dict | None = None) -> Iterator[GPTQWriter]:
    """Open a GPTQ output folder for writing; yields the GPTQWriter.

        with gptq_output(src, out, bits=4, group_size=128) as w:
            w.write_floats(reader)                       # embeddings, norms, biases, router, lm_head
            for lin in w.plan.linears:
                w.write_linear(lin.name, pack(q, scales, zeros, g_idx, 4))

    On leaving the block every tensor must have been written; then config.json, quantize_config.json,
    the index (more than one shard), tokenizer files, chat template and generation_config are added
    and the folder appears under its final name (qwqq.outputs.atomic_output). On an error nothing is
    left behind."""
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    if checkpoint_format not in FORMATS:
        raise QwqqError(f"checkpoint_format must be one of {', '.join(FORMATS)}, not {checkpoint_format!r}")
    plan = plan_gptq(ckpt, bits, group_size, float_dtype)
    if not 0 < damp_percent < 1:
        raise QwqqError(f"damp_percent {damp_percent}: a GPTQ config needs 0 < damp_percent < 1 "
                        "(transformers' GPTQConfig refuses other values when loading)")
    qcfg = quantization_config(bits, group_size, sym=sym, desc_act=desc_act, damp_percent=damp_percent,
                               true_sequential=true_sequential, act_group_aware=act_group_aware,
                               checkpoint_format=checkpoint_format, **(extra_config or {}))
    config = gptq_config(ckpt, qcfg, float_dtype)
    lay = gptq_layout(plan, max_shard_bytes)
    out = Path(out) if out is not None else default_output(ckpt, bits, group_size)
    check_folder_output(out, ckpt.root, "GPTQ")
    copies = side_files(ckpt.root)
    planned = lay.total_bytes + sum(p.stat().st_size for p in copies) + 2**20
    src_bytes = sum(r.end - r.start for r in ckpt.tensors.values())

    with atomic_output(out, force=force, planned_bytes=planned) as tmp:
        if tmp.exists():  # left by a killed run
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        tmp.mkdir()
        files = ShardFiles(tmp, lay)
        try:
            with tensor_progress(progress, src_bytes, len(plan.linears) + len(plan.floats), label="quantize gptq") as tick:
                writer = GPTQWriter(tmp, plan, lay, files, desc_act=desc_act, checkpoint_format=checkpoint_format,
                                    tick=tick)
                yield writer
            missing = writer.missing()
            if missing:
                raise OutputError(f"{len(missing)} tensors were never written (first: {missing[0]})", out)
            files.sync()
        finally:
            files.close()
        if len(lay.files) > 1:
            write_json(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": lay.tensor_bytes},
                "weight_map": {name: lay.files[s.shard] for name, s in sorted(lay.slots.items())},
            })
        write_json(tmp / "config.json", config)
        write_json(tmp / QUANT_CONFIG_FILE, qcfg)
        copy_side_files(copies, tmp)
        fsync_dir(tmp)


def read_weight(reader: RowReader, lin: GPTQLinear) -> np.ndarray:
    """The source weight of one linear, float32 [out, in]."""
    return np.concatenate([reader.read_f32(p.ref, p.row0, p.row1) for p in lin.parts], axis=0) \
        if len(lin.parts) > 1 else reader.read_f32(lin.parts[0].ref, lin.parts[0].row0, lin.parts[0].row1)


def write_gptq(source: str | Path, out: Path | None, quantize: Callable[[GPTQLinear, np.ndarray], Mapping], *,
               bits: int = 4, group_size: int = 128, **options) -> GPTQWritten:
    """A whole GPTQ checkpoint from a per-linear function (weight float32 [out, in] -> pack()'s dict):
    the simplest driver (round-to-nearest, tests); a calibrated solver drives gptq_output itself."""
    t0 = time.perf_counter()
    ckpt = open_checkpoint(source)
    with gptq_output(ckpt, out, bits=bits, group_size=group_size, **options) as w, RowReader() as reader:
        w.write_floats(reader)
        for lin in w.plan.linears:
            w.write_linear(lin.name, quantize(lin, read_weight(reader, lin)))
        folder_plan = w.plan
        final = out if out is not None else default_output(ckpt, bits, group_size)
    final = Path(final)
    size = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
    return GPTQWritten(final, size, folder_plan.tensor_bytes, time.perf_counter() - t0, folder_plan)
