"""GPTQ folders for `qwqq fit` on CUDA GPUs: sized from the functions `qwqq quantize --format gptq` writes with.

The weights are the tensor data of the GPTQ checkpoint: for a folder with weights, GPTQPlan.tensor_bytes of
the writer's own plan (qwqq.gptq.checkpoint.plan_gptq); for a model known by its config, qwqq.gptq.checkpoint.gptq_bytes over
the Hugging Face tensors of its release (qwqq.archs.release_shapes: the family's own list, Arch.hub_tensors, else
the GGUF shapes fit already has mapped back): packed linears (qweight, qzeros, scales, g_idx) and 2 bytes per
element for everything else (embeddings, norms, biases, the MoE router, lm_head, a hybrid release's vision tower
and MTP block), as the writer stores them. Which tensors are linears is decided on the text model's names
(qwqq.gptq.linears.text_names), as the writer decides it.

Memory on the GPU = weights + a 16-bit KV cache + the CUDA context estimate of data/backends.toml [cuda].
The runtime's own overhead (transformers / vLLM) is not measured (data/backends.toml [gptq]): no number is
assumed for it, so a GPTQ row's memory is a lower bound, said so in the table, the notes and --json, and
ranked after rows whose memory fit accounts for fully. No offload: a build fits on the GPU(s) or not.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache

from qwqq.archs import LAYER, find_arch, release_shapes
from qwqq.errors import QwqqError
from qwqq.fit import hardware as hwmod
from qwqq.fit.candidate import Candidate, DeviceUse, Request, ctx_ladder
from qwqq.fit.constants import backend_constants
from qwqq.fit.hardware import Hardware
from qwqq.fit.memory import MiB, tokens_per_second
from qwqq.fit.subject import Model
from qwqq.gptq.checkpoint import TextNames, gptq_bytes, plan_gptq, text_names

# (type name in fit's table, bits, group size); the defaults fit lists, then the ones only --type asks for
GPTQ_BUILDS = (("GPTQ-Int8", 8, 128), ("GPTQ-Int4", 4, 128))
GPTQ_EXTRA = (("GPTQ-Int3", 3, 128), ("GPTQ-Int2", 2, 128))


def gptq_types() -> dict[str, tuple[int, int]]:
    """Every GPTQ type name fit knows (upper case) -> (bits, group size)."""
    return {n.upper(): (b, g) for n, b, g in GPTQ_BUILDS + GPTQ_EXTRA}


def is_gptq_type(name: str) -> bool:
    return name.upper() in gptq_types()


@dataclass(frozen=True)
class GPTQSettings:
    kv_bytes: int  # bytes per K / V element
    overhead: int  # what fit adds beside weights and KV: the CUDA context estimate ([cuda]), + a measured runtime's
    overhead_measured: bool  # the runtime's own overhead: false until measured on a GPU
    efficiency: float


@cache
def settings() -> GPTQSettings:
    d = hwmod.backend_data()
    g = d.get("gptq", {})
    measured = bool(g.get("overhead_measured", False))
    runtime = float(g.get("runtime_overhead_mib", 0)) if measured else 0.0
    return GPTQSettings(int(g.get("kv_bytes", 2)), int((d["cuda"]["overhead_mib"] + runtime) * MiB), measured,
                        float(g.get("efficiency", backend_constants().efficiency)))


def hf_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensors (name -> shape) of the source checkpoint: the folder's own, or for a model
    known by its config its release's (archs.release_shapes)."""
    if model.checkpoint is not None:
        return {name: tuple(ref.shape) for name, ref in model.checkpoint.tensors.items()}
    return release_shapes(find_arch(model.config), model.config, model.shapes)


@dataclass
class GPTQBuild:
    """A GPTQ folder, shaped like fit.subject.Build for fit's table and ranking."""

    type_name: str
    bits: int
    group_size: int
    tensors: list[tuple[str, int]]  # (source tensor, bytes it becomes in the checkpoint)
    tensor_bytes: int  # the checkpoint's tensor data: what the writer writes, safetensors headers excluded
    n_params: int
    names: TextNames = TextNames()  # how the source names its text model (what is read per token)

    header_exact = False

    @property
    def file_bytes(self) -> int:  # the safetensors headers (tens of KB) are not counted
        return self.tensor_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / max(1, self.n_params)

    def bytes_per_token(self, model: Model) -> float:
        """Weights read per generated token: every tensor of the text model but the embedding (one row),
        experts by their routed share; a tied embedding is read whole as the output layer. A release's vision
        tower and MTP block are not read."""
        d = model.dims
        tied = not any(n == "lm_head.weight" for n, _ in self.tensors)
        share = d.n_expert_used / d.n_expert if d.n_expert else 1.0
        out = 0.0
        for name, nbytes in self.tensors:
            text = self.names.text(name)
            if text is None or (m := LAYER.match(text)) and not self.names.in_decoder(m.group(1)):
                continue
            if text.startswith("model.embed_tokens.") and not tied:
                continue
            out += nbytes * (share if ".mlp.experts." in text else 1.0)
        return out


