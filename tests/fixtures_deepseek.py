"""Tiny random DeepSeek-V3 / R1 checkpoints, laid out as the real FP8 release is.

One public builder, ``tiny_deepseek_dir(dtype, mtp, seed)``, for
``DeepseekV3ForCausalLM`` (model_type ``deepseek_v3``; llama.cpp arch
``deepseek2``), in two forms of one model:

* ``dtype="fp8"``: the release form (DeepSeek-V3, R1, R1-0528, V3.1 alike).
  Every linear projection of attention (``q_a_proj``, ``q_b_proj``,
  ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``) and of the MLPs (dense,
  routed experts, shared experts: ``gate_proj``, ``up_proj``, ``down_proj``) is
  stored ``float8_e4m3fn`` beside a float32 ``<name>.weight_scale_inv`` of shape
  ``ceil(out/128) x ceil(in/128)``, with ``W = float(q) * scale_inv[i//128, j//128]``;
  edge blocks are partial.  Not quantized: ``embed_tokens``, ``lm_head``, every
  RMSNorm and the router ``mlp.gate.weight`` (bfloat16), the router's
  ``mlp.gate.e_score_correction_bias`` (float32), and the MTP layer's own
  ``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.*``
  (bfloat16).  config.json carries ``quantization_config``
  ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128]}``.
* ``dtype="bfloat16"``: the same weights dequantized, as DeepSeek's own
  ``fp8_cast_bf16.py`` writes them: the same names and shards without the
  ``weight_scale_inv`` tensors, each FP8 weight replaced by
  ``(float(q) * scale_inv)`` (computed in float32) cast to bfloat16, every other
  tensor as it was (``e_score_correction_bias`` stays float32), and config.json
  without ``quantization_config``.  Both forms hold the same model, up to the
  bfloat16 rounding of each dequantized FP8 weight (``fp8_cast_bf16.py``'s rounding:
  the FP8 form's float32 products differ from it in ~4% of elements, by <= 7e-4;
  logits of an F32 GGUF of each form differ by ~0.04).

On disk, as the release:

* Two shards named as DeepSeek names them, ``model-00001-of-000002.safetensors``
  and ``model-00002-of-000002.safetensors`` (five-digit index, *six*-digit
  total, like R1's ``model-00001-of-000163.safetensors``), with
  ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``).
  Shard 1: ``model.embed_tokens``, layers 0 and 1, and layer 2's ``self_attn.*``;
  shard 2 the rest (layer 2 straddles the shards, as layers do in the release).
  A weight and its ``weight_scale_inv`` share a shard.
* Experts per expert: ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``;
  shared expert ``model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight``;
  router ``model.layers.{i}.mlp.gate.weight`` and ``mlp.gate.e_score_correction_bias``.
* With ``mtp=True``, the multi-token-prediction layer at index
  ``num_hidden_layers`` (4; R1's is 61), which transformers neither builds nor
  loads (it reports the keys as unexpected: its ignore pattern is the literal
  ``model.layers.61``) and llama.cpp's converter skips: ``model.layers.4.*`` is a
  full MoE decoder layer (FP8 as the others) plus ``model.layers.4.embed_tokens.weight``
  and ``model.layers.4.shared_head.head.weight`` (copies of ``model.embed_tokens``
  and ``lm_head``, full size as in the release), ``enorm.weight``, ``hnorm.weight``,
  ``eh_proj.weight`` ``[hidden, 2*hidden]`` and ``shared_head.norm.weight``.
  config.json declares ``num_nextn_predict_layers: 1`` either way (as the release).
* config.json has R1's keys and layout (transformers 4.46 era): ``rope_scaling``
  with key ``"type": "yarn"`` and ``rope_theta`` at top level (no
  ``rope_parameters``), ``torch_dtype`` ``bfloat16``, ``scoring_func``,
  ``topk_method``, ``seq_aux``, ``ep_size``, ``moe_layer_freq``, ``aux_loss_alpha``;
  no ``auto_map`` (the remote modeling code is not shipped).

Shapes: vocab 4096 with the cut Qwen tokenizer (``tests.fixtures.tiny_tokenizer_dir``; bos
``<|endoftext|>``, eos ``<|im_end|>``, as ``tiny_model_dir``), hidden 256, 4 layers
(``first_k_dense_replace`` 1: layer 0 a dense MLP of 512, layers 1-3 MoE),
4 heads, MLA with ``q_lora_rank`` 96, ``kv_lora_rank`` 64, ``qk_nope_head_dim`` 32,
``qk_rope_head_dim`` 16, ``v_head_dim`` 32; 8 routed experts (top-2) of
``moe_intermediate_size`` 128 in 4 groups (``topk_group`` 2), 1 shared expert,
sigmoid scoring with ``e_score_correction_bias`` (``topk_method`` ``noaux_tc``),
``norm_topk_prob``, ``routed_scaling_factor`` 2.5; yarn RoPE as R1's (factor 40
over 4096, ``max_position_embeddings`` 163840, beta 32 / 1, mscale 1,
mscale_all_dim 1), rms_norm_eps 1e-6, untied ``lm_head``.  FP8 scale grids:
``q_a_proj`` [96, 256] 1x2 (partial rows), ``q_b_proj`` [192, 96] 2x1 (one full and
one partial row block), ``kv_a_proj_with_mqa`` [80, 256] 1x2, ``kv_b_proj``
[256, 64] 2x1, ``o_proj`` [256, 128] 2x1, dense ``gate/up_proj`` [512, 256] 4x2,
``down_proj`` [256, 512] 2x4, expert ``gate/up_proj`` [128, 256] 1x2,
``down_proj`` [256, 128] 2x1.

Weights: ``tests.fixtures._randomize`` (N(0, 0.05) matrices; the router then scaled by ``ROUTER_GAIN``;
``1 + 0.1 N(0, 1)`` for every ``*norm.weight``, the MTP's ``enorm``, ``hnorm`` and
``shared_head.norm`` included), then ``e_score_correction_bias`` ``0.05 N(0, 1)``
(a buffer ``_randomize`` does not see: enough to change some choices).  Each FP8
target is then quantized blockwise (``scale = amax(block) / 448``,
``q = (w / scale).clamp(+-448)`` as ``float8_e4m3fn``, ``scale_inv = scale`` as
float32); the model of record is the dequantized one.  The main model of one seed
is the same with and without ``mtp`` (the MTP layer is drawn afterwards from a
seed of its own).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tests.fixtures import QWEN_VOCAB_SIZE, TINY_VOCAB_SIZE, _build, _randomize, cache_root, qwen_tokenizer_dir, tiny_tokenizer_dir

DEEPSEEK_DTYPES = ("fp8", "bfloat16")

# Bump when the output of tiny_deepseek_dir changes, so stale caches are not reused (2: the cut tokenizer of
# tests.fixtures.tiny_tokenizer_dir, vocab 4096).
RECIPE = 2

STD = 0.05  # initializer_range, as tiny_model_dir's
# Router weights drawn this much wider: the tests hold routed statistics of llama.cpp and transformers against
# each other, and a token whose top experts score within float noise of each other would go elsewhere in one.
ROUTER_GAIN = 3.0
BLOCK = 128  # FP8 weight_block_size, both dims
FP8_MAX = 448.0  # largest finite float8_e4m3fn

QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}

# R1's config.json with tiny shapes (key for key, less auto_map; token ids and quantization_config added per build)
_CONFIG = dict(
    architectures=["DeepseekV3ForCausalLM"],
    attention_bias=False,
    attention_dropout=0.0,
    aux_loss_alpha=0.001,
    ep_size=1,
    first_k_dense_replace=1,
    hidden_act="silu",
    hidden_size=256,
    initializer_range=STD,
    intermediate_size=512,
    kv_lora_rank=64,
    max_position_embeddings=163840,
    model_type="deepseek_v3",
    moe_intermediate_size=128,
    moe_layer_freq=1,
    n_group=4,
    n_routed_experts=8,
    n_shared_experts=1,
    norm_topk_prob=True,
    num_attention_heads=4,
    num_experts_per_tok=2,
    num_hidden_layers=4,
    num_key_value_heads=4,
    num_nextn_predict_layers=1,
    pretraining_tp=1,
    q_lora_rank=96,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    rms_norm_eps=1e-06,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "original_max_position_embeddings": 4096, "type": "yarn"},
    rope_theta=10000,
    routed_scaling_factor=2.5,
    scoring_func="sigmoid",
    seq_aux=True,
    tie_word_embeddings=False,
    topk_group=2,
    topk_method="noaux_tc",
    torch_dtype="bfloat16",
    transformers_version="4.46.3",
    use_cache=True,
    v_head_dim=32,
    vocab_size=TINY_VOCAB_SIZE,
)

# The tensors the release stores as float8_e4m3fn + weight_scale_inv
_FP8_WEIGHT = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
SHARDS = 2


# ---------------------------------------------------------------- config


def _tokenizer_dir(vocab: str) -> Path:
    if vocab not in ("tiny", "qwen"):
        raise ValueError(f"vocab must be 'tiny' or 'qwen', not {vocab!r}")
    return tiny_tokenizer_dir() if vocab == "tiny" else qwen_tokenizer_dir()


def _config_json(fp8: bool, experts: int = 8, vocab: str = "tiny") -> dict:
    """config.json of the checkpoint, in R1's layout (see the module docstring); `experts` routed experts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_tokenizer_dir(vocab) / "tokenizer.json"))
    config = dict(_CONFIG, bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"),
                  n_routed_experts=experts, vocab_size=TINY_VOCAB_SIZE if vocab == "tiny" else QWEN_VOCAB_SIZE)
    if fp8:
        config["quantization_config"] = QUANTIZATION_CONFIG
    return json.loads(json.dumps(dict(sorted(config.items()))))  # a deep copy: transformers edits rope_scaling in place


