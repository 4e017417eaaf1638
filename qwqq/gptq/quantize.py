"""GPTQ over a whole model, one decoder block at a time.

For block i: (1) run the calibration activations through it with the original weights while
observers sum x x^T for every distinct linear input (q/k/v share one, gate/up another, each expert
its own routed tokens); (2) quantize each linear the checkpoint holds quantized (qwqq.gptq.linears: not
the hybrids' in_proj_a / in_proj_b / in_proj_ba or shared_expert_gate) with GPTQ against its Hessian and put
the quantized weights back into the block; (3) run the activations through the quantized block, so that
block i+1 is calibrated on what it will really see. Memory is one block, its Hessians and the
activations (see qwqq.calib.engine).

Experts that saw fewer than `min_expert_tokens` tokens fall back to round-to-nearest (a Hessian
from a handful of tokens fits noise), and are reported.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qwqq.archs import EXPERT, hparams
from qwqq.calib.text import sample_tokens
from qwqq.calib.engine import (BlockModel, batch_size, blocks, ensure_torch, ffn_size, observing, open_block_model,
                               pick_device, run_block, threads_for_torch)
from qwqq.gptq.checkpoint import default_output, gptq_output
from qwqq.gptq.options import check_settings
from qwqq.gptq.packing import pack
from qwqq.progress import step_progress
from qwqq.source import checkpoint_of
from qwqq.gptq.solver import DEFAULT_DAMP, SolvedLinear, gptq_quantize, rtn_quantize

MIN_EXPERT_TOKENS = 128


@dataclass
class SolverSettings:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp: float = DEFAULT_DAMP
    group_aware: bool = True  # GPTQModel's act_group_aware: static groups processed by Hessian priority
    min_expert_tokens: int = MIN_EXPERT_TOKENS


@dataclass
class Hessians:
    """Sum of x x^T per distinct linear input, and how many tokens went into it."""

    sums: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[str, ...], int] = field(default_factory=dict)

    def __call__(self, names: list[str], x: torch.Tensor) -> None:
        key = tuple(names)
        x = x.to(torch.float32)
        if key not in self.sums:
            self.sums[key] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
            self.counts[key] = 0
        if x.shape[0]:
            self.sums[key].addmm_(x.T, x)
        self.counts[key] += int(x.shape[0])

    def take(self, key: tuple[str, ...], last: bool) -> torch.Tensor:
        """H = 2/N sum x x^T, a tensor the caller owns: a scaled copy, or at the key's last use its sum itself,
        scaled in place and handed over (for down_proj of a 32B model, each copy is 3.4 GB)."""
        scale = 2.0 / max(1, self.counts[key])
        if last:
            return self.sums.pop(key).mul_(scale)
        return self.sums[key] * scale


@dataclass
class BlockReport:
    layer: int
    rtn_experts: list[str] = field(default_factory=list)  # weights that fell back to round-to-nearest
    damps: list[float] = field(default_factory=list)


def weight_view(layer, prefix: str, hf_name: str) -> torch.Tensor:
    """The block's live float32 weight for an HF weight name (a view: writing to it changes the block)."""
    m = EXPERT.match(hf_name)
    if m:
        e, proj = int(m.group(2)), m.group(3)
        experts = layer.get_submodule("mlp.experts")
        if proj == "down":
            return experts.down_proj.data[e]
        ff = experts.gate_up_proj.shape[1] // 2
        rows = slice(0, ff) if proj == "gate" else slice(ff, 2 * ff)
        return experts.gate_up_proj.data[e, rows]
    path = hf_name[len(prefix):].removesuffix(".weight")
    return layer.get_submodule(path).weight.data


def quantized_names(layer, prefix: str) -> list[str]:
    """Every weight GPTQ quantizes in a block: its linears and each expert's three projections."""
    names = []
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.append(f"{prefix}{name}.weight")
        elif name.endswith("experts") and hasattr(module, "gate_up_proj"):
            for e in range(module.gate_up_proj.shape[0]):
                names += [f"{prefix}{name}.{e}.{p}_proj.weight" for p in ("gate", "up", "down")]
    return names


def quantize_block(layer, prefix: str, hess: Hessians, opts: SolverSettings, report: BlockReport,
                   only: Callable[[str], bool] | None = None) -> dict[str, SolvedLinear]:
    """GPTQ (or RTN, for starved experts) of every weight in the block (`only`: of those it accepts; the hybrids'
    in_proj_a / in_proj_b and shared_expert_gate stay float, as the checkpoint keeps them); the block's weights
    are replaced."""
    by_name = {n: key for key in hess.sums for n in key}
    names = [n for n in quantized_names(layer, prefix) if only is None or only(n)]
    uses = Counter(by_name[n] for n in names if n in by_name)  # q/k/v share one Hessian, gate/up another
    results = {}
    for name in names:
        w = weight_view(layer, prefix, name)
        key = by_name.get(name)
        seen = hess.counts.get(key, 0) if key else 0
        starved = EXPERT.match(name) is not None and seen < opts.min_expert_tokens
        if key is None or seen == 0 or starved:
            res = rtn_quantize(w, bits=opts.bits, group_size=opts.group_size, sym=opts.sym)
            report.rtn_experts.append(f"{name} ({seen} tokens)")
        else:
            res = gptq_quantize(w, hess.take(key, last=uses[key] == 1), bits=opts.bits, group_size=opts.group_size,
                                sym=opts.sym, desc_act=opts.desc_act, group_aware=opts.group_aware, damp=opts.damp,
                                overwrite_hessian=True)
            report.damps.append(res.damp)
        if key is not None:
            uses[key] -= 1
        w.copy_(res.weight.to(w.dtype))
        results[name] = res
    return results