def gptq_build(model: Model, type_name: str, bits: int, group_size: int) -> GPTQBuild:
    """What `qwqq quantize --format gptq --bits B --group-size G` writes for this model (ValueError when
    a dimension does not pack at this width)."""
    key = f"gptq:{type_name}:{bits}:{group_size}"  # cached with the model's GGUF builds (fit asks many times)
    if key in model._builds:
        return model._builds[key]
    shapes, names = hf_shapes(model), text_names(model.config)
    tensors = [(name, gptq_bytes({name: shape}, bits, group_size, names)) for name, shape in shapes.items()]
    if model.checkpoint is not None:  # the writer's own plan for this folder
        total = plan_gptq(model.checkpoint, bits, group_size).tensor_bytes
    else:  # gptq_bytes is a sum over tensors
        total = sum(n for _, n in tensors)
    model._builds[key] = GPTQBuild(type_name, bits, group_size, tensors, total, model.n_params, names)
    return model._builds[key]


def kv_cache_bytes(model: Model, ctx: int) -> int:
    """K and V for every layer, ctx tokens, in the model's 16-bit dtype (transformers' DynamicCache; vLLM's
    default kv-cache-dtype "auto")."""
    d = model.dims
    return d.n_layer * (d.n_embd_k + d.n_embd_v) * ctx * settings().kv_bytes


GPTQ_INSTALL = 'pip install "qwqq[gptq]"'  # torch and transformers, for `qwqq run --backend transformers`


@cache
def transformers_backend() -> bool:
    """Whether `qwqq run --backend transformers` (built into qwqq) can load a GPTQ folder here: whether
    torch and transformers are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


class GPTQCandidate(Candidate):
    format = "gptq"

    @property
    def memory_lower_bound(self) -> bool:  # the runtime's overhead is not counted while it is not measured
        return not settings().overhead_measured

    @property
    def folder(self) -> str:
        """quantize's default output folder (qwqq.gptq.checkpoint.default_output)."""
        b = self.build
        name = self.model.ref.rstrip("/").split("/")[-1]
        return f"{name}-gptq-{b.bits}bit-g{b.group_size if b.group_size != -1 else 'channel'}"

    def commands(self) -> dict:
        b = self.build
        vllm = f"vllm serve {self.folder} --max-model-len {self.ctx}"
        if len(self.gpus) > 1:
            vllm += f" --tensor-parallel-size {len(self.gpus)}"
        return {"quantize": f"qwqq quantize {self.model.ref} --format gptq --bits {b.bits} --group-size {b.group_size}",
                "run": f"qwqq run {self.folder} --backend transformers --ctx {self.ctx}", "llama_cpp": None,
                "vllm": vllm}

    def to_json(self) -> dict:
        d = super().to_json()
        b, s = self.build, settings()
        d.update({"format": "gptq", "type": b.type_name, "bits": b.bits, "group_size": b.group_size,
                  "flash_attn": None, "n_gpu_layers_flag": None, "runtime": "transformers / vLLM",
                  "memory_lower_bound": self.memory_lower_bound,
                  "runtime_overhead": "measured" if s.overhead_measured else "not measured",
                  "qwqq_run_backend_available": transformers_backend(),
                  "speed_model": {"efficiency": s.efficiency, "kv_fill": backend_constants().kv_fill}})
        return d