# ---------------------------------------------------------------- FP8 blocks


def quantize_fp8_blockwise(weight):
    """``weight`` [out, in] -> (``float8_e4m3fn`` [out, in], float32 ``scale_inv`` [ceil(out/128), ceil(in/128)]),
    one scale per 128 x 128 block (partial at the edges): ``scale = amax(block) / 448``."""
    import torch

    w = weight.float()
    rows, cols = w.shape
    rb, cb = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.zeros(rb * BLOCK, cb * BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = w  # zero padding leaves each block's amax alone
    blocks = padded.view(rb, BLOCK, cb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rb * BLOCK, cb * BLOCK)[:rows, :cols].contiguous(), scale.contiguous()


def dequantize_fp8_blockwise(q, scale_inv):
    """float32 ``float(q) * scale_inv[i // 128, j // 128]`` (as DeepSeek's ``weight_dequant`` computes it)."""
    rows, cols = q.shape
    scale = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return q.float() * scale


# ---------------------------------------------------------------- weights


def _mtp_layer(model):
    """The release's MTP layer as a module whose state_dict keys are the checkpoint's ``model.layers.{n}.*``
    names (less the prefix) but for the two copies of the embeddings: a decoder layer (MoE) with ``enorm``,
    ``hnorm``, ``eh_proj`` and ``shared_head.norm`` attached."""
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    config = model.config
    hidden = config.hidden_size
    layer = DeepseekV3DecoderLayer(config, config.num_hidden_layers)
    layer.enorm = DeepseekV3RMSNorm(hidden, eps=config.rms_norm_eps)
    layer.hnorm = DeepseekV3RMSNorm(hidden, eps=config.rms_norm_eps)
    layer.eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)  # [embedding norm | hidden norm] -> hidden
    layer.shared_head = torch.nn.Module()
    layer.shared_head.norm = DeepseekV3RMSNorm(hidden, eps=config.rms_norm_eps)
    return layer


