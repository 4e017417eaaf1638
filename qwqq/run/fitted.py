"""What a load gets from `qwqq fit` (run's and serve's): ctx, KV cache type, GPU layers, experts in RAM and the
split over several GPUs, fitted for this file on the machine (or a profile) where the user gave none;
those settings in words for status and start-up lines; and llama.cpp's own options refused in one line on
another backend.
"""

from __future__ import annotations

from rich.console import Console

from qwqq.errors import QwqqError
from qwqq.fit import search as fitting
from qwqq.run import experts
from qwqq.run import split as gpu_split


def fitted_settings(opts, backend: str, err: Console) -> dict:
    """ctx, KV type, GPU layers, experts in RAM and flash attention for the load: what the user gave, the rest
    from `qwqq fit` for this file on the named profile (or on this machine). Experts follow fit only where
    the GPU layers do (fit chose the two together)."""
    n_cpu_moe = experts.requested(opts.n_cpu_moe, opts.cpu_moe)
    given = {"ctx": opts.ctx, "kv_type": opts.kv, "n_gpu_layers": opts.n_gpu_layers}
    out = {"ctx": 4096 if opts.ctx is None else opts.ctx, "kv_type": opts.kv or "f16", "flash_attn": opts.flash_attn,
           "n_gpu_layers": -1 if opts.n_gpu_layers is None else opts.n_gpu_layers, "n_cpu_moe": n_cpu_moe or 0,
           "tensor_split": opts.tensor_split}
    if backend != "llama.cpp" or (opts.profile is None and None not in given.values()):
        return out
    hw = fitting.machine(profile=opts.profile)
    req = fitting.Request(ctx=opts.ctx or None, kv=opts.kv or "auto", min_ctx=min(opts.ctx or 2048, 2048),
                          flash_attn=opts.flash_attn)
    report = fitting.run_fit(str(opts.model), hw, req)
    best = next((c for c in report.candidates if c.fits), None)
    if best is None:
        err.print(f"warning: this model does not fit {hw.name} with the requested settings; "
                  "see `qwqq fit` for what would", style="yellow", markup=False)
        return out
    if opts.ctx is None:
        out["ctx"] = best.ctx
    if opts.kv is None:
        out["kv_type"] = best.kv
    if opts.n_gpu_layers is None:
        out["n_gpu_layers"] = best.ngl_flag if best.gpus and best.mode != "cpu" else (0 if hw.gpus else -1)
        if n_cpu_moe is None:
            out["n_cpu_moe"] = best.cpu_moe_layers
        if opts.tensor_split is None and len(best.gpus) > 1:
            out["tensor_split"] = [float(g.layers) for g in best.gpus]
    if err.is_terminal or opts.debug:
        err.print(f"fitted to {hw.name}: {placement(out, bool(hw.gpus))}", style="dim", markup=False)
    return out


# llama.cpp's own options (run's and serve's): set?, and what it is, for the one line on another backend
LLAMA_CPP_ONLY = ((lambda o: experts.requested(o.n_cpu_moe, o.cpu_moe), "--n-cpu-moe / --cpu-moe place llama.cpp's expert tensors; they do"),
                  (lambda o: o.tensor_split is not None, "--tensor-split spreads llama.cpp's layers over GPUs; it does"),
                  (lambda o: o.kv is not None, "--kv sets llama.cpp's KV cache type; it does"))


def not_llama_cpp(backend: str, opts) -> None:
    """llama.cpp's own options, refused in one line on another backend rather than ignored."""
    for given, what in LLAMA_CPP_ONLY if backend != "llama.cpp" else ():
        if given(opts):
            raise QwqqError(f"{what} not apply to the {backend} backend")


def placement(settings: dict, gpu: bool) -> str:
    """ctx, KV cache, GPU layers and experts in words (fit's notice, serve's start-up line)."""
    ctx = "the model's own context" if settings["ctx"] == 0 else f"ctx {settings['ctx']}"
    n = settings["n_gpu_layers"]
    layers = ("all layers on the GPU" if n < 0 else f"{n} GPU layers") if gpu else "CPU only"
    moe = f", {experts.describe(settings['n_cpu_moe'])}" if settings.get("n_cpu_moe") else ""
    split = f", {gpu_split.describe(settings['tensor_split'])}" if gpu and settings.get("tensor_split") else ""
    return f"{ctx}, {settings['kv_type']} KV cache, {layers}{split}{moe}"


def experts_line(n_cpu_moe: int, overridden: list[str] | None) -> str:
    said = f" (llama.cpp moved {len(overridden)} expert tensors)" if overridden is not None else ""
    return f"{experts.describe(n_cpu_moe)}{said}"
