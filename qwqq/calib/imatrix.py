"""llama.cpp's importance matrix computed one decoder block at a time: per weight, the mean square of each
input column over the calibration tokens (per expert: over the tokens routed to it), as llama-imatrix does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwqq.archs import GGUFTensor, arch_of, gguf_tensors, hparams
from qwqq.archs.experts import expert_weight
from qwqq.archs.tensors import LM_HEAD, STACKED_EXPERTS
from qwqq.calib.engine import (batch_size, blocks, ensure_torch, ffn_size, observing, open_block_model, pick_device,
                               run_block, text_names, threads_for_torch)
from qwqq.calib.text import sample_tokens
from qwqq.errors import QwqqError
from qwqq.gguf.imatrix_file import Imatrix, read_imatrix, write_imatrix
from qwqq.outputs import check_target
from qwqq.progress import step_progress
from qwqq.source import Checkpoint, checkpoint_of


@dataclass
class SquareSums:
    """Per weight: sum over tokens of x^2 per input column, and the token count (per expert: its own)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __call__(self, names: list[str], x) -> None:
        import torch

        if x.shape[0]:
            s = torch.square(x.double()).sum(dim=0).cpu().numpy()
        else:
            s = np.zeros(x.shape[-1], np.float64)
        for n in names:
            if n in self.sums:
                self.sums[n] += s
            else:
                self.sums[n] = s.copy()
            self.counts[n] = self.counts.get(n, 0) + int(x.shape[0])


def collect_square_sums(ckpt: Checkpoint, tokens: np.ndarray, *, device=None, tick=None) -> SquareSums:
    """One pass of the sample through the unquantized model (as llama-imatrix does)."""
    import torch

    model = open_block_model(ckpt, device)
    stats = SquareSums()
    cfg_ = model.config
    batch = batch_size(tokens.shape[1], cfg_.hidden_size, ffn_size(cfg_))
    try:
        for i, layer, x, rope in blocks(model, tokens):
            with observing(layer, f"model.layers.{i}.", stats, model.latent) as flush:
                run_block(layer, x, rope, batch, flush)
            if tick:
                tick(i)
        if model.has(LM_HEAD):  # the output matrix reads the final norm's output
            with torch.no_grad():
                stats([LM_HEAD], model.final_norm()(x).reshape(-1, x.shape[-1]))
    finally:
        model.close()
    return stats


def gguf_imatrix_entries(ckpt: Checkpoint, stats: SquareSums) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The statistics under GGUF tensor names: name -> (in_sum2 f32 [n_mat, cols], counts f32 [n_mat]).

    A GGUF tensor's importance is over its own input columns: one made of some rows of a weight (Qwen3-Next's
    attn_qkv and attn_gate, both from in_proj_qkvz) reads that weight's input; one whose columns are
    reordered (Qwen3.5's ssm_out, value heads tiled) gets its values in the same order. Stacked expert
    tensors get one row per expert, in expert order, as llama-imatrix writes them.
    """
    arch = arch_of(ckpt.config, ckpt.root / "config.json", "calibrate")
    text_name = {hub: text for text, hub in text_names(ckpt, arch).items()}
    out = {}
    absorbed = dict(arch.absorbed_inputs)
    for t in gguf_tensors(ckpt, arch):
        names = _input_weights(t, text_name, absorbed)
        if not names or not all(n in stats.sums for n in names):
            continue
        sums = np.stack([stats.sums[n] for n in names]).astype(np.float32)
        if t.col_perm is not None:
            sums = sums[:, list(t.col_perm)]
        counts = np.asarray([stats.counts[n] for n in names], np.float32)
        out[t.name] = (sums, counts)
    return out


def _input_weights(t: GGUFTensor, text_name: dict[str, str], absorbed: dict[str, str]) -> list[str]:
    """The text-model weight(s) whose input a GGUF tensor reads: one per expert for a stacked expert tensor,
    the latent attention's statistic for an absorbed matrix (all heads in one row, one count, as llama-imatrix
    keeps a 3-D weight read by a plain matmul), else the one weight its rows come from (none for an embedding
    or a vector)."""
    parts = t.name.split(".")
    if len(t.shape) == 3 and parts[0] == "blk" and parts[2] in STACKED_EXPERTS:
        return [expert_weight(parts[1], e, STACKED_EXPERTS[parts[2]]) for e in range(t.shape[0])]
    if parts[0] == "blk" and parts[2] in absorbed:
        return [f"model.layers.{parts[1]}.{absorbed[parts[2]]}"]
    sources = {text_name.get(p.ref.name, p.ref.name) for p in t.parts}
    return list(sources) if len(sources) == 1 and len(t.shape) == 2 else []


def compute_imatrix(ckpt: Checkpoint, tokens: np.ndarray, *, device=None, dataset: str = "", tick=None):
    """llama.cpp's importance matrix for ckpt from the sample `tokens` [n_seq, seqlen]."""
    stats = collect_square_sums(ckpt, tokens, device=device, tick=tick)
    return Imatrix(gguf_imatrix_entries(ckpt, stats), datasets=[dataset] if dataset else [],
                   chunk_count=int(tokens.shape[0]), chunk_size=int(tokens.shape[1]))


def imatrix_from_source(source, *, calib=None, calib_tokens=None, calib_seqlen=None, device=None, threads: int = 0,
                        progress: bool = True):
    """Open the checkpoint, tokenize the sample, and compute its importance matrix."""
    ensure_torch("computing an importance matrix")
    threads_for_torch(threads)
    ckpt = checkpoint_of(source)
    tokens = sample_tokens(ckpt, calib, calib_tokens, calib_seqlen)
    n_layer = int(hparams(ckpt.config).get("num_hidden_layers") or 0)
    with step_progress(progress, n_layer, "imatrix") as tick:
        return ckpt, compute_imatrix(ckpt, tokens, device=pick_device(device),
                                     dataset=Path(calib).name if calib else "qwqq calibration.txt",
                                     tick=(lambda i: tick()) if tick else None)


def resolve_imatrix(source, imatrix: str | None, *, calib=None, **kw):
    """--imatrix FILE, --imatrix auto, or --calib alone (auto): the Imatrix to quantize with, or None."""
    if imatrix is None and calib is None:
        return None
    if imatrix is not None and imatrix.lower() != "auto":
        if calib is not None:
            raise QwqqError("give --imatrix FILE or --calib (which computes one), not both")
        return read_imatrix(imatrix)
    return imatrix_from_source(source, calib=calib, **kw)[1]


def imatrix_to_file(source, out=None, *, force: bool = False, **kw):
    """`qwqq imatrix`: compute and write llama.cpp's imatrix GGUF. Returns (path, Imatrix)."""
    if out is not None:
        check_target(Path(out), force, None)  # before an hour of calibration, not after
    ckpt, im = imatrix_from_source(source, **kw)
    out = Path(out) if out is not None else Path.cwd() / f"{ckpt.name}.imatrix.gguf"
    return write_imatrix(im, out, force=force), im