def _split_experts(state: dict) -> dict:
    """transformers' fused ``mlp.experts.gate_up_proj`` [E, 2*ff, hidden] (gate rows first) and
    ``mlp.experts.down_proj`` [E, hidden, ff] -> per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, ff = name.removesuffix(".gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :ff]
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, ff:]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def _checkpoint_state(config_json: dict, mtp: bool, seed: int) -> dict:
    """The release's tensors (float32 before quantization, per-expert names), seeded."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    plain = json.loads(json.dumps({k: v for k, v in config_json.items() if k != "quantization_config"}))
    config = DeepseekV3Config.from_dict(plain)  # (adds rope_type and rope_theta to plain's rope_scaling)
    model = DeepseekV3ForCausalLM(config).float()  # every parameter and buffer of the checkpoint is set below
    _randomize(model, seed, STD)
    gen = torch.Generator().manual_seed(seed + 7919)  # a stream apart from _randomize's
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # routing decided by margins above float noise (ROUTER_GAIN)
                param.mul_(ROUTER_GAIN)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen, dtype=torch.float32))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if mtp:
        layer = _mtp_layer(model).float()
        _randomize(layer, seed + 1, STD)  # after the main model, so it does not depend on ``mtp``
        with torch.no_grad():
            layer.mlp.gate.e_score_correction_bias.copy_(
                0.05 * torch.randn(config.n_routed_experts, generator=gen, dtype=torch.float32))
        prefix = f"model.layers.{config.num_hidden_layers}."
        state.update({prefix + k: v.detach() for k, v in layer.state_dict().items()})
        state[prefix + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
        state[prefix + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    return _split_experts(state)


def _release_tensors(state: dict, fp8: bool) -> dict:
    """float32 tensors -> the release's dtypes: FP8 targets quantized (``fp8``) or quantized and dequantized
    to bfloat16 (``fp8_cast_bf16.py``'s output), ``e_score_correction_bias`` float32, the rest bfloat16."""
    import torch

    out = {}
    for name, tensor in state.items():
        if _FP8_WEIGHT.match(name):
            q, scale_inv = quantize_fp8_blockwise(tensor)
            if fp8:
                out[name], out[name + "_scale_inv"] = q, scale_inv
            else:
                out[name] = dequantize_fp8_blockwise(q, scale_inv).to(torch.bfloat16)
        elif name.endswith("e_score_correction_bias"):
            out[name] = tensor.float().contiguous()
        else:
            out[name] = tensor.to(torch.bfloat16).contiguous()
    return out


def _shard_of(name: str) -> int:
    """0 for ``model.embed_tokens``, layers 0-1 and layer 2's attention; 1 for the rest."""
    if name == "model.embed_tokens.weight":
        return 0
    m = _LAYER.match(name)
    if m is None:
        return 1
    layer = int(m[1])
    return 0 if layer < 2 or (layer == 2 and ".self_attn." in name) else 1


def _write_shards(tmp: Path, tensors: dict) -> None:
    """``model-0000{k}-of-000002.safetensors`` and ``model.safetensors.index.json``, as DeepSeek shards."""
    from safetensors.torch import save_file

    files = [f"model-{i + 1:05d}-of-{SHARDS:06d}.safetensors" for i in range(SHARDS)]
    parts: list[dict] = [{} for _ in files]
    for name in sorted(tensors):
        parts[_shard_of(name)][name] = tensors[name]
    weight_map = {}
    for file, part in zip(files, parts):
        save_file(part, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- the builder


def tiny_deepseek_dir(dtype: str = "fp8", mtp: bool = True, seed: int = 0, experts: int = 8, vocab: str = "tiny") -> Path:
    """A tiny seeded random DeepSeek-V3 / R1 checkpoint in the real release's on-disk layout.

    ``dtype``: ``fp8`` (the release form: blockwise ``float8_e4m3fn`` weights with
    float32 ``weight_scale_inv``, ``quantization_config`` in config.json) or
    ``bfloat16`` (the same weights dequantized, as DeepSeek's ``fp8_cast_bf16.py``
    writes them: no scale tensors, no ``quantization_config``).  ``mtp``: add the
    release's multi-token-prediction layer ``model.layers.4.*``.  ``experts``: the
    number of routed experts (8; the memory benchmark builds 16 and 256).  Shapes, names,
    shards and weight statistics in the module docstring.

    The folder holds config.json, two safetensors shards with
    model.safetensors.index.json, generation_config.json and the cut Qwen
    tokenizer (``tests.fixtures.tiny_tokenizer_dir``, vocab 4096).  A few MB; builds in a few seconds.

    Notes (transformers 5.25, llama-cpp-python 0.3.36):

    * transformers loads the bfloat16 form cleanly (only the MTP keys unexpected).
      On a machine without GPU it loads the FP8 form by dequantizing it, but infers
      the block size from the scale grid (``rows // scale_rows``): ``q_b_proj``
      (192 rows, 2 row blocks) comes out with 96-row blocks, wrong.  Use the
      bfloat16 form as the transformers reference.
    * llama.cpp's converter dequantizes FP8 itself (float32 ``q * scale_inv``,
      then the output type) and skips the MTP layer: the BF16 GGUFs of the two
      forms are byte-identical (F32 / F16 ones are not, see above).
    * Routing margins are widened (``ROUTER_GAIN``) so that float32 implementations route alike, but
      llama.cpp's BF16 compute (activations rounded to bf16) can still route a token differently from a
      float32 forward; F32 / F16 GGUFs agree.
    """
    import torch

    if dtype not in DEEPSEEK_DTYPES:
        raise ValueError(f"dtype must be one of {DEEPSEEK_DTYPES}, not {dtype!r}")
    fp8 = dtype == "fp8"
    name = f"tiny-deepseek_v3-{dtype}-{'mtp' if mtp else 'nomtp'}-seed{seed}-r{RECIPE}"
    if experts != 8:  # another expert count (a multiple of n_group 4; bench/deepseek_experts.py), all else equal
        name += f"-e{experts}"
    if vocab != "tiny":  # the real Qwen tokenizer and vocabulary (bench/deepseek_disk.py: reads of the embedding rows)
        name += f"-{vocab}vocab"

    def build(tmp: Path) -> None:
        from transformers import GenerationConfig

        config = _config_json(fp8, experts, vocab)
        tensors = _release_tensors(_checkpoint_state(config, mtp, seed), fp8)
        if config != _config_json(fp8, experts, vocab):
            raise RuntimeError("config.json was modified while building")
        allowed = {torch.bfloat16, torch.float32} | ({torch.float8_e4m3fn} if fp8 else set())
        if any(t.dtype not in allowed for t in tensors.values()):
            raise RuntimeError(f"unexpected dtypes in {name}")
        _write_shards(tmp, tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        GenerationConfig(
            bos_token_id=config["bos_token_id"],
            eos_token_id=[config["eos_token_id"], config["bos_token_id"]],  # <|im_end|>, <|endoftext|>
            pad_token_id=config["bos_token_id"],
        ).save_pretrained(str(tmp))
        for f in _tokenizer_dir(vocab).iterdir():
            shutil.copy2(f, tmp / f.name)

    return _build(cache_root() / name, build)
