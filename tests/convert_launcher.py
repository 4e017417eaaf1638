"""Run llama.cpp's convert_hf_to_gguf.py with one tokenizer registered: the tiny models' cut Qwen tokenizer.

    python tests/convert_launcher.py LLAMA_CPP_TREE [convert_hf_to_gguf.py arguments...]

The converter names a BPE pre-tokenizer by hashing how the tokenizer encodes a fixed check text, and refuses
one whose hash its table lacks; llama.cpp adds each new tokenizer's hash to that table
(convert_hf_to_gguf_update.py). The tiny fixtures' tokenizer (tests.fixtures.tiny_tokenizer_dir: Qwen's
pre-tokenizer over its first 4000 tokens) encodes the check text into other ids than Qwen's, so its hash is
not in the table. This launcher answers `qwen2` for a tokenizer that encodes the check text exactly as that
tokenizer (named by $QWQQ_TINY_TOKENIZER) does, and leaves every other lookup and the whole conversion to
the converter.
"""

import hashlib
import os
import runpy
import sys


def main() -> None:
    tree, args = sys.argv[1], sys.argv[2:]
    sys.path[:0] = [tree, os.path.join(tree, "gguf-py")]
    from conversion import base

    cls = next(c for c in vars(base).values() if isinstance(c, type) and "get_vocab_base_pre" in vars(c))
    original = cls.get_vocab_base_pre
    check_text = max((c for c in original.__code__.co_consts if isinstance(c, str)), key=len)  # its chktxt

    def get_vocab_base_pre(self, tokenizer) -> str:
        from transformers import AutoTokenizer

        tiny = AutoTokenizer.from_pretrained(os.environ["QWQQ_TINY_TOKENIZER"])
        ours = hashlib.sha256(str(tokenizer.encode(check_text)).encode()).hexdigest()
        if ours == hashlib.sha256(str(tiny.encode(check_text)).encode()).hexdigest():
            return "qwen2"
        return original(self, tokenizer)

    cls.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [os.path.join(tree, "convert_hf_to_gguf.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
