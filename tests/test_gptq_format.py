"""The GPTQ checkpoint format: packing (every width, act-order), and whole checkpoints read back by
third parties: llama.cpp's convert_hf_to_gguf.py (which dequantizes GPTQ itself), the safetensors
library, and transformers' GPTQConfig.

The solver is stood in for by plain round-to-nearest, computed here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qwqq.errors import OutputError
from qwqq.gptq import checkpoint as gf
from qwqq.gptq.linears import gptq_linear_names, is_gptq_linear
from qwqq.gptq import packing
from qwqq.source import open_checkpoint
from tests import fixtures

RNG = np.random.default_rng(1234)


# --------------------------------------------------------------------------- a stand-in solver
def act_order_g_idx(in_features: int, group_size: int, perm: np.ndarray) -> np.ndarray:
    """GPTQ act-order: columns quantized in `perm` order, consecutive runs of group_size share a group."""
    gs = in_features if group_size == -1 else group_size
    g_idx = np.empty(in_features, np.int32)
    g_idx[perm] = np.arange(in_features) // gs
    return g_idx


def rtn(w: np.ndarray, bits: int, group_size: int, sym: bool, g_idx: np.ndarray | None = None):
    """Round-to-nearest per group (GPTQ's quantizer without the error feedback):
    asym: range [min(x, 0), max(x, 0)], zero = round(-min / scale) clamped to >= 1 (format v1);
    sym: range [-absmax, absmax], zero = 2^(bits-1)."""
    w = torch.as_tensor(w, dtype=torch.float32)
    out_f, in_f = w.shape
    g_idx = packing.default_g_idx(in_f, group_size) if g_idx is None else g_idx
    G = packing.n_groups(in_f, group_size)
    maxq = 2**bits - 1
    gi = torch.as_tensor(g_idx, dtype=torch.long)
    lo = torch.full((out_f, G), float("inf")).scatter_reduce(1, gi.expand(out_f, -1), w, "amin")
    hi = torch.full((out_f, G), float("-inf")).scatter_reduce(1, gi.expand(out_f, -1), w, "amax")
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if sym:
        amax = torch.maximum(-lo, hi)
        scale = (2 * amax / maxq).clamp(min=1e-8)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = ((hi - lo) / maxq).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(1, maxq)
    scale = scale.half().float()  # what the checkpoint stores
    q = torch.clamp(torch.round(w / scale[:, gi]) + zero[:, gi], 0, maxq)
    return q.to(torch.uint8).numpy(), scale.numpy(), zero.to(torch.int32).numpy(), g_idx


def rtn_packer(bits: int, group_size: int, sym: bool, act_order: bool):
    def quantize(lin: gf.GPTQLinear, w: np.ndarray) -> dict:
        g_idx = None
        if act_order:
            g_idx = act_order_g_idx(lin.in_features, group_size, RNG.permutation(lin.in_features))
        q, s, z, g = rtn(w, bits, group_size, sym, g_idx)
        return packing.pack(q, s, z, g, bits)
    return quantize


def reference_dequant(q, scales, zeros, g_idx) -> np.ndarray:
    """w[o, i] = scale[o, g[i]] * (q[o, i] - zero[o, g[i]]), column by column."""
    s16 = np.asarray(scales, np.float16).astype(np.float32)
    w = np.empty(q.shape, np.float32)
    for i, g in enumerate(g_idx):
        w[:, i] = s16[:, g] * (q[:, i].astype(np.float32) - zeros[:, g].astype(np.float32))
    return w


# --------------------------------------------------------------------------- packing
@pytest.mark.parametrize("act_order", [False, True], ids=["static", "act-order"])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", packing.GPTQ_BITS)
def test_pack_round_trip(bits, group_size, act_order):
    out_f, in_f = 96, 384
    maxq = 2**bits - 1
    G = packing.n_groups(in_f, group_size)
    q = RNG.integers(0, maxq + 1, (out_f, in_f), dtype=np.uint8)
    scales = RNG.uniform(0.001, 0.1, (out_f, G)).astype(np.float32)
    zeros = RNG.integers(1, maxq + 1, (out_f, G))
    g_idx = act_order_g_idx(in_f, group_size, RNG.permutation(in_f)) if act_order else packing.default_g_idx(in_f, group_size)
    p = packing.pack(q, scales, zeros, g_idx, bits)
    assert {k: (v.dtype, v.shape) for k, v in p.items()} == {
        "qweight": (np.int32, (in_f * bits // 32, out_f)),
        "qzeros": (np.int32, (G, out_f * bits // 32)),
        "scales": (np.float16, (G, out_f)),
        "g_idx": (np.int32, (in_f,)),
    }
    q2, s2, z2, g2 = packing.unpack(p, bits)
    assert np.array_equal(q2, q) and np.array_equal(z2, zeros) and np.array_equal(g2, g_idx)
    assert np.array_equal(s2, scales.astype(np.float16).astype(np.float32))
    assert np.array_equal(packing.dequantize(p, bits), reference_dequant(q, scales, zeros, g_idx))


def test_short_last_group():
    """576 columns in groups of 128 (SmolLM2): 5 groups, the last of 64; GPTQModel sizes G the same way."""
    q = RNG.integers(0, 16, (64, 576), dtype=np.uint8)
    scales = RNG.uniform(0.01, 0.1, (64, 5)).astype(np.float32)
    zeros = RNG.integers(1, 16, (64, 5))
    p = packing.pack(q, scales, zeros, None, 4, group_size=128)
    assert p["scales"].shape == (5, 64) and p["qzeros"].shape == (5, 8)
    assert np.array_equal(p["g_idx"], np.arange(576) // 128)
    assert {k: s for k, (_, s) in packing.packed_shapes(64, 576, 4, 128).items()} == {k: v.shape for k, v in p.items()}
    assert np.array_equal(packing.dequantize(p, 4), reference_dequant(q, scales, zeros, np.arange(576) // 128))
    with pytest.raises(ValueError, match="make 5 groups"):
        packing.pack(q, scales[:, :4], zeros[:, :4], None, 4, group_size=128)


def _spec_pack_column(values: list[int], bits: int) -> list[int]:
    """GPTQ's packing written out word by word (auto-gptq / GPTQModel pack loops), as Python ints."""
    words: list[int] = []
    if bits != 3:
        per = 32 // bits
        for k in range(0, len(values), per):
            words.append(sum(v << (bits * j) for j, v in enumerate(values[k:k + per])) & 0xFFFFFFFF)
        return words
    for k in range(0, len(values), 32):
        v = values[k:k + 32]
        a = sum(v[j] << (3 * j) for j in range(10)) | ((v[10] << 30) & 0xFFFFFFFF)
        b = ((v[10] >> 2) & 1) | sum(v[11 + j] << (3 * j + 1) for j in range(10)) | ((v[21] << 31) & 0xFFFFFFFF)
        c = ((v[21] >> 1) & 3) | sum(v[22 + j] << (3 * j + 2) for j in range(10))
        words += [a, b, c]
    return words


@pytest.mark.parametrize("bits", packing.GPTQ_BITS)
def test_bit_layout_matches_the_word_by_word_spec(bits):
    out_f, in_f = 32, 64
    q = RNG.integers(0, 2**bits, (out_f, in_f), dtype=np.uint8)
    zeros = RNG.integers(1, 2**bits, (out_f, 2))
    p = packing.pack(q, np.ones((out_f, 2), np.float32), zeros, None, bits)
    qweight = p["qweight"].view(np.uint32)
    for o in range(out_f):  # qweight column o packs row o of q along in_features
        assert qweight[:, o].tolist() == _spec_pack_column([int(x) for x in q[o]], bits)
    qzeros = p["qzeros"].view(np.uint32)
    for g in range(2):  # qzeros row g packs zero - 1 along out_features
        assert qzeros[g].tolist() == _spec_pack_column([int(z) - 1 for z in zeros[:, g]], bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_zero_points_read_alike_per_code_and_per_word(bits):
    """llama.cpp / vLLM add 1 per code; GPTQModel adds 0x..0101 to each packed word. With zero points
    in 1 .. 2^bits - 1 (what pack accepts) no carry crosses a code and both give the zero points back."""
    zeros = RNG.integers(1, 2**bits, (64, 3))
    zeros[0, :] = 2**bits - 1
    zeros[1, :] = 1
    p = packing.pack(np.zeros((64, 64), np.uint8), np.ones((64, 3), np.float32), zeros, np.arange(64) % 3, bits)
    word = sum(1 << (bits * j) for j in range(32 // bits))
    v2_words = ((p["qzeros"].view(np.uint32).astype(np.int64) + word) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    assert np.array_equal(packing.unpack_rows(v2_words, bits).T, zeros)
    assert np.array_equal(packing.unpack(p, bits)[2], zeros)


def test_v1_refuses_a_zero_point_of_zero_v2_keeps_it():
    q = np.zeros((32, 32), np.uint8)
    zeros = np.zeros((32, 1), np.int64)
    with pytest.raises(ValueError, match="zero point of 0"):
        packing.pack(q, np.ones((32, 1)), zeros, None, 4)
    p = packing.pack(q, np.ones((32, 1)), zeros, None, 4, checkpoint_format="gptq_v2")
    assert np.array_equal(packing.unpack(p, 4, "gptq_v2")[2], zeros)


def test_pack_checks_its_inputs():
    ok = dict(scales=np.ones((32, 2)), zeros=np.ones((32, 2), np.int64), g_idx=None, bits=4)
    with pytest.raises(ValueError, match="q must lie"):
        packing.pack(np.full((32, 64), 16), **ok)
    with pytest.raises(ValueError, match="multiple of 32"):
        packing.pack(np.zeros((32, 48), np.uint8), np.ones((32, 1)), np.ones((32, 1), np.int64), None, 3)
    with pytest.raises(ValueError, match="g_idx must lie"):
        packing.pack(np.zeros((32, 64), np.uint8), **{**ok, "g_idx": np.full(64, 2)})
    with pytest.raises(ValueError, match="bits"):
        packing.pack(np.zeros((32, 64), np.uint8), **{**ok, "bits": 5})


def test_torch_in_torch_out():
    q = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    p = packing.pack(q, torch.rand(64, 1) + 0.1, torch.full((64, 1), 8), torch.zeros(128, dtype=torch.int32), 4)
    assert all(isinstance(v, torch.Tensor) for v in p.values())
    assert p["qweight"].dtype == torch.int32 and p["scales"].dtype == torch.float16
    assert np.array_equal(packing.unpack(p, 4)[0], q.numpy())


def test_pack_is_fast_enough_for_a_real_layer():
    """A Qwen2.5-1.5B down_proj (1536 x 8960), group 128: well under a second."""
    import time

    q = RNG.integers(0, 16, (1536, 8960), dtype=np.uint8)
    s = RNG.uniform(0.01, 0.1, (1536, 70)).astype(np.float32)
    z = np.full((1536, 70), 8)
    t = time.perf_counter()
    packing.pack(q, s, z, None, 4)
    assert time.perf_counter() - t < 1.0


# --------------------------------------------------------------------------- what is quantized
def test_linear_names_qwen3_moe():
    ckpt = open_checkpoint(fixtures.tiny_model_dir("qwen3_moe"))
    names = gptq_linear_names(ckpt)
    experts = ckpt.config.get("num_experts", ckpt.config.get("num_local_experts"))
    assert len(names) == 2 * (4 + 3 * experts)
    assert "model.layers.1.mlp.experts.7.down_proj" in names and "model.layers.0.self_attn.o_proj" in names
    assert not any(n.endswith("mlp.gate") for n in names)
    kept = {r.name for r in gf.float_tensors(ckpt)}
    assert {"model.layers.0.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= kept


def test_gptq_bytes_counts_fused_experts_as_per_expert():
    per_expert = {f"model.layers.0.mlp.experts.{e}.{p}_proj.weight": (256, 512) if p != "down" else (512, 256)
                  for e in range(4) for p in ("gate", "up", "down")}
    fused = {"model.layers.0.mlp.experts.gate_up_proj": (4, 512, 512),
             "model.layers.0.mlp.experts.down_proj": (4, 512, 256)}
    for bits in packing.GPTQ_BITS:
        assert gf.gptq_bytes(per_expert, bits, 128) == gf.gptq_bytes(fused, bits, 128)


# --------------------------------------------------------------------------- whole checkpoints
CASES = {  # arch, bits, group size, sym, act-order
    "qwen2-4bit-g128-sym": ("qwen2", 4, 128, True, False),
    "qwen2-8bit-g32-asym-actorder": ("qwen2", 8, 32, False, True),
    "qwen3-2bit-g32-asym": ("qwen3", 2, 32, False, False),
    "qwen3-4bit-channel-actorder": ("qwen3", 4, -1, True, True),
    "qwen3_moe-4bit-g64-asym-actorder": ("qwen3_moe", 4, 64, False, True),
}


FLOAT_DTYPE = {"qwen3-2bit-g32-asym": "bfloat16"}  # GPTQModel 7.7's choice for a bf16 source; else fp16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def build(case: str, max_shard_bytes: int = gf.MAX_SHARD_BYTES):
        key = (case, max_shard_bytes)
        if key not in cache:
            arch, bits, gs, sym, act = CASES[case]
            out = tmp_path_factory.mktemp("gptq") / case
            res = gf.write_gptq(fixtures.tiny_model_dir(arch), out, rtn_packer(bits, gs, sym, act), bits=bits,
                                group_size=gs, sym=sym, desc_act=act, max_shard_bytes=max_shard_bytes,
                                float_dtype=FLOAT_DTYPE.get(case, "float16"))
            cache[key] = res
        return cache[key]
    return build


def _gguf_f32(path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return {t.name: np.asarray(t.data) for t in r.tensors}


def _expected_gguf(ckpt_dir, arch: str, bits: int) -> dict[str, np.ndarray]:
    """What the GGUF must hold: our dequantize() of every packed linear, and the stored fp16 floats,
    under llama.cpp's names (Qwen3-MoE experts stacked)."""
    import gguf

    from qwqq.archs import ARCHS

    cfg = json.loads((ckpt_dir / "config.json").read_text())
    name_map = gguf.get_tensor_name_map(ARCHS[cfg["architectures"][0]].gguf_arch, cfg["num_hidden_layers"])
    tensors = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:  # "pt": numpy has no bfloat16
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    tensors = {k: (v.float() if v.is_floating_point() and k.endswith((".weight", ".bias")) else v).numpy()
               for k, v in tensors.items()}
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name in sorted(tensors):
        if name.endswith((".qzeros", ".scales", ".g_idx")):
            continue
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            w = packing.dequantize({k: tensors[f"{base}.{k}"] for k in packing.PACKED}, bits)
            hf = base + ".weight"
        else:
            w, hf = tensors[name].astype(np.float32), name
        parts = hf.split(".")
        if ".mlp.experts." in hf:
            e = int(parts[5])
            stacked = ".".join(parts[:5] + parts[6:])
            experts.setdefault(stacked, {})[e] = w
            continue
        out[name_map.get_name(hf, try_suffixes=(".weight", ".bias"))] = w
    for stacked, by_e in experts.items():
        out[name_map.get_name(stacked, try_suffixes=(".weight",))] = np.stack([by_e[e] for e in sorted(by_e)])
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_llama_cpp_converter_reads_it(case, built, tmp_path):
    """convert_hf_to_gguf.py dequantizes GPTQ with its own code (conversion/base.py dequant_gptq):
    every F32 tensor it writes must equal ours, bit for bit."""
    arch, bits, *_ = CASES[case]
    res = built(case)
    gguf_path = fixtures.convert_hf_to_gguf(res.path, tmp_path / "out.gguf", "f32")
    theirs = _gguf_f32(gguf_path)
    ours = _expected_gguf(res.path, arch, bits)
    assert set(theirs) == set(ours)
    for name, want in ours.items():
        got = theirs[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert np.array_equal(got, want), name


@pytest.mark.parametrize("case", ["qwen2-4bit-g128-sym", "qwen3_moe-4bit-g64-asym-actorder"])
def test_dequantized_weights_are_close_to_the_source(case, built):
    """Sanity of the stand-in solver and the plumbing: 4-bit RTN lands within half a step."""
    arch, bits, gs, *_ = CASES[case]
    res = built(case)
    from qwqq.source import RowReader

    with RowReader() as reader, safe_open(str(res.path / "model.safetensors"), "np") as st:
        for lin in res.plan.linears[:8]:
            w = gf.read_weight(reader, lin)
            p = {k: st.get_tensor(f"{lin.name}.{k}") for k in packing.PACKED}
            step = p["scales"].astype(np.float32).max()
            assert np.abs(packing.dequantize(p, bits) - w).max() <= 0.5 * step * 1.01 + 1e-3, lin.name


@pytest.mark.parametrize("bits", packing.GPTQ_BITS)
def test_checkpoint_as_the_safetensors_library_sees_it(bits, tmp_path):
    src = fixtures.tiny_model_dir("qwen3")
    res = gf.write_gptq(src, tmp_path / "out", rtn_packer(bits, 128, True, False), bits=bits, group_size=128)
    out = res.path
    ckpt = open_checkpoint(src)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["config.json", "quantize_config.json", "model.safetensors", "generation_config.json",
                            *[p.name for p in src.iterdir() if p.name.startswith(("tokenizer", "chat_template",
                                                                                  "special_tokens", "vocab", "merges",
                                                                                  "added_tokens"))]])
    data_bytes = 0
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        assert st.metadata() == {"format": "pt"}
        keys = set(st.keys())
        for lin in gf.gptq_linears(ckpt):
            G = 2 if lin.in_features == 256 else lin.in_features // 128
            want = {"qweight": (torch.int32, (lin.in_features * bits // 32, lin.out_features)),
                    "qzeros": (torch.int32, (G, lin.out_features * bits // 32)),
                    "scales": (torch.float16, (G, lin.out_features)),
                    "g_idx": (torch.int32, (lin.in_features,))}
            for k, (dt, shape) in want.items():
                t = st.get_tensor(f"{lin.name}.{k}")
                assert (t.dtype, tuple(t.shape)) == (dt, shape), f"{lin.name}.{k}"
            assert f"{lin.name}.weight" not in keys
        for ref in ckpt.tensors.values():
            if not is_gptq_linear(ref.name):
                t = st.get_tensor(ref.name)
                assert t.dtype == torch.float16 and tuple(t.shape) == ref.shape
        for k in keys:
            t = st.get_slice(k)
            data_bytes += math.prod(t.get_shape()) * {"I32": 4, "F16": 2}[t.get_dtype()]
    assert len(keys) == 4 * len(gf.gptq_linears(ckpt)) + len(gf.float_tensors(ckpt))
    shapes = {n: r.shape for n, r in ckpt.tensors.items()}
    assert gf.gptq_bytes(shapes, bits, 128) == data_bytes == res.tensor_bytes

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": bits, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}
    assert config["dtype"] == "float16"
    assert {k: v for k, v in config.items() if k not in ("quantization_config", "dtype", "torch_dtype")} == \
        {k: v for k, v in ckpt.config.items() if k not in ("dtype", "torch_dtype")}
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_transformers_parses_the_quantization_config(built):
    from transformers import AutoConfig, GPTQConfig

    res = built("qwen2-8bit-g32-asym-actorder")
    qc = json.loads((res.path / "config.json").read_text())["quantization_config"]
    parsed = GPTQConfig.from_dict(qc)
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym, parsed.format) == (8, 32, True, False, "gptq")
    assert parsed.damp_percent == qc["damp_percent"]
    config = AutoConfig.from_pretrained(str(res.path))
    loaded = config.quantization_config
    loaded = loaded if isinstance(loaded, dict) else loaded.to_dict()
    assert loaded["quant_method"] == "gptq" and loaded["bits"] == 8 and loaded["checkpoint_format"] == "gptq"


@pytest.mark.slow
def test_multi_shard_with_index(built, tmp_path):
    """Shards of at most max_shard_bytes, an index naming every tensor, and llama.cpp reads it all."""
    limit = 2**18
    res = built("qwen3_moe-4bit-g64-asym-actorder", limit)
    shards = sorted(res.path.glob("*.safetensors"))
    assert len(shards) > 4
    assert all(p.name == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, p in enumerate(shards))
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    seen = {}
    total = 0
    for p in shards:
        with safe_open(str(p), "np") as st:
            size = 0
            for k in st.keys():
                t = st.get_slice(k)
                size += math.prod(t.get_shape()) * {"I32": 4, "F16": 2}[t.get_dtype()]
                seen[k] = p.name
        assert size <= limit or len(list(safe_open(str(p), "np").keys())) == 1
        total += size
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total == res.tensor_bytes
    one = built("qwen3_moe-4bit-g64-asym-actorder")
    assert one.tensor_bytes == res.tensor_bytes
    theirs = _gguf_f32(fixtures.convert_hf_to_gguf(res.path, tmp_path / "sharded.gguf", "f32"))
    ours = _expected_gguf(res.path, "qwen3_moe", 4)
    assert set(theirs) == set(ours) and all(np.array_equal(theirs[k], ours[k]) for k in ours)


# --------------------------------------------------------------------------- the writer's guards
def test_unwritten_tensors_leave_nothing(tmp_path):
    src = fixtures.tiny_model_dir("qwen2")
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="never written"):
        with gf.gptq_output(src, out, bits=4, group_size=128) as w:
            lin = w.plan.linears[0]
            G = packing.n_groups(lin.in_features, 128)
            w.write_linear(lin.name, packing.pack(np.zeros((lin.out_features, lin.in_features), np.uint8),
                                             np.ones((lin.out_features, G)), np.full((lin.out_features, G), 8), None, 4))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_damp_percent_must_suit_transformers(tmp_path):
    from qwqq.errors import QwqqError

    with pytest.raises(QwqqError, match="damp_percent"):
        with gf.gptq_output(fixtures.tiny_model_dir("qwen2"), tmp_path / "out", damp_percent=0.0):
            pass
    assert not list(tmp_path.iterdir())


def test_writer_refuses_wrong_shapes_and_silent_act_order(tmp_path):
    src = fixtures.tiny_model_dir("qwen2")
    with pytest.raises(ValueError, match="desc_act is False"):
        with gf.gptq_output(src, tmp_path / "a", bits=4, group_size=128) as w:
            lin = w.plan.linears[0]
            q = np.zeros((lin.out_features, lin.in_features), np.uint8)
            G = packing.n_groups(lin.in_features, 128)
            w.write_linear(lin.name, packing.pack(q, np.ones((lin.out_features, G)), np.full((lin.out_features, G), 8),
                                             act_order_g_idx(lin.in_features, 128, RNG.permutation(lin.in_features)), 4))
    with pytest.raises(ValueError, match="shape"):
        with gf.gptq_output(src, tmp_path / "b", bits=4, group_size=128, desc_act=True) as w:
            lin = w.plan.linears[0]
            q = np.zeros((lin.out_features, lin.in_features), np.uint8)
            G = packing.n_groups(lin.in_features, 128) + 1
            w.write_linear(lin.name, packing.pack(q, np.ones((lin.out_features, G)), np.full((lin.out_features, G), 8),
                                             np.arange(lin.in_features) % G, 4))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- unquantized tensors in bf16
def test_bfloat16_floats_keep_the_source_bits(built):
    res = built("qwen3-2bit-g32-asym")
    src = fixtures.tiny_model_dir("qwen3")
    assert json.loads((res.path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(res.path / "model.safetensors"), "pt") as ours, \
            safe_open(str(next(src.glob("*.safetensors"))), "pt") as theirs:
        for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.q_norm.weight"):
            a, b = ours.get_tensor(name), theirs.get_tensor(name)
            assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)), name
        assert ours.get_tensor("model.layers.0.mlp.up_proj.scales").dtype == torch.float16


def test_bfloat16_rounding_matches_torch():
    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    x[:4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    ours = gf._to_bf16_bits(x.numpy().reshape(1, -1)).view(np.int16)
    assert np.array_equal(ours.reshape(-1), x.to(torch.bfloat16).view(torch.int16).numpy())
    nan = gf._to_bf16_bits(np.array([[float("nan")]], np.float32))
    assert torch.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16)).all()
