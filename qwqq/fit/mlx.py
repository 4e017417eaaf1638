"""MLX builds for `qwqq fit` on a Mac: sized from the plan `qwqq quantize --format mlx` executes.

The weights are MLXPlan.tensor_bytes of qwqq.mlx.plan.make_mlx_plan: for a folder with weights,
the writer's own plan (qwqq.mlx.writer.plan_mlx); for a model known by its config, the same plan over the
mlx-lm parameter names mapped back from the GGUF tensor shapes fit already has (fit.subject.tensor_shapes).
Memory on the Mac = weights + mlx-lm's default KV cache (f16, K and V for every layer with attention, the
context rounded up to mlx-lm's 256-token growth step; a hybrid's linear-attention layers keep a fixed
recurrent state instead) + a stated runtime overhead (data/backends.toml [mlx]).
MLX has no offload: a build fits in the GPU working set or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from qwqq.archs import arch_of, find_arch, hparams, mlx_name
from qwqq.archs.experts import MLX_STACKED
from qwqq.errors import UnsupportedError
from qwqq.fit import hardware as hwmod
from qwqq.fit.candidate import Candidate, DeviceUse, Request, ctx_ladder
from qwqq.fit.constants import backend_constants
from qwqq.fit.hardware import Hardware
from qwqq.fit.memory import MiB, tokens_per_second
from qwqq.fit.subject import Model
from qwqq.mlx.plan import MLXPlan, make_mlx_plan
from qwqq.mlx.rules import kv_elements, mlx_rules
from qwqq.mlx.writer import plan_mlx, plan_rules, target_dtype

# (type name in fit's table, bits, group size, mlx-lm recipe)
MLX_BUILDS = (("MLX-8bit", 8, 64, None), ("MLX-4bit", 4, 64, None), ("MLX-mixed_3_6", 3, 64, "3_6"))
KV_STEP = 256  # mlx-lm's KVCache grows in steps of 256 tokens
KV_BYTES = 2  # f16 (the activations' dtype: bf16 / f16 models)
CONV_STATE_BYTES, DELTA_STATE_BYTES = 2, 4  # a linear-attention layer's conv state (activations' dtype), delta-net state (float32)

@cache
def _mlx_settings() -> tuple[int, float]:
    d = hwmod.backend_data().get("mlx", {})
    return int(d.get("overhead_mib", 1024) * MiB), float(d.get("efficiency", backend_constants().efficiency))


def mlx_plan(model: Model, bits: int, group_size: int = 64, recipe: str | None = None) -> MLXPlan:
    """The MLX folder's plan: exactly what quantize_to_mlx writes for this model."""
    if model.checkpoint is not None:
        return plan_mlx(model.checkpoint, bits, group_size, recipe)[2]
    cfg, hp = model.config, hparams(model.config)
    arch = arch_of(cfg, job="mlx")
    cast = target_dtype(cfg)
    dtype = cast or "BF16"  # config-only: a checkpoint without torch_dtype is taken as bf16
    rules = mlx_rules(arch)
    tensors = rules.from_gguf(model.shapes, hp, dtype, cast is not None) if rules is not None \
        else [(mlx_name(n), s, dtype) for n, s in model.shapes]
    return make_mlx_plan(tensors, **plan_rules(arch, hp), bits=bits, group_size=group_size, recipe=recipe)


def makes_mlx(model: Model) -> bool:
    """Whether quantize writes an MLX folder of it (mlx-lm has a model for it): a folder as quantize checks
    it, a model known by its config by its class (a catalog entry summarises the release's config)."""
    arch = find_arch(model.config)
    if "mlx" not in arch.jobs:
        return False
    rules = mlx_rules(arch)
    if rules is None:
        return True
    if model.checkpoint is not None:
        try:
            rules.check(model.config, None)
        except UnsupportedError:
            return False
        return True
    return (model.config.get("architectures") or [None])[0] in rules.classes


