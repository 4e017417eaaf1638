"""MLX writer: a Hugging Face checkpoint -> the folder mlx-lm loads, in one streaming pass.

What mlx_lm.convert writes, array for array: the same parameter names (experts stacked per
projection, a tied lm_head dropped; a family whose mlx-lm model renames, reshapes, splits or shifts
tensors says how in its MLX rules, looked up by qwqq.mlx.rules; a block-scaled FP8 weight dequantized
as the family's sanitize does it), the same (bits, group size) per module (the plan in
qwqq.mlx.plan.make_mlx_plan), packed weights, scales and biases computed by mlx's own
`mx.quantize`, unquantized tensors in the dtype mlx_lm.convert keeps (config "torch_dtype" when it
names a float type, else each tensor's own), and config.json with the "quantization" block mirrored
as "quantization_config".

Unlike mlx_lm.convert, which builds the whole quantized model in memory before saving, the output is
laid out first (every array's name, dtype, shape, shard and offset follow from the plan), the
safetensors headers are written, and then each tensor is read in row chunks, quantized and written at
its offset. Peak memory is a few chunks, whatever the size of the model.
"""

from __future__ import annotations


import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from qwqq.archs import EXPERT, FUSED_EXPERT, LAYER, SKIPPED, Arch, Part, arch_of, gguf_tensors, hparams
from qwqq.archs.experts import fused_rows, merged, mlx_stacked
from qwqq.archs.hybrid_mlx import MLXRules
from qwqq.errors import SourceError, UnsupportedError
from qwqq.hf_folder import Layout, ShardFiles, layout_shards, pwrite_all
from qwqq.mlx.plan import MLXPlan, make_mlx_plan
from qwqq.mlx.rules import fp8_dtype, mlx_rules, module_order, renamed_away, split
from qwqq.source import Checkpoint, RowReader, TensorRef

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB = 5, counted in GiB
CHUNK_ELEMENTS = 4 * 2**20  # source elements per row chunk: the unit of reading, quantizing and progress
CONVERSION_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}  # mlx_lm.convert's choices


# --------------------------------------------------------------------------- the tensors mlx-lm holds
@dataclass(frozen=True)
class MLXSource:
    """One mlx-lm parameter and where its rows come from (several parts: stacked experts)."""

    name: str
    shape: tuple[int, ...]  # numpy order, as stored (the source's elements in the same order, unless transposed)
    dtype: str  # the dtype mlx-lm's model holds it in before convert's cast: the source's safetensors dtype,
    # or for a block-scaled FP8 weight (parts' refs with scales) what the family's sanitize dequantizes it to
    parts: tuple[Part, ...]  # concatenated along rows
    op: str | None = None  # element-wise, in the source dtype as mlx-lm's sanitize does it: plus_one
    transposed: bool = False  # each part (rows x cols of the source), read whole, stored as its transpose
    # (cols x rows): DeepSeek's embed_q, as GGUFTensor.transposed (the budget samples an MLXSource as one)
    col_perm = None  # never reordered (GGUFTensor's field, for the budget's sampling)

    @property
    def cols(self) -> int:
        """Elements per row written: a source row (a stored shape may split it: conv1d's [C, K, 1]), or the
        rows of a transposed part."""
        p = self.parts[0]
        return p.row1 - p.row0 if self.transposed else p.ref.cols

    @property
    def rows(self) -> int:
        """Rows written, each the same number of bytes."""
        if self.transposed:
            return sum(p.ref.cols for p in self.parts)
        return sum(p.row1 - p.row0 for p in self.parts)

    @property
    def fp8(self) -> bool:
        return self.parts[0].ref.scale is not None


def is_tied(ckpt: Checkpoint) -> bool:
    """tie_word_embeddings as config.json (or its text_config) says; absent, whether the checkpoint lacks an lm_head."""
    tied = hparams(ckpt.config).get("tie_word_embeddings")
    return bool(tied) if tied is not None else "lm_head.weight" not in ckpt.tensors


def _order(name: str) -> tuple[int, str]:
    """Embedding first, then layer by layer, then the final norm and lm_head; by name within."""
    if name.startswith("model.embed_tokens."):
        return (-1, name)
    m = LAYER.match(name)
    return (int(m.group(1)) if m else 1 << 30, name)


