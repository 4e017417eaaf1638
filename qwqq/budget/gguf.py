"""A GGUF checkpoint to a budget: measure each tensor's sensitivity, let the allocator choose its type, and
hand the choice to the plan as overrides (so the written file is the predicted one, to the byte).

The budget is one of: a file size (--target-size), bits per weight (--target-bpw), or the room a hardware
profile leaves for the weights once fit has placed the KV cache of --ctx (--fit PROFILE).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from qwqq.budget.allocate import Allocation, allocate, parse_size
from qwqq.budget.sensitivity import measure
from qwqq.errors import QwqqError
from qwqq.fit.memory import padded
from qwqq.fit.search import machine
from qwqq.fit.place import place
from qwqq.fit.subject import from_prepared
from qwqq.gguf.prepared import prepare
from qwqq.gguf.types import MIXTURES
from qwqq.progress import step_progress


BASE_MIXTURE = "Q4_K_M"  # rules for the tensors the allocator does not choose (norms stay F32), and the label


@dataclass
class BudgetPlan:
    overrides: dict[str, T]
    allocation: Allocation
    predicted_file_bytes: int
    budget_note: str


def plan_for_budget(source, *, target_bytes: int | None = None, target_bpw: float | None = None,
                    weights_room: int | None = None, imatrix=None, tick=None) -> BudgetPlan:
    """Per-tensor types for one of: a file size, bits per weight, or the room fit leaves for weights
    (`weights_room`: bytes of every tensor except token_embd, which llama.cpp keeps in system RAM).
    `source`: a checkpoint or path, or better the Prepared the write will use (nothing is opened twice)."""
    if sum(x is not None for x in (target_bytes, target_bpw, weights_room)) != 1:
        raise QwqqError("give one of --target-size, --target-bpw or --fit")
    src = prepare(source)
    base = src.plan(BASE_MIXTURE, has_imatrix=imatrix is not None)
    sens = measure(src.ckpt, src.sources, base, imatrix, tick=tick)
    shapes = {t.name: t.shape for t in base.tensors}
    fixed = [t for t in base.tensors if t.name not in sens.errors]
    n_alloc = len(sens.errors)
    # the header does not depend on the types (tensor infos are fixed-size), so the base plan's is the file's
    header = len(src.header(base, imatrix))
    pad = None
    if target_bytes is not None:
        # the file exactly: its header (imatrix keys included) and every tensor padded to the alignment,
        # so a choice whose file is the target to the byte still fits
        pad = padded
        budget = target_bytes - header - sum(padded(t.nbytes) for t in fixed)
        note = f"file of at most {target_bytes / 1e9:.3f} GB"
    elif target_bpw is not None:
        if not 1.5 <= target_bpw <= 16:
            raise QwqqError(f"--target-bpw {target_bpw}: give bits per weight between 1.5 and 16")
        budget = int(target_bpw * base.n_params / 8) - sum(t.nbytes for t in fixed)
        note = f"{target_bpw} bits per weight"
    else:
        emb = "token_embd.weight"
        if emb in sens.errors:  # pinned to the base mixture's type, outside the GPU's room
            sens.errors = {k: v for k, v in sens.errors.items() if k != emb}
            pinned = next(t for t in base.tensors if t.name == emb)
            fixed = [*fixed, pinned]
        budget = weights_room - sum(t.nbytes for t in fixed if t.name != emb) - 31 * n_alloc
        note = f"{weights_room / 2**30:.2f} GiB of GPU memory for weights"
    alloc = allocate(sens, shapes, budget, pad=pad)
    overrides = dict(alloc.types)
    if weights_room is not None and "token_embd.weight" in shapes:
        overrides.setdefault("token_embd.weight", next(t.type for t in base.tensors if t.name == "token_embd.weight"))
    plan = src.plan(BASE_MIXTURE, has_imatrix=imatrix is not None, overrides=overrides)
    predicted = header + sum(padded(t.nbytes) for t in plan.tensors)
    return BudgetPlan(overrides, alloc, predicted, note)


def fit_weights_room(source, profile: str, ctx: int, kv: str) -> int:
    """Bytes a hardware profile leaves for the weights on its GPU(s) (or in unified memory / RAM)
    once qwqq fit's memory model has placed the KV cache of `ctx`, compute buffers and overheads."""
    hw = machine(profile=profile)
    model = from_prepared(prepare(source))
    build = model.build(BASE_MIXTURE)
    cand = place(model, build, hw, ctx, kv, offload=False)
    devices = cand.gpus or [cand.host]
    room = sum(d.budget - (d.total - d.weights) for d in devices)
    if not cand.gpus:  # everything in RAM: token_embd is inside the room too; plan_for_budget pins it
        room -= next((t.nbytes for t in build.tensors if t.name == "token_embd.weight"), 0)
    if room <= 0:
        raise QwqqError(f"{profile} has no room left for weights at --ctx {ctx} with a {kv} KV cache")
    return room


def budget_from_options(source, target_size, target_bpw, fit_profile, ctx, kv, imatrix, progress=True):
    """--target-size / --target-bpw / --fit -> (label mixture, per-tensor overrides, one line for the user).
    `source`: a path, or the Prepared the write will use."""
    if sum(x is not None for x in (target_size, target_bpw, fit_profile)) != 1:
        raise QwqqError("give one of --target-size, --target-bpw or --fit")
    ckpt = prepare(source)
    kw = {}
    if target_size is not None:
        kw["target_bytes"] = parse_size(target_size)
    elif target_bpw is not None:
        kw["target_bpw"] = float(target_bpw)
    else:
        kw["weights_room"] = fit_weights_room(ckpt, fit_profile, ctx, kv)
    with step_progress(progress, 1, "measuring sensitivity") as tick:
        bp = plan_for_budget(ckpt, imatrix=imatrix, **kw)
        if tick:
            tick()
    mix = ", ".join(f"{n} {t}" for t, n in Counter(t.name for t in bp.overrides.values()).most_common())
    note = (f"{bp.budget_note}: {bp.predicted_file_bytes / 1e9:.3f} GB file, {len(bp.overrides)} tensors as {mix}; "
            f"predicted loss {bp.allocation.loss:.4f}")
    return MIXTURES[BASE_MIXTURE], bp.overrides, note
