"""Reference logits from an unquantized checkpoint, one decoder block in memory at a time.

Every window goes through block 0, then all of them through block 1, and so on (the residual
streams of all windows are kept: 4 B x tokens x hidden), so each block is read once; then the final
norm and the output matrix make the logits of the scored positions, window by window.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from qwqq.archs.tensors import EMBEDDING, LM_HEAD
from qwqq.calib.engine import batch_size, blocks, ffn_size, open_block_model, run_block
from qwqq.gptq import reader as gptq_reader
from qwqq.mlx import reader as mlx_reader
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


class BlockLogits:
    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.model = open_block_model(ckpt)
        self.model.dequantize = quantized_weights(ckpt, self.model.reader)
        head = LM_HEAD if LM_HEAD in ckpt.tensors else EMBEDDING
        self.head_ref = ckpt.tensors[head]
        self.n_vocab = self.head_ref.shape[0]

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
        head = self.model.tensor(self.head_ref.name)
        with torch.no_grad():
            for w in range(windows.shape[0]):
                h = norm(x[w, first: windows.shape[1] - 1])
                yield (h @ head.T).float().cpu().numpy()

    def close(self) -> None:
        self.model.close()
