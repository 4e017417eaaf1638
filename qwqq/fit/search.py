"""Choosing: which GGUF type, context, KV type and layer placement a machine runs best.

For each build (a mixture of a model, or an existing file) fit looks for the largest context that
fits with everything on the GPU(s); failing that, it keeps MoE experts or whole layers in system
RAM (as llama.cpp's --n-cpu-moe / -ngl do) or runs on the CPU alone, and says how fast each
choice decodes. Memory arithmetic lives in memory.py; this module only places and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache

from qwqq.errors import QwqqError
from qwqq.fit import hardware as hwmod
from qwqq.fit.hardware import GiB, Hardware
from qwqq.fit.memory import (KV_NEEDS_FLASH_ATTN, KV_TYPES, MiB, Weights, compute_bytes, kv_bytes,
                                  output_buffer_bytes, tokens_per_second)
from qwqq.fit.subject import Build, Model, catalog, from_catalog, resolve

DEFAULT_TYPES = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")
CTX_STEPS = (131072, 98304, 65536, 49152, 32768, 24576, 16384, 12288, 8192, 6144, 4096, 2048)
OFFLOAD_CTX = 16384  # the longest context fit proposes when layers run from system RAM (unless --ctx)
LOW_BIT_TYPES = ("Q3", "Q2", "IQ3", "IQ2", "IQ1")  # catalog: shown only when nothing of 4 bits or more fits
MIN_SPEED = 5.0  # tok/s: a 4000-token reasoning answer in under 15 minutes (catalog ranking)
SHORT_CTX = 4096  # when nothing fits, fit also says whether a context this short would
TIER = {"gpu": 0, "offload": 1, "cpu": 2}


# --------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    n_ubatch: int = 512
    pad: int = 256
    fragmentation: float = 0.035
    repack_types: frozenset = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q2_K"})
    efficiency: float = 0.6
    kv_fill: float = 0.5
    overhead: dict = field(default_factory=dict)  # backend -> bytes
    margin: dict = field(default_factory=dict)  # backend -> bytes
    reserve_fraction: float = 0.10
    reserve_min: int = 2 * GiB
    partial_offload_layers: int = 1

    def ram_budget(self, ram: int) -> int:
        return ram - max(self.reserve_min, int(ram * self.reserve_fraction))


@cache
def calibration() -> Calibration:
    d = hwmod.backend_data()
    ll, sp, cpu = d["llama"], d["speed"], d["cpu"]
    return Calibration(
        n_ubatch=int(ll["n_ubatch"]), pad=int(ll["kv_cell_pad"]), fragmentation=float(ll["compute_fragmentation"]),
        repack_types=frozenset(ll["cpu_repack_types"]), efficiency=float(sp["efficiency"]), kv_fill=float(sp["kv_fill"]),
        overhead={b: int(d[b]["overhead_mib"] * MiB) for b in ("cpu", "cuda", "metal")},
        margin={b: int(d[b].get("margin_mib", 0) * MiB) for b in ("cpu", "cuda", "metal")},
        reserve_fraction=float(cpu["reserve_fraction"]), reserve_min=int(cpu["reserve_min_gib"] * GiB),
        partial_offload_layers=int(d["cuda"]["partial_offload_layers"]),
    )


# --------------------------------------------------------------------------- results
@dataclass
class DeviceUse:
    name: str
    budget: int
    weights: int = 0
    kv: int = 0
    compute: int = 0
    overhead: int = 0
    layers: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_json(self) -> dict:
        return {"name": self.name, "layers": self.layers, "weights_bytes": self.weights, "kv_bytes": self.kv,
                "compute_bytes": self.compute, "overhead_bytes": self.overhead, "total_bytes": self.total,
                "budget_bytes": self.budget, "fits": self.fits}


@dataclass
class Candidate:
    model: Model
    build: Build
    hardware: Hardware
    ctx: int
    kv: str
    flash_attn: bool
    mode: str  # "gpu" | "offload" | "cpu"
    gpus: list[DeviceUse]
    host: DeviceUse
    gpu_layers: int  # repeating layers on GPUs (the output layer goes with them)
    cpu_moe_layers: int = 0
    tokens_per_s: float | None = None
    notes: list[str] = field(default_factory=list)
    format = "gguf"  # a class attribute, not a field: mlx_fit.MLXCandidate says "mlx", gptq_fit's "gptq"
    memory_lower_bound = False  # True where part of the runtime's memory is not counted (GPTQ: not measured)

    @property
    def n_layers(self) -> int:
        return self.model.dims.n_layer

    @property
    def fits(self) -> bool:
        return all(g.fits for g in self.gpus) and self.host.fits

    @property
    def total_bytes(self) -> int:
        return sum(g.total for g in self.gpus) + self.host.total

    @property
    def kv_bytes(self) -> int:
        return sum(g.kv for g in self.gpus) + self.host.kv

    @property
    def ngl_flag(self) -> int:
        """llama.cpp's -ngl: the output layer counts as one more layer."""
        return self.gpu_layers + 1 if self.gpus and self.mode != "cpu" else 0

    @property
    def gguf_path(self) -> str:
        if self.model.source == "gguf":
            return self.model.ref
        return f"{self.model.ref.rstrip('/').split('/')[-1]}-{self.build.type_name}.gguf"

    def commands(self) -> dict:
        m = self.model
        quantize = None
        if m.source != "gguf" and m.quantizable:
            quantize = f"qwqq quantize {m.ref} --type {self.build.type_name}"
        run = f"qwqq run {self.gguf_path} --ctx {self.ctx}"
        if self.mode == "offload" and not self.cpu_moe_layers:
            run += f" --n-gpu-layers {self.ngl_flag}"
        if self.mode == "cpu" and self.hardware.gpus:
            run += " --n-gpu-layers 0"
        llama = f"llama-server -m {self.gguf_path} -c {self.ctx} -ngl {self.ngl_flag if self.gpus else 0}"
        llama += " -fa on" if self.flash_attn else " -fa off"
        if self.kv != "f16":
            llama += f" -ctk {self.kv} -ctv {self.kv}"
        if self.cpu_moe_layers:
            llama += f" --n-cpu-moe {self.cpu_moe_layers}"
        if len(self.gpus) > 1:
            llama += " -ts " + ",".join(str(g.layers) for g in self.gpus)
        return {"quantize": quantize, "run": run, "llama_cpp": llama}

    def to_json(self) -> dict:
        b = self.build
        return {
            "model": self.model.name, "source": self.model.source, "format": self.format, "type": b.type_name,
            "bits_per_weight": round(b.bits_per_weight, 3), "n_params": b.n_params, "file_bytes": b.file_bytes,
            "file_bytes_exact": b.header_exact, "weights_bytes": b.tensor_bytes, "ctx": self.ctx, "kv_type": self.kv,
            "flash_attn": self.flash_attn, "kv_bytes": self.kv_bytes,
            "compute_bytes": sum(g.compute for g in self.gpus) + self.host.compute,
            "total_bytes": self.total_bytes, "mode": self.mode, "fits": self.fits,
            "gpu_layers": self.gpu_layers, "n_layers": self.n_layers, "n_gpu_layers_flag": self.ngl_flag,
            "cpu_moe_layers": self.cpu_moe_layers, "gpus": [g.to_json() for g in self.gpus], "ram": self.host.to_json(),
            "tokens_per_s": round(self.tokens_per_s, 2) if self.tokens_per_s else None,
            "prompt_tokens_per_s": None, "prompt_speed": "not estimated",
            "speed_model": {"efficiency": calibration().efficiency, "kv_fill": calibration().kv_fill},
            "hardware": self.hardware.id or self.hardware.name, "commands": self.commands(), "notes": self.notes,
            "approximate": self.model.approximate,
        }