def mlx_sources(ckpt: Checkpoint, arch: Arch) -> list[MLXSource]:
    """The parameters of mlx-lm's model for this checkpoint, as its `sanitize` leaves them: the text model's
    tensors under the family's canonical names (arch.rename), experts stacked, then named, shaped and
    transformed by the family's MLX rules (archs.hybrid_mlx.MLXRules: MTP and vision left out)."""
    c, tied = hparams(ckpt.config), is_tied(ckpt)
    rules = mlx_rules(arch)
    n_layer = int(c["num_hidden_layers"])
    out: list[MLXSource] = []
    experts: dict[tuple[int, str], dict[int, TensorRef]] = {}

    def held(ref: TensorRef) -> str:
        if ref.scale is None:
            return ref.dtype
        if (dtype := fp8_dtype(rules)) is None:
            raise UnsupportedError(f"tensor {ref.name} is block-scaled FP8, which mlx-lm's model for "
                                   f"{arch.hf_class} does not read", ref.file)
        return dtype

    for hub_name, ref in ckpt.tensors.items():
        name = arch.rename(hub_name, n_layer) if arch.rename else hub_name
        if name is None or (rules and rules.param(name, n_layer) is None):
            continue
        if SKIPPED.search(name) or (tied and name == "lm_head.weight"):
            continue
        if arch.moe and (m := EXPERT.match(name)):
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = ref
            continue
        if arch.moe and (m := FUSED_EXPERT.match(name)):
            out.extend(_fused_experts(int(m.group(1)), m.group(2), ref))
            continue
        out.append(MLXSource(name, ref.shape, held(ref), (Part(ref, 0, ref.rows),)))
    n_expert = arch.n_expert(c)
    for (layer, proj), by_id in sorted(experts.items()):
        if sorted(by_id) != list(range(n_expert)):
            raise SourceError(f"layer {layer} {proj}_proj has experts {len(by_id)} of {n_expert}", ckpt.root)
        refs = [by_id[e] for e in range(n_expert)]
        if any(r.shape != refs[0].shape or r.dtype != refs[0].dtype or (r.scale is None) != (refs[0].scale is None)
               for r in refs):
            raise SourceError(f"layer {layer} {proj}_proj experts disagree on shape or dtype", ckpt.root)
        out.append(MLXSource(mlx_stacked(layer, proj), (n_expert, *refs[0].shape),
                             held(refs[0]), tuple(Part(r, 0, r.rows) for r in refs)))
    if not tied and not any(s.name == "lm_head.weight" for s in out):
        raise SourceError("tie_word_embeddings is false but there is no lm_head.weight", ckpt.root)
    out.sort(key=lambda s: _order(s.name))
    if rules is None:
        return out
    out = [m for s in out for m in _as_mlx(s, rules, n_layer, c)]
    if (key := module_order(rules)) is not None:
        out.sort(key=lambda s: key(s.name))
    return out


def left_out_note(ckpt: Checkpoint, arch: Arch) -> str | None:
    """One line on the checkpoint's tensors mlx-lm's model does not hold (a vision tower, MTP blocks)."""
    rules = mlx_rules(arch)
    if rules is None or arch.rename is None:
        return None
    n_layer = int(hparams(ckpt.config)["num_hidden_layers"])
    names = [arch.rename(n, n_layer) for n in ckpt.tensors]
    vision = sum(n is None for n in names)
    mtp = sum(n is not None and rules.param(n, n_layer) is None for n in names)
    parts = [f"{renamed_away(rules)} ({vision} tensors)"] * bool(vision) + \
        [f"the MTP weights ({mtp} tensors)"] * bool(mtp)
    if not parts:
        return None
    both = len(parts) > 1
    return f"{' and '.join(parts)} {'are' if both else 'is'} left out, as mlx_lm.convert leaves " \
           f"{'them' if both else 'it'}: this folder is the language model"


def _as_mlx(src: MLXSource, rules: MLXRules, n_layer: int, hp: dict) -> list[MLXSource]:
    if len(src.parts) == 1 and (pieces := split(rules, src.name, src.parts[0].ref, hp)):
        return [MLXSource(rules.param(name, n_layer), shape, src.dtype, parts, transposed=t)
                for name, shape, parts, t in pieces]
    shape, op = rules.tensor(src.name, src.shape)
    return [MLXSource(rules.param(src.name, n_layer), shape, src.dtype, src.parts, op)]


def _fused_experts(layer: int, which: str, ref: TensorRef) -> list[MLXSource]:
    """transformers 5's fused layout, stacked per projection as mlx-lm holds it."""
    return [MLXSource(mlx_stacked(layer, proj), (ref.shape[0], r[0][1] - r[0][0], ref.shape[2]), ref.dtype,
                      tuple(Part(ref, r0, r1) for r0, r1 in merged(r)))
            for proj, r in fused_rows(ref, which).items()]


