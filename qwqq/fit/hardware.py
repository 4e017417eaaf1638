"""Hardware: named profiles (data/hardware.toml), --vram/--ram/--unified/--gpus specs, and detecting
this machine (nvidia-smi, /proc/meminfo, macOS sysctl)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources

from qwqq.errors import QwqqError

GiB = 2**30
DEFAULT_RAM_GIB = 32.0  # assumed when only a GPU is described
DEFAULT_RAM_BANDWIDTH = 60.0
DEFAULT_GPU_BANDWIDTH = {"cuda": 500.0, "metal": 200.0}  # when a detected GPU is not in the table

# Bandwidth (GB/s) of GPUs nvidia-smi may name: matched as substrings of the reported name.
GPU_BANDWIDTH = {
    "RTX 5090": 1792, "RTX 4090": 1008, "RTX 4080": 717, "RTX 4070 Ti": 504, "RTX 4070": 504, "RTX 4060 Ti": 288,
    "RTX 4060": 272, "RTX 3090": 936, "RTX 3080": 760, "RTX 3070": 448, "RTX 3060": 360, "A100": 2039, "H100": 3350,
    "H200": 4800, "L40": 864, "A6000": 768, "A10": 600, "T4": 320,
}


@dataclass(frozen=True)
class GPU:
    name: str
    vram_bytes: int  # what the GPU may use (a Mac: its working-set limit)
    bandwidth_gbs: float
    free_bytes: int | None = None  # detected free memory, when known


@dataclass(frozen=True)
class Hardware:
    name: str
    backend: str  # "cuda" | "metal" | "cpu"
    gpus: tuple[GPU, ...] = ()
    ram_bytes: int = 0
    ram_bandwidth_gbs: float = DEFAULT_RAM_BANDWIDTH
    unified: bool = False
    id: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def vram_bytes(self) -> int:
        return sum(g.vram_bytes for g in self.gpus)

    def describe(self) -> str:
        if self.unified:
            g = self.gpus[0]
            return (f"{self.name}: {self.ram_bytes / GiB:.0f} GiB unified, GPU limit {g.vram_bytes / GiB:.1f} GiB, "
                    f"{g.bandwidth_gbs:.0f} GB/s")
        parts = []
        if self.gpus:
            sizes = {round(g.vram_bytes / GiB, 1) for g in self.gpus}
            each = f"{self.gpus[0].vram_bytes / GiB:.0f} GiB" if len(sizes) == 1 else "+".join(
                f"{g.vram_bytes / GiB:.0f}" for g in self.gpus) + " GiB"
            n = f"{len(self.gpus)}x " if len(self.gpus) > 1 else ""
            parts.append(f"{n}{each} GPU ({self.gpus[0].bandwidth_gbs:.0f} GB/s)")
        parts.append(f"{self.ram_bytes / GiB:.0f} GiB RAM ({self.ram_bandwidth_gbs:.0f} GB/s)")
        return f"{self.name}: " + ", ".join(parts)

    def to_json(self) -> dict:
        return {"name": self.name, "id": self.id, "backend": self.backend, "unified": self.unified,
                "gpus": [{"name": g.name, "vram_bytes": g.vram_bytes, "bandwidth_gbs": g.bandwidth_gbs} for g in self.gpus],
                "ram_bytes": self.ram_bytes, "ram_bandwidth_gbs": self.ram_bandwidth_gbs, "notes": list(self.notes)}


def mac_gpu_limit(ram_bytes: int) -> int:
    """Metal's default GPU working-set limit (recommendedMaxWorkingSetSize): about 2/3 of RAM on
    small Macs (16 GB: 10.67 GiB; 32 GB: 21.3 GiB, as llama.cpp logs show) and 3/4 on large ones
    (64 GB: 48 GiB, 96 GB: 72 GiB, 128 GB: 96 GiB). 36 GB is taken as small (the conservative
    reading). `sudo sysctl iogpu.wired_limit_mb=N` raises it; pass --vram to say so."""
    frac = 2 / 3 if ram_bytes <= 36 * GiB else 3 / 4
    return int(ram_bytes * frac)


# --------------------------------------------------------------------------- profiles
@cache
def _profile_data() -> tuple[dict, ...]:
    text = resources.files("qwqq.fit").joinpath("data/hardware.toml").read_text(encoding="utf-8")
    return tuple(tomllib.loads(text)["profile"])


@cache
def backend_data() -> dict:
    text = resources.files("qwqq.fit").joinpath("data/backends.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def profile_ids() -> list[str]:
    return [p["id"] for p in _profile_data()]


def profile(pid: str) -> Hardware:
    for p in _profile_data():
        if p["id"] == pid.strip().lower():
            return _from_profile(p)
    raise QwqqError(f"unknown profile {pid!r}; choose one of {', '.join(profile_ids())}")


def profiles() -> list[Hardware]:
    return [_from_profile(p) for p in _profile_data()]


def _from_profile(p: dict) -> Hardware:
    backend = p["backend"]
    if backend == "metal":
        ram = int(p["unified_gib"] * GiB)
        limit = int(p["gpu_limit_gib"] * GiB) if "gpu_limit_gib" in p else mac_gpu_limit(ram)
        gpu = GPU("Apple GPU", limit, float(p["gpu_bandwidth_gbs"]))
        return Hardware(p["name"], "metal", (gpu,), ram, float(p["gpu_bandwidth_gbs"]), True, p["id"])
    gpus = ()
    if backend == "cuda":
        g = GPU(p["gpu_name"], int(p["gpu_vram_gib"] * GiB), float(p["gpu_bandwidth_gbs"]))
        gpus = (g,) * int(p.get("gpu_count", 1))
    return Hardware(p["name"], backend, gpus, int(p["ram_gib"] * GiB), float(p["ram_bandwidth_gbs"]), False, p["id"])


# --------------------------------------------------------------------------- specs from flags
def parse_gpus(spec: str) -> list[float]:
    """'4x24' -> [24, 24, 24, 24]; '24,24,12' -> [24, 24, 12]; '2x24,12' too. GiB each."""
    out: list[float] = []
    for part in spec.replace(" ", "").lower().split(","):
        m = re.fullmatch(r"(?:(\d+)x)?(\d+(?:\.\d+)?)(?:gi?b?)?", part)
        if not m or float(m.group(2)) <= 0 or (m.group(1) and int(m.group(1)) < 1):
            raise QwqqError(f"bad --gpus {spec!r}: write COUNTxGIB (4x24) or a list of sizes (24,24,12)")
        out += [float(m.group(2))] * int(m.group(1) or 1)
    if len(out) > 64:
        raise QwqqError(f"bad --gpus {spec!r}: more than 64 GPUs")
    return out


def from_flags(*, vram: float | None = None, ram: float | None = None, unified: float | None = None,
               gpus: str | None = None, bandwidth: float | None = None, ram_bandwidth: float | None = None) -> Hardware:
    """A machine described on the command line."""
    for flag, v in (("--vram", vram), ("--ram", ram), ("--unified", unified), ("--bandwidth", bandwidth),
                    ("--ram-bandwidth", ram_bandwidth)):
        if v is not None and not v > 0:
            raise QwqqError(f"{flag} must be a positive number, not {v}")
    notes = []
    if unified is not None:
        if gpus:
            raise QwqqError("--unified describes a Mac; it does not go with --gpus")
        ram_b = int(unified * GiB)
        limit = int(vram * GiB) if vram is not None else mac_gpu_limit(ram_b)
        bw = bandwidth or DEFAULT_GPU_BANDWIDTH["metal"]
        if bandwidth is None:
            notes.append(f"GPU bandwidth {bw:.0f} GB/s assumed (--bandwidth)")
        name = f"Mac with {unified:g} GB unified memory"
        return Hardware(name, "metal", (GPU("Apple GPU", limit, bw),), ram_b, bw, True, None, tuple(notes))
    sizes = parse_gpus(gpus) if gpus else ([vram] if vram is not None else [])
    if gpus and vram is not None:
        raise QwqqError("give --vram (one GPU) or --gpus (several), not both")
    if ram is None:
        notes.append(f"{DEFAULT_RAM_GIB:.0f} GiB system RAM assumed (--ram)")
    ram_b = int((ram if ram is not None else DEFAULT_RAM_GIB) * GiB)
    rbw = ram_bandwidth or DEFAULT_RAM_BANDWIDTH
    if not sizes:
        return Hardware(f"CPU only, {ram_b / GiB:.0f} GiB RAM", "cpu", (), ram_b, rbw, False, None, tuple(notes))
    bw = bandwidth or _guess_bandwidth(sizes[0])
    if bandwidth is None:
        notes.append(f"GPU bandwidth {bw:.0f} GB/s assumed (--bandwidth)")
    gpu_list = tuple(GPU(f"{s:g} GB GPU", int(s * GiB), bw) for s in sizes)
    n = f"{len(sizes)}x " if len(sizes) > 1 and len(set(sizes)) == 1 else ""
    name = f"{n}{sizes[0]:g} GB GPU" if len(set(sizes)) == 1 else "+".join(f"{s:g}" for s in sizes) + " GB GPUs"
    return Hardware(name, "cuda", gpu_list, ram_b, rbw, False, None, tuple(notes))


def _guess_bandwidth(vram_gib: float) -> float:
    """A plausible bandwidth for an unnamed GPU of this size (the catalog's cards as anchors)."""
    if vram_gib <= 8:
        return 272.0
    if vram_gib <= 12:
        return 360.0
    if vram_gib <= 16:
        return 448.0
    if vram_gib <= 24:
        return 936.0
    if vram_gib <= 48:
        return 864.0
    return 2039.0


# --------------------------------------------------------------------------- detection
def detect() -> Hardware:
    """This machine: NVIDIA GPUs through nvidia-smi, a Mac through sysctl, else CPU only."""
    ram = _ram_bytes()
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return _detect_mac(ram)
    gpus = _nvidia_gpus()
    rbw = DEFAULT_RAM_BANDWIDTH
    notes = (f"RAM bandwidth {rbw:.0f} GB/s assumed (--ram-bandwidth)",)
    if gpus:
        name = f"this machine ({len(gpus)}x {gpus[0].name})" if len(gpus) > 1 else f"this machine ({gpus[0].name})"
        return Hardware(name, "cuda", tuple(gpus), ram, rbw, False, None, notes)
    return Hardware("this machine (CPU only)", "cpu", (), ram, rbw, False, None, notes)


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    v = _sysctl("hw.memsize")
    if v and v.isdigit():
        return int(v)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return int(DEFAULT_RAM_GIB * GiB)


def _sysctl(key: str) -> str | None:
    if not shutil.which("sysctl"):
        return None
    try:
        r = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _detect_mac(ram: int) -> Hardware:
    chip = _sysctl("machdep.cpu.brand_string") or "Apple silicon"
    wired = _sysctl("iogpu.wired_limit_mb")
    limit = int(wired) * 2**20 if wired and wired.isdigit() and int(wired) > 0 else mac_gpu_limit(ram)
    bw = _mac_bandwidth(chip, ram)
    gpu = GPU(chip, limit, bw)
    return Hardware(f"this machine ({chip}, {ram / GiB:.0f} GB)", "metal", (gpu,), ram, bw, True)


def _mac_bandwidth(chip: str, ram: int) -> float:
    table = [("M4 Max", 546 if ram > 36 * GiB else 410), ("M3 Max", 400 if ram > 36 * GiB else 300), ("M2 Max", 400),
             ("M1 Max", 400), ("M4 Pro", 273), ("M3 Pro", 150), ("M2 Pro", 200), ("M1 Pro", 200), ("M3 Ultra", 819),
             ("M2 Ultra", 800), ("M1 Ultra", 800), ("M4", 120), ("M3", 100), ("M2", 100), ("M1", 68)]
    for key, bw in table:
        if key in chip:
            return float(bw)
    return DEFAULT_GPU_BANDWIDTH["metal"]


def parse_nvidia_smi(text: str) -> list[GPU]:
    """Lines of `nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        name, total, free = parts[0], parts[1], parts[2]
        try:
            total_b, free_b = int(float(total)) * 2**20, int(float(free)) * 2**20
        except ValueError:
            continue
        bw = next((float(b) for k, b in GPU_BANDWIDTH.items() if k in name), DEFAULT_GPU_BANDWIDTH["cuda"])
        gpus.append(GPU(name.replace("NVIDIA ", "").replace("GeForce ", ""), total_b, bw, free_b))
    return gpus


def _nvidia_gpus() -> list[GPU]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        r = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(r.stdout) if r.returncode == 0 else []


def with_free_memory(hw: Hardware) -> Hardware:
    """Budget a detected GPU by what is free now, not its total (a desktop holds some for the display)."""
    gpus = tuple(replace(g, vram_bytes=min(g.vram_bytes, g.free_bytes)) if g.free_bytes is not None else g for g in hw.gpus)
    return replace(hw, gpus=gpus)