def unquantized_params(layer, prefix: str) -> dict[str, torch.Tensor]:
    """The block's other parameters (norms, biases, the MoE router), under their HF names."""
    out = {}
    for name, p in layer.named_parameters():
        if name.startswith("mlp.experts."):
            continue
        module = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
        if isinstance(module, torch.nn.Linear) and name.endswith(".weight"):
            continue
        out[prefix + name] = p.data
    return out


def gptq_model(model: BlockModel, tokens: np.ndarray, opts: SolverSettings,
               emit: Callable[[int, dict[str, SolvedLinear], dict[str, torch.Tensor]], None],
               tick: Callable[[int], None] | None = None, only: Callable[[str], bool] | None = None
               ) -> list[BlockReport]:
    """GPTQ every block (`only`: the text-model weight names to quantize, default every linear); emit(i,
    quantized, unquantized) is called once per block, in order."""
    cfg = model.config
    batch = batch_size(tokens.shape[1], cfg.hidden_size, ffn_size(cfg))
    reports = []
    for i, layer, x, rope in blocks(model, tokens):
        prefix = f"model.layers.{i}."
        hess = Hessians()
        with observing(layer, prefix, hess) as flush:
            run_block(layer, x, rope, batch, flush, update=False)
        report = BlockReport(i)
        results = quantize_block(layer, prefix, hess, opts, report, only)
        del hess
        emit(i, results, unquantized_params(layer, prefix))
        run_block(layer, x, rope, batch)  # what block i+1 will really see
        reports.append(report)
        if tick:
            tick(i)
    return reports


# --------------------------------------------------------------------------- source folder -> GPTQ folder
@dataclass
class GPTQRun:
    path: object
    file_bytes: int
    seconds: float
    reports: list[BlockReport]
    tokens: int
    widest_input: int = 0  # the largest in_features of a quantized linear (down_proj's ffn width)

    @property
    def undersampled(self) -> bool:
        """Fewer calibration tokens than 4x the widest input: GPTQ can fit the sample rather than the model
        (measured: Qwen2.5-Coder-1.5B at 2048 tokens, KLD 0.24 against RTN's 0.08; docs/bench-gptq.md)."""
        return self.tokens < 4 * self.widest_input

    @property
    def rtn_fallbacks(self) -> list[str]:
        return [r for rep in self.reports for r in rep.rtn_experts]


def quantize_to_gptq(source, *, bits: int = 4, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                     group_aware: bool = True, damp: float = DEFAULT_DAMP, calib=None, calib_tokens: int | None = None,
                     calib_seqlen: int | None = None, device: str | None = None, out=None, force: bool = False,
                     threads: int = 0, progress: bool = True) -> GPTQRun:
    """A GPTQ checkpoint of `source`, calibrated on the shipped sample (or the text file `calib`)."""
    t0 = time.perf_counter()
    check_settings(bits, group_size, damp)
    ensure_torch("GPTQ")
    threads_for_torch(threads)
    ckpt = checkpoint_of(source)
    tokens = sample_tokens(ckpt, calib, calib_tokens, calib_seqlen)
    out = Path(out) if out is not None else default_output(ckpt, bits, group_size)
    model = open_block_model(ckpt, pick_device(device))
    group_aware = group_aware and not desc_act  # act-order already orders every column
    opts = SolverSettings(bits, group_size, sym, desc_act, damp, group_aware)
    try:
        with gptq_output(ckpt, out, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                         damp_percent=damp, true_sequential=False, act_group_aware=group_aware,
                         force=force) as writer, \
                step_progress(progress, model.n_layer, "gptq") as tick:
            writer.write_floats(model.reader)
            module = {lin.text_name + ".weight": lin.name for lin in writer.plan.linears}  # text -> checkpoint

            def emit(i, results, _floats):
                for name, r in results.items():
                    packed = pack(r.q.cpu(), r.scales.cpu(), r.zeros.cpu(), r.g_idx.cpu(), bits)
                    writer.write_linear(module[name], packed)

            reports = gptq_model(model, tokens, opts, emit, (lambda i: tick()) if tick else None,
                                 only=module.__contains__)
    finally:
        model.close()
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    hp = hparams(ckpt.config)  # a multimodal release's text_config
    widest = max(int(hp.get(k) or 0) for k in ("hidden_size", "intermediate_size", "moe_intermediate_size"))
    return GPTQRun(out, size, time.perf_counter() - t0, reports, int(tokens.size), widest)
