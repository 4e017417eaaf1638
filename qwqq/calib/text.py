"""The calibration sample: the text (shipped or the user's), tokenized into windows."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from qwqq.archs.base import hparams
from qwqq.errors import QwqqError, SourceError
from qwqq.options import DEFAULT_SEQLEN, DEFAULT_TOKENS
from qwqq.source import Checkpoint

MIN_TOKENS = 64


def default_text() -> str:
    """The calibration sample shipped with qwqq: original prose, code, maths and reasoning (CC0)."""
    return resources.files("qwqq").joinpath("data", "calibration.txt").read_text(encoding="utf-8")


def read_text(path: Path | str | None, what: str = "calibration text") -> str:
    """A UTF-8 text file (None: the shipped calibration sample); one-line errors name `what`."""
    if path is None:
        return default_text()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QwqqError(f"cannot read the {what}: {e.strerror}", path) from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QwqqError(f"{what} is not UTF-8 (byte {e.start})", path) from e


def tokenize(ckpt: Checkpoint, text: str, n_tokens: int = DEFAULT_TOKENS, seqlen: int = DEFAULT_SEQLEN,
             where: Path | None = None) -> np.ndarray:
    """The sample as int64 [n_seq, seqlen]: consecutive windows of the tokenized text.

    A text shorter than n_tokens gives fewer windows (never repeated text); shorter than one window,
    one window of all of it.
    """
    from tokenizers import Tokenizer

    if n_tokens < MIN_TOKENS or seqlen < 16:
        raise QwqqError(f"--calib-tokens must be at least {MIN_TOKENS} and --calib-seqlen at least 16")
    if ckpt.tokenizer_json is None:
        raise SourceError("calibration needs the tokenizer (tokenizer.json)", ckpt.root)
    tok = Tokenizer.from_file(str(ckpt.tokenizer_json))
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size < MIN_TOKENS:
        raise QwqqError(f"the calibration text holds {ids.size} tokens; at least {MIN_TOKENS} are needed", where)
    vocab = int(hparams(ckpt.config).get("vocab_size") or 0)
    if vocab and int(ids.max()) >= vocab:
        raise SourceError(f"the tokenizer makes token id {int(ids.max())}, beyond the model's vocab_size {vocab}",
                          ckpt.root)
    seqlen = min(seqlen, n_tokens, ids.size)
    n_seq = max(1, min(n_tokens, ids.size) // seqlen)
    return ids[: n_seq * seqlen].reshape(n_seq, seqlen)


def sample_tokens(ckpt: Checkpoint, calib, calib_tokens: int | None, calib_seqlen: int | None) -> np.ndarray:
    return tokenize(ckpt, read_text(calib), calib_tokens or DEFAULT_TOKENS, calib_seqlen or DEFAULT_SEQLEN, calib)
