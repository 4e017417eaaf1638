"""Choosing: which build, context, KV type and placement a machine runs best, and the report `qwqq fit` prints.

For each build (a mixture of a model, or an existing file) fit looks for the largest context that
fits with everything on the GPU(s); failing that, it keeps MoE experts or whole layers in system
RAM (as llama.cpp's --n-cpu-moe / -ngl do) or runs on the CPU alone, and says how fast each
choice decodes. Memory arithmetic lives in memory.py, placing one build in place.py; this module
searches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache

from qwqq.errors import QwqqError
from qwqq.fit import hardware as hwmod
from qwqq.fit.candidate import Candidate, Request, ctx_ladder, placement_text, speed_text
from qwqq.fit.constants import backend_constants
from qwqq.fit.gptq import gptq_candidates, is_gptq_type
from qwqq.fit.hardware import GiB, Hardware
from qwqq.fit.memory import KV_NEEDS_FLASH_ATTN, KV_TYPES
from qwqq.fit.mlx import mlx_candidates
from qwqq.fit.place import place
from qwqq.fit.subject import Build, Model, catalog, from_catalog, resolve

DEFAULT_TYPES = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")
OFFLOAD_CTX = 16384  # the longest context fit proposes when layers run from system RAM (unless --ctx)
LOW_BIT_TYPES = ("Q3", "Q2", "IQ3", "IQ2", "IQ1")  # catalog: shown only when nothing of 4 bits or more fits
MIN_SPEED = 5.0  # tok/s: a 4000-token reasoning answer in under 15 minutes (catalog ranking)
SHORT_CTX = 4096  # when nothing fits, fit also says whether a context this short would
TIER = {"gpu": 0, "offload": 1, "cpu": 2}


# --------------------------------------------------------------------------- searching
def kv_groups(req: Request) -> list[list[str]]:
    if req.kv != "auto":
        if req.kv not in KV_TYPES:
            raise QwqqError(f"unknown --kv {req.kv!r}; choose f16, q8_0, q4_0 or auto")
        if req.kv in KV_NEEDS_FLASH_ATTN and not req.flash_attn:
            raise QwqqError(f"--kv {req.kv} needs flash attention (drop --no-flash-attn)")
        return [[req.kv]]
    return [["f16", "q8_0"], ["q4_0"]] if req.flash_attn else [["f16"]]


def best_for_build(model: Model, build: Build, hw: Hardware, req: Request) -> Candidate:
    """The largest context (then the lightest KV type) that fits: all on the GPU first, then with
    offload or from RAM; if nothing fits, the smallest configuration, marked as not fitting."""
    ladder = [req.ctx] if req.ctx else [c for c in ctx_ladder(model.dims.ctx_train) if c >= req.min_ctx]
    ladder = ladder or [req.min_ctx]
    groups = kv_groups(req)

    def first_fit(ctxs: list[int], offload: bool) -> Candidate | None:
        """KV groups in order of preference; within one, the largest context, then the lightest type."""
        tries = (place(model, build, hw, ctx, kv, req.flash_attn, offload=offload)
                 for kvs in groups for ctx in ctxs for kv in kvs)
        return next((c for c in tries if c.fits), None)

    slow = [req.ctx] if req.ctx else ([c for c in ladder if c <= OFFLOAD_CTX] or ladder[-1:])
    return ((first_fit(ladder, offload=False) if hw.gpus else None) or first_fit(slow, offload=True)
            or place(model, build, hw, slow[-1], groups[-1][-1], req.flash_attn, offload=True))


def rank_key(c: Candidate, prefer: str = "quality"):
    tps = c.tokens_per_s or 0.0
    lossy_kv = c.kv == "q4_0"  # a 4-bit KV cache costs quality too: ranked after f16 / q8_0 ones
    partial = c.memory_lower_bound  # memory fit cannot fully account for (GPTQ's runtime overhead): after the rest
    if prefer == "speed":
        return (not c.fits, TIER[c.mode], partial, lossy_kv, -tps, -c.build.bits_per_weight, -c.ctx)
    return (not c.fits, TIER[c.mode], partial, lossy_kv, -round(c.build.bits_per_weight, 2), -c.ctx, -tps)


class NoBuilds(QwqqError):
    """The types asked for have no build for this model (GPTQ of a model qwqq cannot write)."""


def fit_model(model: Model, hw: Hardware, req: Request, types: list[str] | None = None) -> list[Candidate]:
    """Candidates for one model, best first: one per GGUF type (an existing file: one per KV type)."""
    if req.prefer not in ("quality", "speed"):
        raise QwqqError(f"unknown --prefer {req.prefer!r}; choose quality or speed")
    if model.source == "gguf":
        if types:
            raise QwqqError("--type does not apply to an existing .gguf file (its types are fixed)")
        b = model.build("")
        if req.kv == "auto":
            kvs = ["f16", "q8_0", "q4_0"] if req.flash_attn else ["f16"]
            cands = [best_for_build(model, b, hw, Request(req.ctx, kv, req.min_ctx, req.flash_attn, req.prefer))
                     for kv in kvs]
            cands.sort(key=lambda c: (not c.fits, TIER[c.mode], -c.ctx, list(KV_TYPES).index(c.kv)))
            return cands
        return [best_for_build(model, b, hw, req)]
    gptq_types = [t for t in types or () if is_gptq_type(t)]
    type_list = [t.upper() for t in types if not is_gptq_type(t)] if types else list(DEFAULT_TYPES)
    cands = [best_for_build(model, model.build(t), hw, req) for t in type_list]
    if not types:  # on a Mac, the MLX folders `qwqq quantize --format mlx` writes (after GGUF at equal rank)
        cands += mlx_candidates(model, hw, req)
    if not types or gptq_types:  # on a CUDA GPU, the GPTQ folders `qwqq quantize --format gptq` writes
        cands += gptq_candidates(model, hw, req, gptq_types or None)
    if not cands:
        raise NoBuilds(f"{model.name}: qwqq cannot write a GPTQ folder for this model; ask for a GGUF --type")
    if model.approximate:
        for c in cands:
            c.notes.append("approximate shape model (see docs/fit.md)")
    cands.sort(key=lambda c: rank_key(c, req.prefer))
    return cands


@cache
def catalog_models() -> tuple[Model, ...]:
    return tuple(from_catalog(e) for e in catalog())


def fit_catalog(hw: Hardware, req: Request, types: list[str] | None = None) -> list[Candidate]:
    """One candidate per catalog model, best first.

    Each model shows its best 4-bit-or-better type that fits (lower only if nothing else does), on
    its best tier (all on the GPU, else offload, else CPU), the highest quality that still decodes
    at MIN_SPEED, else the fastest. Models are ranked: usable speed first, then bigger models, then
    the tier; `--prefer speed` ranks by speed alone."""
    picks: list[Candidate] = []
    for m in catalog_models():
        try:
            cands = fit_model(m, hw, req, types)
        except NoBuilds:
            continue
        fitting = [c for c in cands if c.fits]
        good = [c for c in fitting if not c.build.type_name.startswith(LOW_BIT_TYPES)] or fitting
        if not good:
            picks.append(cands[0])
            continue
        top = min(TIER[c.mode] for c in good)
        same = [c for c in good if TIER[c.mode] == top]
        fast = [c for c in same if (c.tokens_per_s or 0.0) >= MIN_SPEED]
        picks.append(fast[0] if fast else max(same, key=lambda c: c.tokens_per_s or 0.0))

    def key(c: Candidate):
        tps = c.tokens_per_s or 0.0
        if req.prefer == "speed":
            return (not c.fits, -tps, -c.model.n_params)
        return (not c.fits, c.kv == "q4_0", tps < MIN_SPEED, -c.model.n_params, TIER[c.mode],
                -c.build.bits_per_weight, -c.ctx)

    return sorted(picks, key=key)


# --------------------------------------------------------------------------- the command
@dataclass
class Report:
    hardware: Hardware
    model: Model | None
    candidates: list[Candidate]
    advice: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return any(c.fits for c in self.candidates)

    def to_json(self) -> list[dict]:
        out = []
        for c in self.candidates:
            d = c.to_json()
            d["hardware_detail"] = self.hardware.to_json()
            if self.advice:
                d["advice"] = self.advice
            out.append(d)
        return out


def machine(*, vram=None, ram=None, unified=None, gpus=None, profile=None, bandwidth=None,
            ram_bandwidth=None) -> Hardware:
    """The hardware a fit is for: a named profile, the flags, or (neither) this machine."""
    if profile:
        if any(v is not None for v in (vram, unified, gpus)):
            raise QwqqError("--profile names the hardware; it does not go with --vram, --unified or --gpus")
        hw = hwmod.profile(profile)
        if ram is not None:
            hw = replace(hw, ram_bytes=int(ram * GiB))
        return hw
    if any(v is not None for v in (vram, ram, unified, gpus)):
        return hwmod.from_flags(vram=vram, ram=ram, unified=unified, gpus=gpus, bandwidth=bandwidth,
                                ram_bandwidth=ram_bandwidth)
    return hwmod.with_free_memory(hwmod.detect())


def run_fit(model_spec: str | None, hw: Hardware, req: Request, types: list[str] | None = None,
            mtp: bool = True) -> Report:
    if req.ctx is not None and req.ctx < 1:
        raise QwqqError("--ctx must be a positive number of tokens")
    if req.min_ctx < 1:
        raise QwqqError("--min-ctx must be a positive number of tokens")
    kv_groups(req)  # validate --kv early
    if model_spec is None and not mtp:
        raise QwqqError("--no-mtp sizes one model without its multi-token-prediction block: name it (qwqq fit MODEL --no-mtp)")
    if model_spec is None:
        cands = fit_catalog(hw, req, types)
        if not cands:
            raise QwqqError("no catalog model has a build of the types asked for")
        fitting = [c for c in cands if c.fits]
        report = Report(hw, None, fitting)
        if not fitting:
            smallest = min(cands, key=lambda c: c.total_bytes)
            report.candidates = [smallest]
            report.advice.append(
                f"nothing in the catalog fits this machine; the smallest configuration "
                f"({smallest.model.name} {smallest.build.type_name}, ctx {smallest.ctx}) needs "
                f"{_gib(smallest.total_bytes)} in all")
        return report
    model = resolve(model_spec, mtp=mtp)
    cands = fit_model(model, hw, req, types)
    report = Report(hw, model, cands)
    if not any(c.fits for c in cands):
        report.advice += advise(model, hw, req, cands)
    return report


def advise(model: Model, hw: Hardware, req: Request, cands: list[Candidate]) -> list[str]:
    """When nothing fits: say so, say what would, and name the best smaller model that does."""
    out = [f"{model.name} does not fit {hw.name} with any of the types tried"
           + (f" at ctx {req.ctx}" if req.ctx else f" at ctx >= {req.min_ctx}") + "."]
    gguf = [c for c in cands if c.format == "gguf"]
    consts = backend_constants()
    if not gguf:  # only GPTQ types were asked for: all on the GPU or nothing
        s = min(cands, key=lambda c: c.total_bytes)
        need = max(g.total for g in s.gpus) + consts.margin["cuda"] if s.gpus else s.total_bytes
        return out + [f"Smallest configuration tried: {s.build.type_name} at ctx {s.ctx}; it needs at least "
                      f"{_gib(need)} per GPU (a lower bound: the runtime's overhead is not measured)."]
    smallest = min(gguf, key=lambda c: c.total_bytes)
    b, ctx, kv, fa = smallest.build, smallest.ctx, smallest.kv, smallest.flash_attn
    backend = hw.backend if hw.backend != "cpu" else "cuda"
    bw = hw.gpus[0].bandwidth_gbs if hw.gpus else 500.0
    gpu = place(model, b, Hardware("any GPU", backend, (hwmod.GPU("any", 2**60, bw),), 2**60), ctx, kv, fa, offload=False)
    need_gpu = gpu.gpus[0].total + consts.margin[backend]
    cpu = place(model, b, Hardware("any CPU", "cpu", (), 2**60, hw.ram_bandwidth_gbs), ctx, kv, fa)
    need_ram = cpu.host.total
    need_ram = max(need_ram + consts.reserve_min, int(need_ram / (1 - consts.reserve_fraction)))
    where = "Mac GPU working set" if hw.unified else "GPU memory"
    out.append(f"Smallest configuration tried: {b.type_name} at ctx {ctx} with a {kv} KV cache; it needs "
               f"{_gib(need_gpu)} of {where} to run entirely on the GPU, or {_gib(need_ram)} of system RAM "
               f"to run on the CPU ({speed_text(cpu)} there).")
    short = SHORT_CTX
    if (req.ctx or req.min_ctx) > short:
        fits_short = [c for c in fit_model(model, hw, Request(short, req.kv, short, req.flash_attn, req.prefer))
                      if c.fits]
        if fits_short:
            c = fits_short[0]
            out.append(f"With a {short}-token context it fits: {c.build.type_name}, {c.kv} KV, "
                       f"GPU layers {placement_text(c)}, {speed_text(c)} (short for a reasoning model).")
    smaller = [c for c in fit_catalog(hw, Request(None, req.kv, req.min_ctx, req.flash_attn, req.prefer))
               if c.fits and c.model.n_params < model.n_params]
    if smaller:
        s = smaller[0]
        out.append(f"Best smaller model that fits: {s.model.name} {s.build.type_name} "
                   f"(ctx {s.ctx}, {s.kv} KV, {speed_text(s)}).")
    return out


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"
