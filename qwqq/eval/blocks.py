"""Reference logits from an unquantized checkpoint, one decoder block in memory at a time.

Every window goes through block 0, then all of them through block 1, and so on (the residual
streams of all windows are kept: 4 B x tokens x hidden), so each block is read once; then the final
norm and the output matrix make the logits of the scored positions, window by window.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from qwqq.archs import arch_of
from qwqq.archs.tensors import EMBEDDING, LM_HEAD
from qwqq.calib.engine import BlockModel, batch_size, blocks, ffn_size, open_block_model, run_block
from qwqq.gptq import reader as gptq_reader
from qwqq.mlx import reader as mlx_reader
from qwqq.mlx.rules import mlx_rules
from qwqq.source import Checkpoint, RowReader


def quantized_weights(ckpt: Checkpoint, reader: RowReader):
    """The block engine's `dequantize` for a folder qwqq (or mlx-lm, or GPTQModel) quantized: an MLX module
    (uint32 weight beside its scales) through mx.dequantize, a GPTQ linear (qweight, config's gptq
    quantization_config) as the kernels dequantize it; None for a weight stored as it is."""
    gptq = ckpt.config.get("quantization_config") or {}

    def read(hf_name: str, rows: np.ndarray | None) -> np.ndarray | None:
        ref, module = ckpt.tensors.get(hf_name), hf_name.removesuffix(".weight")
        if ref is not None and ref.dtype == "U32" and f"{module}.scales" in ckpt.tensors:
            return mlx_reader.dequantized(ckpt, reader, module, rows)
        if ref is None and f"{module}.qweight" in ckpt.tensors and gptq.get("quant_method") == "gptq":
            w = gptq_reader.dequantized(ckpt, reader, module, gptq)
            return w if rows is None else w[rows]
        return None

    return read


def mlx_layout(ckpt: Checkpoint, model: BlockModel) -> None:
    """An MLX folder of a family whose mlx-lm model names or holds tensors its own way (archs' MLXRules: the
    hybrids' `language_model.` prefix, conv1d axes, plus-one norms): the text model's names mapped to the
    folder's, and each weight's value back to the hub's, after mlx's dequantization. mlx-lm's stacked experts
    the block engine reads itself."""
    rules = mlx_rules(arch_of(ckpt.config, ckpt.root / "config.json", "calibrate"))
    if rules is None:
        return
    if rules.prefix:
        model.names.update({n[len(rules.prefix):]: n for n in ckpt.tensors if n.startswith(rules.prefix)})
    quantized = model.dequantize

    def read(name: str, rows: np.ndarray | None) -> np.ndarray | None:
        w = quantized(name, rows) if quantized is not None else None
        if rows is not None or (w is None and name not in ckpt.tensors):
            return w  # embedding rows: stored as the hub's (a missing tensor: the engine says so)
        if w is None:
            ref = ckpt.tensors[name]
            w = model.reader.read_f32(ref, 0, ref.rows).reshape(ref.shape)
        return rules.hub_value(name, w)

    model.dequantize = read


class BlockLogits:
    def __init__(self, ckpt: Checkpoint, mlx: bool = False):
        """`mlx`: ckpt is an MLX folder (its modules dequantized by mlx, its layout mlx-lm's)."""
        self.ckpt = ckpt
        self.model = open_block_model(ckpt)
        self.model.dequantize = quantized_weights(ckpt, self.model.reader)
        if mlx:
            mlx_layout(ckpt, self.model)
        self.head = LM_HEAD if self.model.has(LM_HEAD) else EMBEDDING
        self.n_vocab = ckpt.tensors[self.model.source_name(self.head)].shape[0]

    def tokenize(self, text: str) -> np.ndarray:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.ckpt.tokenizer_json))
        return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def logits(self, windows: np.ndarray, first: int) -> Iterator[np.ndarray]:
        import torch

        cfg = self.model.config
        batch = batch_size(windows.shape[1], cfg.hidden_size, ffn_size(cfg))
        x = None
        for _, layer, x, rope in blocks(self.model, windows):
            run_block(layer, x, rope, batch)
        norm = self.model.final_norm()
        head = self.model.tensor(self.head)
        with torch.no_grad():
            for w in range(windows.shape[0]):
                h = norm(x[w, first: windows.shape[1] - 1])
                yield (h @ head.T).float().cpu().numpy()

    def close(self) -> None:
        self.model.close()
