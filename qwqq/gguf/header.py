"""The GGUF header qwqq writes: metadata (architecture keys from config.json, tokenizer, chat template,
llama-quantize's imatrix keys) and the tensor infos of a plan, through the gguf package's GGUFWriter.

`build_header` is the one place the header is made: the writer writes it, and fit and the budget allocator
measure it, so a predicted file size is the written one to the byte.
"""

from __future__ import annotations

import io
import struct

import gguf
import numpy as np

from qwqq import __version__
from qwqq.archs import Arch, block_count, cfg, head_dim, hparams, rope_params
from qwqq.errors import SourceError
from qwqq.gguf.plan import Plan
from qwqq.gguf.vocab import Vocab
from qwqq.source import Checkpoint
from qwqq.gguf.imatrix_file import Imatrix


ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT

SAMPLING_KEYS = {  # generation_config.json -> general.sampling.*
    "temperature": ("general.sampling.temp", "f32"),
    "top_p": ("general.sampling.top_p", "f32"),
    "top_k": ("general.sampling.top_k", "i32"),
    "min_p": ("general.sampling.min_p", "f32"),
    "repetition_penalty": ("general.sampling.penalty_repeat", "f32"),
}


class FastArrayWriter(gguf.GGUFWriter):
    """GGUFWriter with a fast path for long arrays: the stock packer builds one bytes object per
    element (about 2 s for Qwen's 300k tokens and merges); the bytes written are the same."""

    _ARRAY_NUMPY = {gguf.GGUFValueType.INT32: "<i4", gguf.GGUFValueType.UINT32: "<u4",
                    gguf.GGUFValueType.FLOAT32: "<f4"}

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        V = gguf.GGUFValueType
        if (vtype != V.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE or not isinstance(val, (list, tuple))
                or len(val) < 64):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else V.get_type(val[0])
        head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
        if ltype == V.STRING and all(isinstance(v, str) for v in val):
            enc = [v.encode("utf-8") for v in val]
            lengths = np.fromiter((len(e) for e in enc), dtype="<u8", count=len(enc)).tobytes()
            return head + b"".join(lengths[8 * i:8 * i + 8] + e for i, e in enumerate(enc))
        if ltype in self._ARRAY_NUMPY and all(type(v) is type(val[0]) for v in val):
            return head + np.asarray(val, dtype=self._ARRAY_NUMPY[ltype]).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _put(w: gguf.GGUFWriter, key: str, kind: str, value) -> None:
    if kind in ("ints", "bools"):  # arrays: of ints (rope sections), of bool (which layers are recurrent)
        w.add_array(key, [int(v) if kind == "ints" else bool(v) for v in value])
        return
    {"u32": w.add_uint32, "i32": w.add_int32, "f32": w.add_float32, "str": w.add_string, "bool": w.add_bool}[kind](
        key, int(value) if kind in ("u32", "i32") else float(value) if kind == "f32" else value)


def write_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, arch: Arch, plan: Plan, vocab: Vocab,
                   imatrix: Imatrix | None = None) -> None:
    c, a = hparams(ckpt.config), arch.name
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(ckpt.name)
    w.add_quantized_by(f"qwqq {__version__}")
    if ckpt.hub_id:
        w.add_source_url(f"https://huggingface.co/{ckpt.hub_id}")
    for k, (key, kind) in SAMPLING_KEYS.items():
        if isinstance(ckpt.generation_config.get(k), (int, float)) and not isinstance(ckpt.generation_config.get(k), bool):
            _put(w, key, kind, ckpt.generation_config[k])

    for m in arch.meta:
        v = cfg(c, *m.fields)
        if v is None:
            if m.required:
                raise SourceError(f"config.json lacks {' or '.join(m.fields)}", ckpt.root / "config.json")
            continue
        _put(w, f"{a}.{m.key}", m.kind, v)
    if arch.extra_meta is not None:
        for key, kind, value in arch.extra_meta(c, block_count(plan.tensors)):
            _put(w, f"{a}.{key}", kind, value)
    rp = rope_params(c)
    _put(w, f"{a}.rope.freq_base", "f32", rp["rope_theta"])
    if arch.rope_dims_key:
        _put(w, f"{a}.rope.dimension_count", "u32", head_dim(c))
        _put(w, f"{a}.vocab_size", "u32", len(vocab.tokens))
    kind = rp["rope_type"]
    if kind in ("yarn", "linear") and rp.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN if kind == "yarn" else gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
        if kind == "yarn":
            orig = rp.get("original_max_position_embeddings")
            if not orig:
                raise SourceError("yarn rope_scaling lacks original_max_position_embeddings", ckpt.root / "config.json")
            w.add_rope_scaling_orig_ctx_len(int(orig))
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("attn_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):  # as the converter writes them
                if isinstance(rp.get(key), (int, float)) and not isinstance(rp.get(key), bool):
                    if key != "attn_factor" or rp.get("attention_factor") is None:
                        add(float(rp[key]))

    w.add_file_type(int(plan.mixture.ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if imatrix is not None:  # the keys llama-quantize adds (tools/quantize/quantize.cpp; strings cut to 127 bytes)
        if imatrix.path:
            w.add_string("quantize.imatrix.file", _cut(imatrix.path))
        if imatrix.datasets:
            w.add_string("quantize.imatrix.dataset", _cut(imatrix.datasets[0]))
        w.add_uint32("quantize.imatrix.entries_count", len(imatrix))
        if imatrix.chunk_count > 0:
            w.add_uint32("quantize.imatrix.chunks_count", imatrix.chunk_count)

    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "sep": w.add_sep_token_id, "pad": w.add_pad_token_id}
    for kind_, tid in vocab.special_ids.items():
        adders[kind_](tid)
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def _cut(s: str) -> str:
    """strncpy into llama_model_kv_override's 128-byte val_str: at most 127 bytes."""
    return s.encode("utf-8")[:127].decode("utf-8", "ignore")


def build_header(ckpt: Checkpoint, arch: Arch, plan: Plan, vocab: Vocab, imatrix: Imatrix | None = None) -> bytes:
    """Everything before the first tensor's data: header, metadata, tensor infos, padding to the alignment."""
    w = FastArrayWriter(path=None, arch=arch.name)
    write_metadata(w, ckpt, arch, plan, vocab, imatrix)
    for tp in plan.tensors:
        w.add_tensor_info(tp.name, tp.shape, np.dtype(np.float32), tp.nbytes, raw_dtype=tp.type)
    buf = io.BytesIO()
    w.fout, w.state = [buf], gguf.gguf_writer.WriterState.EMPTY  # write into memory, not a file
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.fout = None
    data = buf.getvalue()
    return data + b"\0" * ((-len(data)) % ALIGN)
