"""Placing one build on one machine: all on the GPU(s) if it fits, else MoE experts, then whole layers,
in system RAM (as llama.cpp's --n-cpu-moe / -ngl do), or everything on the CPU; the memory each device
then holds and how fast it decodes. The memory arithmetic itself lives in memory.py."""

from __future__ import annotations

from qwqq.errors import QwqqError
from qwqq.fit.candidate import Candidate, DeviceUse
from qwqq.fit.constants import BackendConstants, backend_constants
from qwqq.fit.hardware import Hardware
from qwqq.fit.memory import (KV_NEEDS_FLASH_ATTN, KV_TYPES, Weights, compute_bytes, output_buffer_bytes, state_bytes,
                             tokens_per_second)
from qwqq.fit.subject import Build, Model


def place(model: Model, build: Build, hw: Hardware, ctx: int, kv: str, flash_attn: bool = True, *,
          offload: bool = True, consts: BackendConstants | None = None) -> Candidate:
    """The best placement of one build at one context and KV type: all on the GPU(s) if it fits,
    else (with `offload`) MoE experts, then whole layers, in system RAM; a CPU-only machine runs
    everything from RAM."""
    consts = consts or backend_constants()
    if kv not in KV_TYPES:
        raise QwqqError(f"unknown KV cache type {kv!r}; choose f16, q8_0, q4_0 or auto")
    if kv in KV_NEEDS_FLASH_ATTN and not flash_attn:
        raise QwqqError(f"a {kv} KV cache needs flash attention in llama.cpp")
    w = build.split(model.dims.n_layer)
    L = model.dims.n_layer
    if hw.backend == "cpu" or not hw.gpus:
        return _layout(model, build, hw, ctx, kv, flash_attn, w, 0, 0, consts)
    full = _layout(model, build, hw, ctx, kv, flash_attn, w, L, 0, consts)
    if full.fits or not offload:
        return full
    if model.dims.moe:  # experts of the first k layers to system RAM, attention and the rest on the GPU
        gpus_fit = lambda k: all(g.fits for g in _layout(model, build, hw, ctx, kv, flash_attn, w, L, k, consts).gpus)
        if gpus_fit(L):
            lo, hi = 1, L
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if gpus_fit(mid) else (mid + 1, hi)
            return _layout(model, build, hw, ctx, kv, flash_attn, w, L, lo, consts)
    best = None
    lo, hi = 1, L - 1  # the most layers on the GPU(s) that fit (the rest, experts included, in RAM)
    while lo <= hi:
        mid = (lo + hi) // 2
        c = _layout(model, build, hw, ctx, kv, flash_attn, w, mid, L if model.dims.moe else 0, consts)
        if all(g.fits for g in c.gpus):
            best, lo = c, mid + 1
        else:
            hi = mid - 1
    return best if best is not None else _layout(model, build, hw, ctx, kv, flash_attn, w, 0, 0, consts)


def _layout(model: Model, build: Build, hw: Hardware, ctx: int, kv: str, fa: bool, w: Weights, n_gpu: int,
            cpu_moe: int, consts: BackendConstants) -> Candidate:
    """Memory and speed with the last `n_gpu` layers (and the output) on the GPU(s) and the experts
    of the first `cpu_moe` layers in system RAM."""
    d, L = model.dims, model.dims.n_layer
    state = state_bytes(d, ctx, kv, pad=consts.pad)  # per layer: its KV cache, or a hybrid's recurrent state
    comp = lambda out: compute_bytes(d, ctx, fa, n_ubatch=consts.n_ubatch, fragmentation=consts.fragmentation,
                                     with_output=out, pad=consts.pad)
    backend = hw.backend if hw.gpus else "cpu"
    use_gpu = backend != "cpu" and n_gpu > 0
    gpu_start = L - n_gpu
    notes: list[str] = []

    def on_gpu_bytes(i: int) -> int:  # weights of layer i that live on its GPU
        return w.layers[i] - (w.experts[i] if i < cpu_moe else 0)

    # system RAM
    host = DeviceUse("RAM", consts.ram_budget(hw.ram_bytes), overhead=consts.overhead["cpu"])
    cpu_layers = range(0, gpu_start)
    host.layers = len(cpu_layers)
    host.weights = w.token_embd + w.layer_range(0, gpu_start) + sum(w.experts[i] for i in range(gpu_start, min(cpu_moe, L)))
    host.kv = sum(state[i] for i in cpu_layers)
    if not use_gpu:
        host.weights += w.output
        host.compute = comp(True) + output_buffer_bytes(d)
    elif host.layers or cpu_moe:
        host.compute = comp(False) + output_buffer_bytes(d)
    else:
        host.compute = output_buffer_bytes(d)

    gpus: list[DeviceUse] = []
    if use_gpu:
        gpus = [DeviceUse(f"GPU{j} ({g.name})" if len(hw.gpus) > 1 else g.name, g.vram_bytes - consts.margin[backend],
                          overhead=consts.overhead[backend]) for j, g in enumerate(hw.gpus)]
        partial = gpu_start > 0 or cpu_moe > 0
        cpu_part = max([w.layers[i] for i in range(gpu_start)] + [w.experts[i] for i in range(min(cpu_moe, L))] + [0])
        last = gpus[-1]
        last.weights = w.output + w.output_dup
        last.compute = comp(True)
        for g in gpus[:-1]:
            g.compute = comp(False)
        if partial:
            gpus[0].compute += consts.partial_offload_layers * cpu_part
        _assign_layers(gpus, [on_gpu_bytes(i) + state[i] for i in range(gpu_start, L)], state[gpu_start:],
                       [on_gpu_bytes(i) for i in range(gpu_start, L)])
        if hw.unified:  # the GPU's share comes out of the same RAM
            host.budget = consts.ram_budget(hw.ram_bytes) - sum(g.total for g in gpus)

    # speed: bytes read per generated token on each device
    n_e, n_u = d.n_expert, d.n_expert_used
    fill = consts.kv_fill
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
    tps = tokens_per_second(reads, consts.efficiency)

    mode = "cpu" if not use_gpu else ("gpu" if gpu_start == 0 and cpu_moe == 0 else "offload")
    if fa is False and kv == "f16" and ctx >= 16384:
        notes.append("without flash attention the attention scores need n_head x ctx x 2 KiB per 512-token batch")
    return Candidate(model, build, hw, ctx, kv, fa, mode, gpus, host, n_gpu if use_gpu else 0, cpu_moe if use_gpu else 0,
                     tps, notes)


def _assign_layers(gpus: list[DeviceUse], need: list[int], state: list[int], weights: list[int]) -> None:
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
        g.kv += sum(state[a:a + k])
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
