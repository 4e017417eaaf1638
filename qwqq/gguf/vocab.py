"""The tokenizer part of a GGUF: BPE tokens, types, merges, pre-tokenizer, special ids, chat template.

Read from tokenizer.json with the `tokenizers` library (no transformers, no remote code). The rules
follow what llama.cpp's converter writes for byte-level BPE ("gpt2") tokenizers, so llama.cpp
tokenizes exactly as transformers does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gguf import TokenType

from qwqq.archs.base import hparams
from qwqq.errors import SourceError, UnsupportedError
from qwqq.source import Checkpoint

SPECIAL_LOOKING = re.compile(r"^(<\|.*\|>|<｜.*｜>|<pad>|<mask>|<unused\d*>)$")
SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad")
MAX_VOCAB = 2**22  # 4M tokens: ten times the largest real vocabularies; bounds a hostile id


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass
class Vocab:
    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None


def _pre_tokenizer_name(tj: dict, where) -> str:
    """llama.cpp's pre-tokenizer name, recognised from the tokenizer's own pre_tokenizer definition.

    qwen2: Llama-3 style split regex with single digits; qwen35: the same with combining marks (\\p{M}) kept
    with letters (Qwen3.5 and later); llama-bpe: digits in groups of up to three;
    smollm: individual digits then GPT-2 byte-level; gpt-2: byte-level with its own regex only.
    """
    pre = _obj(tj.get("pre_tokenizer"))
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    steps = [_obj(s) for s in steps] if isinstance(steps, list) else []
    kinds = [s.get("type") for s in steps]
    split = next((s for s in steps if s.get("type") == "Split"), None)
    if split is not None:
        pattern = _obj(split.get("pattern")).get("Regex", "")
        pattern = pattern if isinstance(pattern, str) else ""
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"
        if r"[\p{L}\p{M}]+" in pattern and r"\p{N}" in pattern:  # Qwen3.5+: letters with their combining marks
            return "qwen35"
        if r"\p{N}" in pattern and r"\p{L}+" in pattern:
            return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise UnsupportedError(f"tokenizer pre-tokenizer {kinds} is not one qwqq knows (qwen2, qwen35, llama-bpe, smollm, gpt-2)", where)


def _obj(v) -> dict:
    """A JSON object, or an empty one for anything else (optional parts of tokenizer.json)."""
    return v if isinstance(v, dict) else {}


def _merges(model: dict, where) -> list[str]:
    merges = model.get("merges") or []
    if not isinstance(merges, list):
        raise SourceError("malformed tokenizer: merges is not a list", where)
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            # newer tokenizers: ["a", "b"]; a literal space inside a part becomes 'Ġ' as in the byte-level alphabet
            out.append(" ".join(p.replace(" ", "\u0120") for p in m))
        else:
            raise SourceError(f"malformed tokenizer: merge {_short(m)} is neither \"a b\" nor [\"a\", \"b\"]", where)
    return out


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_utf8(texts: list[str], what: str, where) -> None:
    """GGUF strings are UTF-8: a lone surrogate (legal in JSON, "\\ud800") cannot be written."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        bad = next(t for t in texts if not _encodes(t))
        raise SourceError(f"malformed tokenizer: {what} {_short(bad)} is not valid UTF-8 text", where) from None


def _encodes(t: str) -> bool:
    try:
        t.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def build_vocab(ckpt: Checkpoint) -> Vocab:
    if ckpt.tokenizer_json is None:
        raise SourceError("missing tokenizer.json (a GGUF carries its tokenizer)", ckpt.root)
    where = ckpt.tokenizer_json
    try:
        tj = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8 or JSON, nested too deep
        raise SourceError(f"malformed tokenizer: {e}", where) from e
    if not isinstance(tj, dict):
        raise SourceError("malformed tokenizer: expected a JSON object", where)
    model = _obj(tj.get("model"))
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UnsupportedError(f"tokenizer model {_short(model.get('type'))} is not byte-level BPE", where)

    vocab: dict[str, int] = dict(model["vocab"])
    for t, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise SourceError(f"malformed tokenizer: token {_short(t)} has id {_short(i)}", where)
    added = {}
    added_tokens = tj.get("added_tokens") or []
    for a in added_tokens if isinstance(added_tokens, list) else []:
        if isinstance(a, dict) and _is_id(a.get("id")) and isinstance(a.get("content"), str):
            added[a["id"]] = a
            vocab[a["content"]] = a["id"]
    by_id = {i: t for t, i in vocab.items()}
    if not by_id:
        raise SourceError("malformed tokenizer: the vocabulary is empty", where)
    config_vocab = hparams(ckpt.config).get("vocab_size")  # a multimodal release: its text_config's
    if config_vocab is not None and not _is_id(config_vocab):
        raise SourceError(f"vocab_size is {_short(config_vocab)}, expected a positive integer", ckpt.root / "config.json")
    n_vocab = config_vocab or (max(by_id) + 1)
    if max(by_id) >= n_vocab:
        raise SourceError(f"tokenizer has id {max(by_id)} but config vocab_size is {n_vocab}", where)
    if n_vocab > MAX_VOCAB:
        raise SourceError(f"tokenizer has id {max(by_id)}: a vocabulary of {n_vocab} tokens is implausible", where)

    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            a = added[i]
            tokens.append(a["content"])
            special = a.get("special") or SPECIAL_LOOKING.match(a["content"])
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)

    ids = {}
    content_to_id = {a["content"]: i for i, a in added.items()}
    for kind in SPECIAL_KINDS:
        text = _token_text(ckpt.tokenizer_config.get(f"{kind}_token"))
        if text is not None and text in content_to_id:
            ids[kind] = content_to_id[text]
    for kind in SPECIAL_KINDS:
        v = ckpt.config.get(f"{kind}_token_id")
        if kind not in ids and isinstance(v, int) and 0 <= v < n_vocab:
            ids[kind] = v

    add_bos = ckpt.tokenizer_config.get("add_bos_token")
    add_eos = ckpt.tokenizer_config.get("add_eos_token")
    post = _obj(tj.get("post_processor"))
    if post.get("type") == "ByteLevel":
        add_bos, add_eos = False, False
    elif post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        single = [_obj(s) for s in single] if isinstance(single, list) else []
        add_bos = bool(single) and "SpecialToken" in single[0]
        add_eos = bool(single) and "SpecialToken" in single[-1] and len(single) > 1

    merges = _merges(model, where)
    _check_utf8(tokens, "token", where)
    _check_utf8(merges, "merge", where)
    return Vocab(
        model="gpt2", pre=_pre_tokenizer_name(tj, where), tokens=tokens, types=[int(t) for t in types],
        merges=merges, special_ids=ids,
        add_bos=add_bos if isinstance(add_bos, bool) else None,
        add_eos=add_eos if isinstance(add_eos, bool) else None,
        chat_template=ckpt.chat_template,
    )