# --------------------------------------------------------------------------- placement
def place(model: Model, build: Build, hw: Hardware, ctx: int, kv: str, flash_attn: bool = True, *,
          offload: bool = True, cal: Calibration | None = None) -> Candidate:
    """The best placement of one build at one context and KV type: all on the GPU(s) if it fits,
    else (with `offload`) MoE experts, then whole layers, in system RAM; a CPU-only machine runs
    everything from RAM."""
    cal = cal or calibration()
    if kv not in KV_TYPES:
        raise QwqqError(f"unknown KV cache type {kv!r}; choose f16, q8_0, q4_0 or auto")
    if kv in KV_NEEDS_FLASH_ATTN and not flash_attn:
        raise QwqqError(f"a {kv} KV cache needs flash attention in llama.cpp")
    w = build.split(model.dims.n_layer)
    L = model.dims.n_layer
    if hw.backend == "cpu" or not hw.gpus:
        return _layout(model, build, hw, ctx, kv, flash_attn, w, 0, 0, cal)
    full = _layout(model, build, hw, ctx, kv, flash_attn, w, L, 0, cal)
    if full.fits or not offload:
        return full
    if model.dims.moe:  # experts of the first k layers to system RAM, attention and the rest on the GPU
        gpus_fit = lambda k: all(g.fits for g in _layout(model, build, hw, ctx, kv, flash_attn, w, L, k, cal).gpus)
        if gpus_fit(L):
            lo, hi = 1, L
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if gpus_fit(mid) else (mid + 1, hi)
            return _layout(model, build, hw, ctx, kv, flash_attn, w, L, lo, cal)
    best = None
    lo, hi = 1, L - 1  # the most layers on the GPU(s) that fit (the rest, experts included, in RAM)
    while lo <= hi:
        mid = (lo + hi) // 2
        c = _layout(model, build, hw, ctx, kv, flash_attn, w, mid, L if model.dims.moe else 0, cal)
        if all(g.fits for g in c.gpus):
            best, lo = c, mid + 1
        else:
            hi = mid - 1
    return best if best is not None else _layout(model, build, hw, ctx, kv, flash_attn, w, 0, 0, cal)


