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

from qwqq.errors import SourceError, UnsupportedError
from qwqq.source import Checkpoint

SPECIAL_LOOKING = re.compile(r"^(<\|.*\|>|<｜.*｜>|<pad>|<mask>|<unused\d*>)$")
SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad")


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

    qwen2: Llama-3 style split regex with single digits; llama-bpe: digits in groups of up to three;
    smollm: individual digits then GPT-2 byte-level; gpt-2: byte-level with its own regex only.
    """
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    split = next((s for s in steps if s.get("type") == "Split"), None)
    if split is not None:
        pattern = (split.get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"
        if r"\p{N}" in pattern and r"\p{L}+" in pattern:
            return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise UnsupportedError(f"tokenizer pre-tokenizer {kinds} is not one qwqq knows (qwen2, llama-bpe, smollm, gpt-2)", where)


def _merges(model: dict) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            out.append(m)
        else:  # newer tokenizers: ["a", "b"]; a literal space inside a part becomes 'Ġ' as in the byte-level alphabet
            out.append(" ".join(p.replace(" ", "\u0120") for p in m))
    return out


def _token_text(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        return v.get("content")
    return None


def build_vocab(ckpt: Checkpoint) -> Vocab:
    if ckpt.tokenizer_json is None:
        raise SourceError("missing tokenizer.json (a GGUF carries its tokenizer)", ckpt.root)
    try:
        tj = json.loads(ckpt.tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"malformed tokenizer: {e}", ckpt.tokenizer_json) from e
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UnsupportedError(f"tokenizer model {model.get('type')!r} is not byte-level BPE", ckpt.tokenizer_json)

    vocab: dict[str, int] = dict(model["vocab"])
    added = {}
    for a in tj.get("added_tokens") or []:
        if isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str):
            added[a["id"]] = a
            vocab[a["content"]] = a["id"]
    by_id = {i: t for t, i in vocab.items()}
    n_vocab = int(ckpt.config.get("vocab_size") or (max(by_id) + 1))
    if by_id and max(by_id) >= n_vocab:
        raise SourceError(f"tokenizer has id {max(by_id)} but config vocab_size is {n_vocab}", ckpt.tokenizer_json)

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
    post = tj.get("post_processor") or {}
    if post.get("type") == "ByteLevel":
        add_bos, add_eos = False, False
    elif post.get("type") == "TemplateProcessing":
        single = [s for s in post.get("single") or []]
        add_bos = bool(single) and "SpecialToken" in single[0]
        add_eos = bool(single) and "SpecialToken" in single[-1] and len(single) > 1

    return Vocab(
        model="gpt2", pre=_pre_tokenizer_name(tj, ckpt.tokenizer_json), tokens=tokens, types=[int(t) for t in types],
        merges=_merges(model), special_ids=ids,
        add_bos=add_bos if isinstance(add_bos, bool) else None,
        add_eos=add_eos if isinstance(add_eos, bool) else None,
        chat_template=ckpt.chat_template,
    )
