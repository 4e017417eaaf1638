"""Budget quantization: a type per tensor that fills a byte budget with the least predicted loss.

The loss of a choice is the sum over tensors of their measured nsr (qwqq.budget.sensitivity). This
is a multiple-choice knapsack; qwqq solves it the way rate-distortion allocators do:

1. per tensor, keep only its candidates on the lower convex hull of (bytes, nsr): a type that costs
   more and loses more, or lies above the line between its neighbours, is never worth buying;
2. start every tensor at its cheapest type, and list every hull step (the next type up) with its
   efficiency, nsr saved per byte spent; steps of one tensor come out in hull order;
3. take steps, most efficient first, while they fit (prefix); then pass over the rest once, taking
   any step that still fits and whose tensor took its previous step (fill). The prefix alone is
   monotone in the budget; the fill uses the remainder, so the budget is met to within the cheapest
   step left.

The chosen types go to plan.make_plan as `overrides`, so the file quantize writes (and its size) is
the plan fit can predict.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from qwqq.errors import QwqqError
from qwqq.gguf.plan import category
from qwqq.gguf.types import tensor_bytes
from qwqq.budget.sensitivity import Sensitivity

# How much a unit of relative output error in a tensor of each category costs at the model's output,
# relative to the others (1 where not listed). The same ordering llama.cpp's mixtures encode in their
# rules (output and attn_v get more bits); the values are fitted on SmolLM2-135M and Qwen2.5-1.5B
# (docs/bench-pareto.md). `output` also covers a tied token_embd, which is the output matrix. An untied
# token_embd is weighted 1, like any matrix: discounted to 0.25, the allocator traded Qwen2.5-1.5B's
# embedding down to Q2_K at the Q4_K_S size and lost to the stock mixture there (KLD 0.0076 vs 0.0043).
CATEGORY_WEIGHT = {"output": 32.0, "attn_v": 2.0, "ffn_down": 2.0}


@dataclass
class Allocation:
    types: dict[str, T]  # (MLX: bits per module)
    tensor_bytes: int  # of the allocated tensors
    loss: float  # predicted: sum of nsr


def _hull(points: list[tuple[int, float, T]]) -> list[tuple[int, float, T]]:
    """Lower convex hull of (bytes, loss) points, cheapest first, loss strictly falling."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    kept: list[tuple[int, float, T]] = []
    for p in pts:
        if kept and p[1] >= kept[-1][1]:
            continue  # costs at least as much, loses at least as much
        while len(kept) >= 2:
            (b1, l1, _), (b2, l2, _) = kept[-2], kept[-1]
            # kept[-1] is above the segment kept[-2] -> p: drop it
            if (l1 - l2) * (p[0] - b1) <= (l1 - p[1]) * (b2 - b1):
                kept.pop()
            else:
                break
        kept.append(p)
    return kept


def weight_of(name: str, tied: bool) -> float:
    cat = category(name)
    if cat == "token_embd" and tied:
        cat = "output"
    return CATEGORY_WEIGHT.get(cat, 1.0)


def predicted_loss(sens: Sensitivity, types: dict[str, T], shapes: dict[str, tuple[int, ...]]) -> float | None:
    """The allocator's loss (weighted sum of nsr) of any choice of types, a stock mixture's too; None when a
    tensor the measurement covers has a type it did not measure (an IQ type, say)."""
    tied = "output.weight" not in shapes
    total = 0.0
    for name, errs in sens.errors.items():
        err = errs.get(types[name].name) if name in types else None
        if err is None:
            return None
        total += weight_of(name, tied) * err
    return total


def allocate(sens: Sensitivity, shapes: dict[str, tuple[int, ...]], budget: int, *,
             weighted: bool = True, pad=None) -> Allocation:
    """The types (for the tensors in `sens`) with the least weighted sum of nsr whose bytes fit `budget`
    (each tensor's bytes as pad(bytes) when given: its size in the file, alignment included)."""
    tied = "output.weight" not in shapes
    size = pad or (lambda n: n)
    options = {name: [(size(tensor_bytes(t, shapes[name])), (weight_of(name, tied) if weighted else 1.0) * err, t)
                      for t, err in sens.candidates(name)] for name in sorted(sens.errors)}
    return choose(options, budget, describe=lambda t: t.name)


def choose(options: dict[str, list[tuple[int, float, T]]], budget: int, describe=str) -> Allocation:
    """One choice per name among its (bytes, loss, choice) options: the least total loss whose bytes fit
    `budget`. Shared by GGUF (a ggml type per tensor) and MLX (bits per module)."""
    hulls = {name: _hull(opts) for name, opts in options.items()}
    base_total = sum(h[0][0] for h in hulls.values())
    if base_total > budget:
        first = hulls[next(iter(hulls))][0][2]
        raise QwqqError(f"the budget leaves {budget / 2**30:.3f} GiB for the quantized tensors; the smallest "
                        f"choice ({describe(first)} and the like everywhere) needs {base_total / 2**30:.3f} GiB")
    steps = []
    for name, h in hulls.items():
        for k in range(1, len(h)):
            db, dl = h[k][0] - h[k - 1][0], h[k - 1][1] - h[k][1]
            steps.append((dl / db, name, k, db, dl))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    at, total = _greedy(hulls, steps, budget, {})
    best = (sum(hulls[n][k][1] for n, k in at.items()), at, total)
    # Greedy by efficiency can leave out one big, valuable step (a tied embedding going to Q8_0) that the
    # budget could take by giving up several small ones: try forcing each of the most valuable steps left out.
    left_out = sorted((s for s in steps if at[s[1]] < s[2]), key=lambda s: -s[4])[:FORCED_TRIES]
    for _, name, k, _, _ in left_out:
        forced_at, forced_total = _greedy(hulls, steps, budget, {name: k})
        if forced_at is None:
            continue
        loss = sum(hulls[n][j][1] for n, j in forced_at.items())
        if loss < best[0] - 1e-15:
            best = (loss, forced_at, forced_total)
    loss, at, total = best
    return Allocation({name: hulls[name][k][2] for name, k in at.items()}, total, loss)


FORCED_TRIES = 8


def _greedy(hulls, steps, budget: int, forced: dict[str, int]):
    """Prefix then fill over the sorted steps, with some tensors' hull positions forced first."""
    at = {name: forced.get(name, 0) for name in hulls}
    total = sum(hulls[name][k][0] for name, k in at.items())
    if total > budget:
        return None, total
    i = 0
    while i < len(steps):  # prefix: monotone in the budget
        _, name, k, db, _ = steps[i]
        if at[name] >= k:
            i += 1
            continue
        if total + db > budget:
            break
        at[name], total = k, total + db
        i += 1
    for _, name, k, db, _ in steps[i:]:  # fill: whatever still fits, in order
        if at[name] == k - 1 and total + db <= budget:
            at[name], total = k, total + db
    return at, total


def parse_size(text: str) -> int:
    """'19.5GB', '19.5G', '800MB', '20GiB', '123456789' -> bytes (GB = 10^9, GiB = 2^30)."""
    s = text.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            break
    else:
        num, mult = s, 1
    try:
        value = float(num)
    except ValueError:
        raise QwqqError(f"--target-size {text!r}: give a size such as 19.5GB, 800MB or 20GiB") from None
    if not value > 0:
        raise QwqqError(f"--target-size {text!r} must be positive")
    return int(value * mult)