def _layout(model: Model, build: Build, hw: Hardware, ctx: int, kv: str, fa: bool, w: Weights, n_gpu: int,
            cpu_moe: int, cal: Calibration) -> Candidate:
    """Memory and speed with the last `n_gpu` layers (and the output) on the GPU(s) and the experts
    of the first `cpu_moe` layers in system RAM."""
    d, L = model.dims, model.dims.n_layer
    kv_layer = kv_bytes(d, ctx, kv, n_layers=1, pad=cal.pad)
    comp = lambda out: compute_bytes(d, ctx, fa, n_ubatch=cal.n_ubatch, fragmentation=cal.fragmentation,
                                     with_output=out, pad=cal.pad)
    backend = hw.backend if hw.gpus else "cpu"
    use_gpu = backend != "cpu" and n_gpu > 0
    gpu_start = L - n_gpu
    notes: list[str] = []

    def on_gpu_bytes(i: int) -> int:  # weights of layer i that live on its GPU
        return w.layers[i] - (w.experts[i] if i < cpu_moe else 0)

    # system RAM
    host = DeviceUse("RAM", cal.ram_budget(hw.ram_bytes), overhead=cal.overhead["cpu"])
    cpu_layers = range(0, gpu_start)
    host.layers = len(cpu_layers)
    host.weights = w.token_embd + w.layer_range(0, gpu_start) + sum(w.experts[i] for i in range(gpu_start, min(cpu_moe, L)))
    host.kv = kv_layer * len(cpu_layers)
    if not use_gpu:
        host.weights += w.output
        host.compute = comp(True) + output_buffer_bytes(d)
    elif host.layers or cpu_moe:
        host.compute = comp(False) + output_buffer_bytes(d)
    else:
        host.compute = output_buffer_bytes(d)

    gpus: list[DeviceUse] = []
    if use_gpu:
        gpus = [DeviceUse(f"GPU{j} ({g.name})" if len(hw.gpus) > 1 else g.name,
                          g.vram_bytes - cal.margin[backend], overhead=cal.overhead[backend]) for j, g in enumerate(hw.gpus)]
        partial = gpu_start > 0 or cpu_moe > 0
        cpu_part = max([w.layers[i] for i in range(gpu_start)] + [w.experts[i] for i in range(min(cpu_moe, L))] + [0])
        last = gpus[-1]
        last.weights = w.output + w.output_dup
        last.compute = comp(True)
        for g in gpus[:-1]:
            g.compute = comp(False)
        if partial:
            gpus[0].compute += cal.partial_offload_layers * cpu_part
        _assign_layers(gpus, [on_gpu_bytes(i) + kv_layer for i in range(gpu_start, L)], kv_layer,
                       [on_gpu_bytes(i) for i in range(gpu_start, L)])
        if hw.unified:  # the GPU's share comes out of the same RAM
            host.budget = cal.ram_budget(hw.ram_bytes) - sum(g.total for g in gpus)

    # speed: bytes read per generated token on each device
    n_e, n_u = d.n_expert, d.n_expert_used
    fill = cal.kv_fill
    reads = []
    lo = gpu_start if use_gpu else L
    for g, spec, (a, b) in zip(gpus, hw.gpus, _ranges(gpus, lo)):
        dense = w.active_per_token(a, b, n_e, n_u, experts=False)
        exp = sum(w.experts[i] * (n_u / n_e if n_e else 1.0) for i in range(max(a, cpu_moe), b))
        out = (w.output + w.output_dup) if g is gpus[-1] else 0
        reads.append((dense + exp + out + g.kv * fill, spec.bandwidth_gbs))
    cpu_read = w.active_per_token(0, lo, n_e, n_u) + host.kv * fill
    cpu_read += sum(w.experts[i] * (n_u / n_e if n_e else 1.0) for i in range(lo, min(cpu_moe, L)))
    if not use_gpu:
        cpu_read += w.output + w.output_dup
    reads.append((cpu_read, hw.ram_bandwidth_gbs))
    tps = tokens_per_second(reads, cal.efficiency)

    mode = "cpu" if not use_gpu else ("gpu" if gpu_start == 0 and cpu_moe == 0 else "offload")
    if fa is False and kv == "f16" and ctx >= 16384:
        notes.append("without flash attention the attention scores need n_head x ctx x 2 KiB per 512-token batch")
    return Candidate(model, build, hw, ctx, kv, fa, mode, gpus, host, n_gpu if use_gpu else 0, cpu_moe if use_gpu else 0,
                     tps, notes)