def target_dtype(config: dict) -> str | None:
    """The dtype mlx_lm.convert casts every float tensor to: config "torch_dtype" (or text_config
    "dtype") when it names one of its three float types; None keeps each tensor's own."""
    dtype = config.get("torch_dtype")
    if dtype is None and isinstance(config.get("text_config"), dict):
        dtype = config["text_config"].get("dtype")
    return CONVERSION_DTYPES.get(dtype) if isinstance(dtype, str) else None


def plan_mlx(ckpt: Checkpoint, bits: int = 4, group_size: int = 64, recipe: str | None = None,
             overrides: dict | None = None) -> tuple[Arch, list[MLXSource], MLXPlan]:
    """Validate the checkpoint (the GGUF path's checks) and plan its MLX folder."""
    arch = arch_of(ckpt.config, ckpt.root / "config.json", "mlx")
    rules = mlx_rules(arch)
    if rules is not None:
        rules.check(ckpt.config, ckpt.root / "config.json")
    gguf_tensors(ckpt, arch)  # config values, dtypes, names, shapes and layer count checked, nothing read
    sources = mlx_sources(ckpt, arch)
    cast = target_dtype(ckpt.config)
    plan = make_mlx_plan([(s.name, s.shape, cast if cast and (rules is None or rules.cast(s.name)) else s.dtype)
                          for s in sources], **plan_rules(arch, hparams(ckpt.config)), bits=bits,
                         group_size=group_size, recipe=recipe, overrides=overrides)
    return arch, sources, plan


def plan_rules(arch: Arch, hp: dict) -> dict:
    """make_mlx_plan's family arguments: the layer count and what the model's own predicate pins or skips."""
    rules = mlx_rules(arch)
    if rules is None:
        return {"n_layer": int(hp["num_hidden_layers"]), "routers": ("mlp.gate",) if arch.moe else ()}
    return {"n_layer": int(hp["num_hidden_layers"]), "routers": rules.routers if arch.moe else (),
            "unquantized": rules.unquantized, "uncounted": rules.uncounted}


# --------------------------------------------------------------------------- config.json
def _tag_floats(obj):
    """Non-finite floats written as transformers and mlx-lm tag them, so config.json stays JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _tag_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tag_floats(v) for v in obj]
    return obj


def mlx_config(ckpt: Checkpoint, arch: Arch, plan: MLXPlan) -> dict:
    """config.json as mlx_lm.convert writes it, plus the keys its model classes need but a
    transformers-5 config spells differently (added only when absent, so a hub config is untouched)."""
    c = dict(ckpt.config)
    eos = ckpt.generation_config.get("eos_token_id")
    if eos:  # mlx-lm's load_config takes it from generation_config.json and saves it
        c["eos_token_id"] = eos
    rp = c.get("rope_parameters")
    if isinstance(rp, dict):
        if "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]
        if c.get("rope_theta") is None and rp.get("rope_theta") is not None:
            c["rope_theta"] = rp["rope_theta"]
        if c.get("rope_scaling") is None and (rp.get("rope_type") or rp.get("type") or "default") != "default":
            c["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    if arch.moe and c.get("num_experts") is None and c.get("num_local_experts") is not None:
        c["num_experts"] = c["num_local_experts"]
    if c.get("tie_word_embeddings") is None:
        c["tie_word_embeddings"] = is_tied(ckpt)
    c.pop("_name_or_path", None)
    c.pop("vision_config", None)
    if (rules := mlx_rules(arch)) is not None:
        c = rules.config(c)
    c["quantization"] = plan.quantization
    c["quantization_config"] = plan.quantization
    return _tag_floats(dict(sorted(c.items())))


# --------------------------------------------------------------------------- layout
def layout(plan: MLXPlan, max_shard_bytes: int | None = None) -> Layout:
    """Shards filled in plan order, a new one when the next array would pass the limit (mlx-lm's
    make_shards rule); see hf_folder.layout_shards."""
    max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    return layout_shards(plan.arrays(), max_shard_bytes, "mlx")


def index_json(plan: MLXPlan, lay: Layout) -> dict:
    """model.safetensors.index.json, as mlx-lm writes it (even for one shard)."""
    return {
        "metadata": {"total_size": plan.tensor_bytes, "total_parameters": plan.n_params},
        "weight_map": {name: lay.files[s.shard] for name, s in sorted(lay.slots.items())},
    }


# --------------------------------------------------------------------------- data
_MX_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_RAW_VIEW = {"BF16": "<u2", "F16": "<f2", "F32": "<f4"}


def _chunks(src: MLXSource) -> Iterator[tuple[int, Part, int, int]]:
    """(first row written, of src.rows, part, row0, row1): row ranges of at most CHUNK_ELEMENTS elements;
    a part to transpose whole (one head's block of DeepSeek's kv_b_proj)."""
    if src.transposed:
        for i, part in enumerate(src.parts):
            yield i * part.ref.cols, part, part.row0, part.row1
        return
    step = max(1, CHUNK_ELEMENTS // max(1, src.cols))
    out_row = 0
    for part in src.parts:
        for r0 in range(part.row0, part.row1, step):
            r1 = min(part.row1, r0 + step)
            yield out_row, part, r0, r1
            out_row += r1 - r0


def _to_mx(raw: np.ndarray, dtype: str, nrows: int, cols: int):
    import mlx.core as mx

    arr = mx.array(raw.view(_RAW_VIEW[dtype]).reshape(nrows, cols))
    return arr.view(mx.bfloat16) if dtype == "BF16" else arr


def _to_bytes(arr) -> memoryview:
    """An evaluated mlx array's bytes (bfloat16 through a uint16 view: numpy has no bfloat16)."""
    import mlx.core as mx

    if arr.dtype == mx.bfloat16:
        arr = arr.view(mx.uint16)
    return memoryview(np.asarray(arr)).cast("B")


