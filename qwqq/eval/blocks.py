"""Reference logits from an unquantized checkpoint, one decoder block in memory at a time.

Every window goes through block 0, then all of them through block 1, and so on (the residual
streams of all windows are kept: 4 B x tokens x hidden), so each block is read once; then the final
norm and the output matrix make the logits of the scored positions, window by window.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from qwqq.quantize.calibrate import batch_size, blocks, ffn_size, open_block_model, run_block
from qwqq.source import Checkpoint


class BlockLogits:
    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.model = open_block_model(ckpt)
        head = "lm_head.weight" if "lm_head.weight" in ckpt.tensors else "model.embed_tokens.weight"
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