def _assign_layers(gpus: list[DeviceUse], need: list[int], kv_layer: int, weights: list[int]) -> None:
    """Split consecutive layers between GPUs: in proportion to the room each has left (what
    llama.cpp's default split by free memory does), else greedily from the last GPU backwards
    (a split llama.cpp takes with -ts). The first GPU takes any overflow, so it shows."""
    n = len(need)
    room = [max(0, g.budget - g.total) for g in gpus]
    counts = _proportional(n, room)
    if not _fits_counts(gpus, need, counts):
        counts, i = [0] * len(gpus), n - 1
        for j in range(len(gpus) - 1, -1, -1):
            used = gpus[j].total
            while i >= 0 and (used + need[i] <= gpus[j].budget or j == 0):
                used += need[i]
                counts[j] += 1
                i -= 1
    a = 0
    for g, k in zip(gpus, counts):
        g.layers += k
        g.weights += sum(weights[a:a + k])
        g.kv += kv_layer * k
        a += k


def _proportional(n: int, room: list[int]) -> list[int]:
    total = sum(room)
    if total <= 0:
        return [0] * (len(room) - 1) + [n]
    exact = [n * r / total for r in room]
    counts = [int(x) for x in exact]
    for j in sorted(range(len(room)), key=lambda j: exact[j] - counts[j], reverse=True)[:n - sum(counts)]:
        counts[j] += 1
    return counts


def _fits_counts(gpus: list[DeviceUse], need: list[int], counts: list[int]) -> bool:
    a = 0
    for g, k in zip(gpus, counts):
        if g.total + sum(need[a:a + k]) > g.budget:
            return False
        a += k
    return True


def _ranges(gpus: list[DeviceUse], start: int) -> list[tuple[int, int]]:
    out, a = [], start
    for g in gpus:
        out.append((a, a + g.layers))
        a += g.layers
    return out