def write_mlx_weights(folder: Path, sources: list[MLXSource], plan: MLXPlan, lay: Layout,
                      progress: Callable[[str, int], None] | None = None) -> None:
    """Quantize and write every array into the shards laid out in `folder`."""
    import mlx.core as mx

    jobs = list(zip(sources, plan.tensors))
    if len(sources) != len(plan.tensors) or any(src.name != tp.name for src, tp in jobs):
        raise RuntimeError("the plan and the sources disagree")
    written = {name: 0 for name in lay.slots}
    files = ShardFiles(folder, lay)

    def read(job_chunk):  # raw bytes, or an FP8 weight's rows dequantized in float32 (qwqq/fp8.py)
        (src, _tp), (_o, part, r0, r1) = job_chunk
        return reader.read_f32(part.ref, r0, r1) if src.fp8 else reader.read_raw(part.ref, r0, r1)

    chunks = [((src, tp), ch) for src, tp in jobs for ch in _chunks(src)]
    try:
        with RowReader() as reader, ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(read, chunks[0]) if chunks else None
            for i, ((src, tp), (out_row, part, r0, r1)) in enumerate(chunks):
                raw = ahead.result()
                ahead = pool.submit(read, chunks[i + 1]) if i + 1 < len(chunks) else None
                nrows = r1 - r0
                arrays = tp.arrays()
                if tp.quantized or tp.dtype != src.dtype or src.op or src.fp8 or src.transposed:
                    if src.fp8:  # mlx-lm's sanitize: float32(q x scale) stored in its dequantized dtype
                        w = mx.array(raw).astype(getattr(mx, _MX_DTYPES[src.dtype]))
                    else:
                        w = _to_mx(raw, src.dtype, nrows, part.ref.cols)
                    if src.op == "plus_one":  # mlx-lm's sanitize: v + 1.0, in v's dtype, before any cast
                        w = w + 1.0
                    elif src.op is not None:
                        raise RuntimeError(f"{src.name}: unknown op {src.op}")
                    if src.transposed:  # the part's [rows, cols] stored as [cols, rows]
                        w = mx.contiguous(w.T)
                    if tp.dtype != src.dtype:
                        w = w.astype(getattr(mx, _MX_DTYPES[tp.dtype]))
                    outs = mx.quantize(w, tp.group_size, tp.bits, mode="affine") if tp.quantized else (w,)
                    mx.eval(*outs)
                    pieces = [_to_bytes(o) for o in outs]
                else:
                    pieces = [memoryview(raw)]
                for (name, _dt, _shape), data in zip(arrays, pieces):
                    slot = lay.slots[name]  # bytes per unit row: a stored shape may split the rows
                    pwrite_all(files.fds[slot.shard], data, slot.offset + out_row * (slot.nbytes // src.rows))
                    written[name] += len(data)
                del raw, pieces
                if progress:
                    progress(src.name, nrows * part.ref.cols * part.ref.itemsize)
        for name, slot in lay.slots.items():
            if written[name] != slot.nbytes:
                raise RuntimeError(f"{name}: wrote {written[name]} bytes, planned {slot.nbytes}")
        files.sync()
    finally:
        files.close()
