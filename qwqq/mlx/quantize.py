"""quantize --format mlx: a checkpoint -> the folder mlx-lm loads, in one streaming pass (the plan in
mlx/plan.py, the writer in mlx/writer.py)."""

from __future__ import annotations

import importlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwqq.errors import QwqqError, UnsupportedError
from qwqq.hf_folder import check_folder_output, copy_side_files, side_files, write_json
from qwqq.mlx.plan import MLX_BITS, MLX_GROUP_SIZES, MLX_RECIPES, MLXPlan
from qwqq.mlx.writer import index_json, layout, left_out_note, mlx_config, plan_mlx, write_mlx_weights
from qwqq.outputs import atomic_output, fsync_dir
from qwqq.progress import tensor_progress
from qwqq.source import Checkpoint, checkpoint_of

INSTALL_HINT = 'install it with: pip install "qwqq[mlx]"'


@dataclass
class MLXResult:
    path: Path
    file_bytes: int
    n_params: int
    seconds: float
    plan: MLXPlan
    notes: list[str] = field(default_factory=list)  # one line each, for the user (what was left out)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.plan.tensor_bytes / max(1, self.plan.n_params)


def resolve_mlx_options(bits: int | None, group_size: int | None, mixed: str | None) -> tuple[int, int, str | None]:
    """--bits, --group-size and --mixed checked and defaulted (4 bits, group 64; --mixed 3_6 means 3 bits)."""
    recipe = None
    if mixed is not None:
        recipe = mixed.lower().removeprefix("mixed_").removeprefix("mixed-")
        if recipe not in MLX_RECIPES:
            raise QwqqError(f"unknown --mixed {mixed!r}; choose one of {', '.join(MLX_RECIPES)}")
        low = MLX_RECIPES[recipe][0]
        if bits is not None and bits != low:
            raise QwqqError(f"--mixed {recipe} quantizes with {low} and {MLX_RECIPES[recipe][1]} bits: "
                            f"drop --bits or give --bits {low}")
        bits = low
    bits = 4 if bits is None else bits
    if bits not in MLX_BITS:
        raise QwqqError(f"unknown --bits {bits} for MLX; choose one of {', '.join(map(str, MLX_BITS))}")
    group_size = 64 if group_size is None else group_size
    if group_size not in MLX_GROUP_SIZES:
        raise QwqqError(f"unknown --group-size {group_size}; choose one of {', '.join(map(str, MLX_GROUP_SIZES))}")
    return bits, group_size, recipe


def default_output(ckpt: Checkpoint, bits: int, group_size: int, recipe: str | None, tag: str | None = None) -> Path:
    tag = tag or (f"mixed_{recipe}" if recipe else f"{bits}bit")
    if group_size != 64:
        tag += f"-g{group_size}"
    return Path.cwd() / f"{ckpt.name}-mlx-{tag}"


def require_mlx() -> None:
    try:
        importlib.import_module("mlx.core")
    except ImportError as e:
        raise UnsupportedError(f"writing MLX needs the mlx package ({e}); {INSTALL_HINT}") from None


def quantize_to_mlx(source: str | Path | Checkpoint, *, bits: int | None = None, group_size: int | None = None,
                    mixed: str | None = None, out: Path | None = None, force: bool = False,
                    progress: bool = True, overrides: dict | None = None, tag: str | None = None) -> MLXResult:
    """An MLX folder of `source`. `overrides` (module -> (bits, group size)) come first, as from
    qwqq.budget.mlx; `tag` names the default output folder (<model>-mlx-<tag>)."""
    t0 = time.perf_counter()
    bits, group_size, recipe = resolve_mlx_options(bits, group_size, mixed)
    ckpt = checkpoint_of(source)
    arch, sources, plan = plan_mlx(ckpt, bits, group_size, recipe, overrides)
    config = mlx_config(ckpt, arch, plan)
    lay = layout(plan)
    out = Path(out) if out is not None else default_output(ckpt, bits, group_size, recipe, tag)
    check_folder_output(out, ckpt.root, "MLX")
    require_mlx()
    copies = side_files(ckpt.root)
    planned = lay.total_bytes + sum(p.stat().st_size for p in copies) + 2**20
    src_bytes = sum(s.rows * s.cols * s.parts[0].ref.itemsize for s in sources)

    with atomic_output(out, force=force, planned_bytes=planned) as tmp:
        if tmp.exists():  # left by a killed run
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        tmp.mkdir()
        with tensor_progress(progress, src_bytes, len(plan.tensors), label="quantize mlx") as tick:
            write_mlx_weights(tmp, sources, plan, lay, tick)
        write_json(tmp / "model.safetensors.index.json", index_json(plan, lay))
        write_json(tmp / "config.json", config)
        copy_side_files(copies, tmp)
        fsync_dir(tmp)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    notes = [n for n in (left_out_note(ckpt, arch),) if n]
    return MLXResult(out, size, plan.n_params, time.perf_counter() - t0, plan, notes)