def gptq_candidate(model: Model, build: GPTQBuild, hw: Hardware, ctx: int) -> GPTQCandidate:
    """All on the GPU(s); several GPUs split weights and KV evenly (vLLM's tensor parallelism)."""
    consts, s = backend_constants(), settings()
    n = len(hw.gpus)
    kv = kv_cache_bytes(model, ctx)
    gpus = [DeviceUse(f"GPU{j} ({g.name})" if n > 1 else g.name, g.vram_bytes - consts.margin["cuda"],
                      weights=-(-build.tensor_bytes // n), kv=-(-kv // n), overhead=s.overhead,
                      layers=model.dims.n_layer) for j, g in enumerate(hw.gpus)]
    host = DeviceUse("RAM", consts.ram_budget(hw.ram_bytes), overhead=consts.overhead["cpu"])
    bw = min(g.bandwidth_gbs for g in hw.gpus)
    reads = [((build.bytes_per_token(model) + kv * consts.kv_fill) / n, bw)]
    notes = ["GPTQ (transformers / vLLM): memory = weights + f16 KV cache + "
             + (f"{s.overhead // MiB} MiB CUDA context and runtime overhead (measured)" if s.overhead_measured else
                f"{s.overhead // MiB} MiB CUDA context; the runtime's own overhead is not measured, so this total "
                "is a lower bound"),
             f"tok/s: the bandwidth bound at efficiency {s.efficiency:.2f}; transformers / vLLM decode speed not measured"]
    if n > 1:
        notes.append(f"split evenly over {n} GPUs (vLLM --tensor-parallel-size {n})")
    if vision_not_counted(model):
        notes.append("a multimodal release: its vision tower, which the GPTQ folder keeps as floats, is not counted "
                     "(this config has no vision_config)")
    if not transformers_backend():
        notes.append(f"qwqq run's transformers backend needs torch and transformers ({GPTQ_INSTALL}); "
                     "`vllm serve` also loads the folder")
    return GPTQCandidate(model, build, hw, ctx, "f16", False, "gpu", gpus, host, model.dims.n_layer,
                         tokens_per_s=tokens_per_second(reads, s.efficiency), notes=notes)


def vision_not_counted(model: Model) -> bool:
    """A multimodal release (architectures[0] a *ForConditionalGeneration, transformers' naming) sized from a
    config without vision_config (a catalog entry summarising the language model): its vision tower is unknown."""
    names = (model.config or {}).get("architectures") or [""]
    return (model.checkpoint is None and str(names[0]).endswith("ForConditionalGeneration")
            and "vision_config" not in model.config)


def runs_gptq(hw: Hardware) -> bool:
    """GPTQ rows are for CUDA GPUs (transformers' GPTQModel kernels, vLLM); not a Mac, not CPU only."""
    return hw.backend == "cuda" and bool(hw.gpus) and not hw.unified


def gptq_candidates(model: Model, hw: Hardware, req: Request, types: list[str] | None = None) -> list[GPTQCandidate]:
    """One candidate per GPTQ build (GPTQ_BUILDS, or the GPTQ types named): the longest context of fit's
    ladder that fits, else the shortest."""
    known = gptq_types()
    wanted = [(t.upper(), *known[t.upper()]) for t in types] if types else [(n.upper(), b, g) for n, b, g in GPTQ_BUILDS]
    if not runs_gptq(hw):
        if types:
            raise QwqqError("GPTQ folders run on a CUDA GPU (transformers / vLLM); this machine has none "
                            "(on a Mac use MLX, on a CPU a GGUF type)")
        return []
    if not model.has_source_shapes:  # fit_model says so when nothing else was asked for
        return []
    if "gptq" not in find_arch(model.config).jobs:  # fit_model: "qwqq cannot write a GPTQ folder for this model"
        return []
    if req.kv not in ("auto", "f16"):
        if types:
            raise QwqqError("GPTQ rows use a 16-bit KV cache; --kv q8_0 / q4_0 are llama.cpp's")
        return []
    ladder = [req.ctx] if req.ctx else [c for c in ctx_ladder(model.dims.ctx_train) if c >= req.min_ctx]
    ladder = ladder or [req.min_ctx]
    display = {n.upper(): n for n, _, _ in GPTQ_BUILDS + GPTQ_EXTRA}
    out = []
    for key, bits, gs in wanted:
        try:
            build = gptq_build(model, display[key], bits, gs)
        except ValueError as e:  # a dimension that does not pack at this width
            if types:
                raise QwqqError(f"{model.name}: no {display[key]} build ({e})") from None
            continue
        cands = [gptq_candidate(model, build, hw, ctx) for ctx in ladder]
        out.append(next((c for c in cands if c.fits), cands[-1]))
    return out