# --------------------------------------------------------------------------- searching
@dataclass
class Request:
    ctx: int | None = None
    kv: str = "auto"
    min_ctx: int = 16384
    flash_attn: bool = True
    prefer: str = "quality"


def ctx_ladder(ctx_train: int) -> list[int]:
    top = ctx_train or 32768
    return [top] + [c for c in CTX_STEPS if c < top]


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
    from qwqq.fit.gptq import gptq_candidates, is_gptq_type

    gptq_types = [t for t in types or () if is_gptq_type(t)]
    type_list = [t.upper() for t in types if not is_gptq_type(t)] if types else list(DEFAULT_TYPES)
    cands = [best_for_build(model, model.build(t), hw, req) for t in type_list]
    if not types:  # on a Mac, the MLX folders `qwqq quantize --format mlx` writes (after GGUF at equal rank)
        from qwqq.fit.mlx import mlx_candidates

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


def run_fit(model_spec: str | None, hw: Hardware, req: Request, types: list[str] | None = None) -> Report:
    if req.ctx is not None and req.ctx < 1:
        raise QwqqError("--ctx must be a positive number of tokens")
    if req.min_ctx < 1:
        raise QwqqError("--min-ctx must be a positive number of tokens")
    kv_groups(req)  # validate --kv early
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
    model = resolve(model_spec)
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
    cal = calibration()
    if not gguf:  # only GPTQ types were asked for: all on the GPU or nothing
        s = min(cands, key=lambda c: c.total_bytes)
        need = max(g.total for g in s.gpus) + cal.margin["cuda"] if s.gpus else s.total_bytes
        return out + [f"Smallest configuration tried: {s.build.type_name} at ctx {s.ctx}; it needs at least "
                      f"{_gib(need)} per GPU (a lower bound: the runtime's overhead is not measured)."]
    smallest = min(gguf, key=lambda c: c.total_bytes)
    b, ctx, kv, fa = smallest.build, smallest.ctx, smallest.kv, smallest.flash_attn
    backend = hw.backend if hw.backend != "cpu" else "cuda"
    bw = hw.gpus[0].bandwidth_gbs if hw.gpus else 500.0
    gpu = place(model, b, Hardware("any GPU", backend, (hwmod.GPU("any", 2**60, bw),), 2**60), ctx, kv, fa, offload=False)
    need_gpu = gpu.gpus[0].total + cal.margin[backend]
    cpu = place(model, b, Hardware("any CPU", "cpu", (), 2**60, hw.ram_bandwidth_gbs), ctx, kv, fa)
    need_ram = cpu.host.total
    need_ram = max(need_ram + cal.reserve_min, int(need_ram / (1 - cal.reserve_fraction)))
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


def speed_text(c: Candidate) -> str:
    return f"~{c.tokens_per_s:.0f} tok/s" if c.tokens_per_s and c.tokens_per_s >= 10 else (
        f"~{c.tokens_per_s:.1f} tok/s" if c.tokens_per_s else "speed unknown")


def placement_text(c: Candidate) -> str:
    if c.mode == "cpu":
        return "none"
    if c.mode == "gpu":
        return "all"
    if c.cpu_moe_layers:
        return f"cpu-moe {c.cpu_moe_layers}" if c.gpu_layers == c.n_layers else f"{c.gpu_layers}/{c.n_layers}, moe"
    return f"{c.gpu_layers}/{c.n_layers}"


def unsupported_by_run(c: Candidate) -> list[str]:
    """What `qwqq run` (llama.cpp backend options: ctx, n_gpu_layers) cannot set yet."""
    out = []
    if c.format in ("mlx", "gptq"):  # not llama.cpp: run's llama.cpp options do not apply
        return out
    if c.flash_attn:
        out.append("flash attention")
    if c.kv != "f16":
        out.append(f"a {c.kv} KV cache")
    if c.cpu_moe_layers:
        out.append("experts in RAM (--n-cpu-moe)")
    if len(c.gpus) > 1:
        out.append("a tensor split")
    return out