def kv_cache_bytes(model: Model, ctx: int) -> int:
    """mlx-lm's default KVCache: layers x (K + V widths: kv_heads x head_dim; DeepSeek's MLA: the latent and
    the rope part, qwqq.mlx.rules.kv_elements) x ctx x 2 bytes; a hybrid's linear-attention layers hold an
    ArraysCache instead (conv state in the activations' dtype, the delta-net state in float32, whatever the
    context)."""
    d = model.dims
    cells = -(-ctx // KV_STEP) * KV_STEP
    recurrent = (d.n_layer - d.kv_layers) * (d.n_embd_r * CONV_STATE_BYTES + d.n_embd_s * DELTA_STATE_BYTES)
    width = kv_elements(mlx_rules(find_arch(model.config)), d)
    return d.kv_layers * width * cells * KV_BYTES + recurrent



@dataclass
class MLXBuild:
    """An MLX folder, shaped like fit.subject.Build for fit's table and ranking."""

    type_name: str
    bits: int
    group_size: int
    recipe: str | None
    plan: MLXPlan

    @property
    def tensor_bytes(self) -> int:
        return self.plan.tensor_bytes

    @property
    def file_bytes(self) -> int:  # the safetensors headers (a few KB) are not counted
        return self.plan.tensor_bytes

    header_exact = False

    @property
    def n_params(self) -> int:
        return self.plan.n_params

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.plan.tensor_bytes / max(1, self.plan.n_params)

    def bytes_per_token(self, model: Model) -> float:
        """Weights read per generated token: every tensor but the embedding (one row), experts by
        their routed share; a tied embedding is read whole as the output layer."""
        d, tied = model.dims, not any(t.name == "lm_head.weight" for t in self.plan.tensors)
        share = d.n_expert_used / d.n_expert if d.n_expert else 1.0
        out = 0.0
        for t in self.plan.tensors:
            if t.name.startswith("model.embed_tokens.") and not tied:
                continue
            out += t.nbytes * (share if MLX_STACKED in t.name else 1.0)
        return out


class MLXCandidate(Candidate):
    format = "mlx"

    @property
    def folder(self) -> str:
        return f"{self.model.ref.rstrip('/').split('/')[-1]}-mlx-{self.build.type_name.removeprefix('MLX-')}"

    def commands(self) -> dict:
        b = self.build
        opts = f"--mixed {b.recipe}" if b.recipe else f"--bits {b.bits}"
        return {"quantize": f"qwqq quantize {self.model.ref} --format mlx {opts}",
                "run": f"qwqq run {self.folder} --backend mlx --ctx {self.ctx}", "llama_cpp": None,
                "mlx_lm": f"mlx_lm.generate --model {self.folder} --max-kv-size {self.ctx}"}

    def to_json(self) -> dict:
        d = super().to_json()
        b = self.build
        d.update({"format": "mlx", "type": b.type_name, "bits": b.bits, "group_size": b.group_size,
                  "recipe": f"mixed_{b.recipe}" if b.recipe else None, "flash_attn": None,
                  "n_gpu_layers_flag": None, "speed_model": {"efficiency": _mlx_settings()[1],
                                                              "kv_fill": backend_constants().kv_fill}})
        return d


def mlx_candidate(model: Model, build: MLXBuild, hw: Hardware, ctx: int) -> MLXCandidate:
    consts = backend_constants()
    overhead, efficiency = _mlx_settings()
    g = hw.gpus[0]
    gpu = DeviceUse(g.name, g.vram_bytes - consts.margin["metal"], weights=build.tensor_bytes,
                    kv=kv_cache_bytes(model, ctx), overhead=overhead, layers=model.dims.n_layer)
    host = DeviceUse("RAM", consts.ram_budget(hw.ram_bytes) - gpu.total, overhead=consts.overhead["cpu"])
    reads = [(build.bytes_per_token(model) + gpu.kv * consts.kv_fill, g.bandwidth_gbs)]
    return MLXCandidate(model, build, hw, ctx, "f16", False, "gpu", [gpu], host, model.dims.n_layer,
                        tokens_per_s=tokens_per_second(reads, efficiency),
                        notes=["MLX (mlx-lm): f16 KV cache, all on the GPU; memory = weights + KV + "
                               f"{overhead // MiB} MiB runtime overhead"])


def mlx_candidates(model: Model, hw: Hardware, req: Request) -> list[MLXCandidate]:
    """One candidate per MLX build: the longest context (of fit's ladder) that fits, else the shortest."""
    if not (hw.unified and hw.gpus and model.has_source_shapes) or not makes_mlx(model):
        return []
    if req.kv not in ("auto", "f16"):
        return []  # mlx-lm's default cache is f16
    ladder = [req.ctx] if req.ctx else [c for c in ctx_ladder(model.dims.ctx_train) if c >= req.min_ctx]
    ladder = ladder or [req.min_ctx]
    out = []
    for name, bits, gs, recipe in MLX_BUILDS:
        build = MLXBuild(name, bits, gs, recipe, mlx_plan(model, bits, gs, recipe))
        cands = [mlx_candidate(model, build, hw, ctx) for ctx in ladder]
        out.append(next((c for c in cands if c.fits), cands[-1]))
    return out
