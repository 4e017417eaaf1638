"""What fit proposes: one build placed on one machine (Candidate), the memory it takes on each device
(DeviceUse), what was asked for (Request) and the contexts fit tries (the ctx ladder); the commands that
run a candidate, and the words for its placement and speed."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwqq.fit.constants import backend_constants
from qwqq.fit.hardware import Hardware
from qwqq.fit.subject import Build, Model

CTX_STEPS = (131072, 98304, 65536, 49152, 32768, 24576, 16384, 12288, 8192, 6144, 4096, 2048)


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
            quantize = f"qwqq quantize {m.ref} --type {self.build.type_name}" + ("" if m.mtp else " --no-mtp")
        # every choice fit made, so that run and serve apply it rather than fit again
        placed = f" --ctx {self.ctx} --kv {self.kv}" + ("" if self.flash_attn else " --no-flash-attn")
        placed += f" --n-gpu-layers {self.ngl_flag}"
        split = ",".join(str(g.layers) for g in self.gpus) if len(self.gpus) > 1 else ""  # layers per GPU
        if split:
            placed += f" --tensor-split {split}"
        if self.cpu_moe_layers:
            placed += f" --n-cpu-moe {self.cpu_moe_layers}"
        run, serve = f"qwqq run {self.gguf_path}{placed}", f"qwqq serve {self.gguf_path}{placed}"
        llama = f"llama-server -m {self.gguf_path} -c {self.ctx} -ngl {self.ngl_flag if self.gpus else 0}"
        llama += " -fa on" if self.flash_attn else " -fa off"
        if self.kv != "f16":
            llama += f" -ctk {self.kv} -ctv {self.kv}"
        if self.cpu_moe_layers:
            llama += f" --n-cpu-moe {self.cpu_moe_layers}"
        if split:
            llama += f" -ts {split}"
        return {"quantize": quantize, "run": run, "serve": serve, "llama_cpp": llama}

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
            "speed_model": {"efficiency": backend_constants().efficiency, "kv_fill": backend_constants().kv_fill},
            "hardware": self.hardware.id or self.hardware.name, "commands": self.commands(), "notes": self.notes,
            "approximate": self.model.approximate,
        }


# --------------------------------------------------------------------------- in words
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
