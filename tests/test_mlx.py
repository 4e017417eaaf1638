"""MLX output: identical to mlx_lm.convert, loadable by mlx-lm, runnable through `qwqq run --backend mlx`.

mlx_lm.convert is the reference, called through its Python API on the same source with the same
bits, group size and recipe; every array must match bitwise (dtype, shape, bytes), and so must
config.json, the index and the logits of a forward pass. The tiny fixtures are saved by transformers 5,
whose config spells rope_theta and num_experts the new way (rope_parameters, num_local_experts), which
mlx-lm's qwen3_moe cannot read; the reference runs on a "hub-style" clone of each fixture (the config
as the hub ships it, weights linked), and a separate test shows qwqq writes a config mlx-lm reads from
the transformers-5 original too.

Keep it small: mlx on a Linux CPU is slow and the machine is shared.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests import fixtures
from tests.conftest import run_qwqq
from tests.reference import assert_same_arrays, mlx_arrays

mx = pytest.importorskip("mlx.core", reason='needs mlx: pip install "qwqq[mlx]"')
pytest.importorskip("mlx_lm", reason='needs mlx-lm: pip install "qwqq[mlx]"')

from qwqq.mlx import writer as mlx_writer  # noqa: E402
from qwqq.mlx.quantize import quantize_to_mlx  # noqa: E402
from qwqq.mlx.plan import MLX_RECIPES, make_mlx_plan, mlx_more_bits  # noqa: E402

TOKENS = [4001, 872, 198]  # "<|im_start|>user\n" in the tiny models' tokenizer: few, since mlx's quantized matmul on a CPU is slow


# ---------------------------------------------------------------- helpers
def hub_clone(src: Path, dst: Path) -> Path:
    """The fixture with config.json as the hub ships it (rope_theta, num_experts); weights linked."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    rp = config.pop("rope_parameters", None)
    if rp:
        config["rope_theta"] = rp["rope_theta"]
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def hub_sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    return {arch: hub_clone(fixtures.tiny_model_dir(arch), root / arch) for arch in ("qwen2", "qwen3", "qwen3_moe", "llama")}


def logits(folder: Path) -> "mx.array":
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    out = model(mx.array([TOKENS]))
    mx.eval(out)
    return out


def mlx_lm_convert(src: Path, dst: Path, bits: int, group_size: int, recipe: str | None) -> Path:
    from mlx_lm import convert

    convert(str(src), mlx_path=str(dst), quantize=True, q_bits=bits, q_group_size=group_size,
            quant_predicate=f"mixed_{recipe}" if recipe else None)
    return dst


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".qwqq-partial" in p.name or p.name.endswith(".lock"))


def one_line_error(proc, phrase: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and phrase in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- identical to mlx_lm.convert
CASES = [
    ("qwen2", 4, 64, None),
    ("qwen3", 4, 64, None),  # tied embeddings: a quantized embedding doubles as the output layer
    ("qwen3_moe", 4, 64, None),  # experts stacked into switch_mlp, router gate at 8 bits / group 64
    ("qwen3_moe", 3, 64, "3_6"),  # a mixed recipe (mlx-lm's recipe replaces the router rule)
    ("qwen2", 6, 32, None),  # a non-default group size
    ("qwen3", 2, 128, "2_6"),  # a recipe with a non-default group size
    ("llama", 8, 128, None),
]


@pytest.mark.parametrize("arch, bits, group_size, recipe", CASES,
                         ids=[f"{a}-{b}bit-g{g}" + (f"-mixed_{r}" if r else "") for a, b, g, r in CASES])
@pytest.mark.slow
def test_identical_to_mlx_lm_convert(arch, bits, group_size, recipe, hub_sources, tmp_path):
    src = hub_sources[arch]
    ours = quantize_to_mlx(src, bits=bits, group_size=group_size, mixed=recipe, out=tmp_path / "ours",
                           progress=False).path
    ref = mlx_lm_convert(src, tmp_path / "ref", bits, group_size, recipe)

    assert_same_arrays(mlx_arrays(ours), mlx_arrays(ref))
    assert json.loads((ours / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    assert json.loads((ours / "model.safetensors.index.json").read_text()) == \
        json.loads((ref / "model.safetensors.index.json").read_text())
    assert mx.array_equal(logits(ours), logits(ref)).item()


@pytest.mark.slow
def test_loads_with_mlx_lm_load_and_sizes_match_the_plan(hub_sources, tmp_path):
    from mlx_lm import load
    from mlx_lm.generate import generate

    result = quantize_to_mlx(hub_sources["qwen3_moe"], bits=4, out=tmp_path / "m", progress=False)
    folder = result.path
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors", "model.safetensors.index.json"):
        assert (folder / name).is_file(), name
    # the plan's bytes are the bytes in the shards (what `fit` sums)
    data = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        assert header["__metadata__"] == {"format": "mlx"}
        data += f.stat().st_size - 8 - n
    assert data == result.plan.tensor_bytes
    # the safetensors library reads our headers too
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(mlx_arrays(folder))

    model, tokenizer = load(str(folder))
    text = generate(model, tokenizer, prompt=TOKENS, max_tokens=4)
    assert isinstance(text, str)


def test_transformers5_config_is_made_readable(tmp_path):
    """From the fixture as transformers 5 saved it (rope_parameters, num_local_experts), which mlx-lm's
    qwen3_moe cannot read: qwqq's folder loads and computes what the hub-style source gives."""
    original = fixtures.tiny_model_dir("qwen3_moe")
    a = quantize_to_mlx(original, out=tmp_path / "a", progress=False).path
    b = quantize_to_mlx(hub_clone(original, tmp_path / "hub"), out=tmp_path / "b", progress=False).path
    config = json.loads((a / "config.json").read_text())
    assert config["num_experts"] == 8 and config["rope_theta"] == 1e6
    assert_same_arrays(mlx_arrays(a), mlx_arrays(b))
    assert mx.array_equal(logits(a), logits(b)).item()


def test_sharded_output_matches_one_shard(hub_sources, tmp_path, monkeypatch):
    one = quantize_to_mlx(hub_sources["qwen2"], out=tmp_path / "one", progress=False).path
    monkeypatch.setattr(mlx_writer, "MAX_SHARD_BYTES", 512 << 10)
    many = quantize_to_mlx(hub_sources["qwen2"], out=tmp_path / "many", progress=False).path
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for f in many.glob("*.safetensors"):
        assert f.stat().st_size <= (8 << 20) + 64 * 1024 or len(mx.load(str(f))) == 1
    assert_same_arrays(mlx_arrays(many), mlx_arrays(one))
    assert mx.array_equal(logits(many), logits(one)).item()


# ---------------------------------------------------------------- the plan (pure)
def test_mlx_plan_rules():
    n = 16
    tensors = [("model.embed_tokens.weight", (1000, 256), "BF16"), ("lm_head.weight", (1000, 256), "BF16"),
               ("model.norm.weight", (256,), "BF16")]
    for i in range(n):
        tensors += [(f"model.layers.{i}.self_attn.v_proj.weight", (128, 256), "BF16"),
                    (f"model.layers.{i}.self_attn.v_proj.bias", (128,), "BF16"),
                    (f"model.layers.{i}.mlp.down_proj.weight", (256, 512), "BF16"),
                    (f"model.layers.{i}.mlp.up_proj.weight", (512, 256), "BF16"),
                    (f"model.layers.{i}.mlp.gate.weight", (8, 256), "BF16")]
    tensors.append(("model.layers.0.odd.weight", (4, 100), "F32"))  # rows not a multiple of the group: kept

    plain = make_mlx_plan(tensors, n_layer=n, bits=4, group_size=64, moe_router=True).by_name()
    assert plain["model.layers.3.mlp.gate.weight"].bits == 8 and plain["model.layers.3.mlp.gate.weight"].group_size == 64
    assert plain["model.layers.3.mlp.up_proj.weight"].bits == 4
    assert not plain["model.layers.3.self_attn.v_proj.bias"].quantized
    assert not plain["model.layers.0.odd.weight"].quantized
    up = plain["model.layers.3.mlp.up_proj.weight"]
    assert up.nbytes == 512 * 256 * 4 // 8 + 2 * 512 * (256 // 64) * 2
    q = make_mlx_plan(tensors, n_layer=n, bits=4, group_size=64, moe_router=True).quantization
    assert q["model.layers.3.mlp.gate"] == {"group_size": 64, "bits": 8} and "model.layers.3.mlp.up_proj" not in q

    for recipe, (low, high) in MLX_RECIPES.items():
        p = make_mlx_plan(tensors, n_layer=n, bits=low, group_size=32, recipe=recipe, moe_router=True).by_name()
        assert p["lm_head.weight"].bits == high and p["model.embed_tokens.weight"].bits == low
        for i in range(n):
            want = high if mlx_more_bits(i, n) else low
            assert p[f"model.layers.{i}.self_attn.v_proj.weight"].bits == want
            assert p[f"model.layers.{i}.mlp.down_proj.weight"].bits == want
            assert p[f"model.layers.{i}.mlp.up_proj.weight"].bits == low
            assert p[f"model.layers.{i}.mlp.gate.weight"].bits == low  # as mlx-lm: a recipe overrides the router rule
    assert [i for i in range(n) if mlx_more_bits(i, n)] == [0, 1, 4, 7, 10, 13, 14, 15]

    o = make_mlx_plan(tensors, n_layer=n, overrides={"lm_head": (8, 32), "model.embed_tokens": None}).by_name()
    assert (o["lm_head.weight"].bits, o["lm_head.weight"].group_size) == (8, 32)
    assert not o["model.embed_tokens.weight"].quantized


# ---------------------------------------------------------------- running
@pytest.mark.slow
def test_qwqq_run_backend_mlx(hub_sources, tmp_path):
    folder = quantize_to_mlx(hub_sources["qwen3"], bits=8, out=tmp_path / "tiny-qwen3-mlx-8bit", progress=False).path
    proc = run_qwqq("run", folder, "--backend", "mlx", "-p", "Hi", "--max-tokens", "8", "--seed", "1",
                    cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "<|im_start|>" not in proc.stdout


def test_run_refuses_an_mlx_folder_whose_config_does_not_match_its_tensors(hub_sources, tmp_path):
    folder = quantize_to_mlx(hub_sources["qwen2"], bits=4, out=tmp_path / "tiny-qwen2-mlx-4bit", progress=False).path
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] //= 2
    (folder / "config.json").write_text(json.dumps(cfg))
    proc = run_qwqq("run", folder, "--backend", "mlx", "-p", "Hi", "--max-tokens", "2", cwd=tmp_path, timeout=300)
    line = one_line_error(proc, "cannot load this model")
    assert str(folder) in line and "shape" in line


def test_backend_choice(hub_sources, tmp_path, monkeypatch):
    from qwqq.run.backends import mlx as mlx_backend
    from qwqq.run.backends import pick_backend
    from qwqq.errors import QwqqError

    folder = quantize_to_mlx(hub_sources["qwen2"], out=tmp_path / "m", progress=False).path
    assert pick_backend("auto", folder).name == "mlx"
    assert pick_backend("mlx-lm", folder).name == "mlx"
    with pytest.raises(QwqqError, match="cannot load mlx models; use --backend mlx"):
        pick_backend("llama.cpp", folder)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    with pytest.raises(QwqqError, match="the mlx backend cannot load gguf models; use --backend llama.cpp"):
        pick_backend("mlx", gguf)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("mlx") else real(name, *a))
    with pytest.raises(QwqqError, match=r'mlx-lm not installed; install it with: pip install "qwqq\[mlx\]"'):
        pick_backend("mlx", folder)
    with pytest.raises(QwqqError, match=r'pip install "qwqq\[mlx\]"'):
        pick_backend("auto", folder)
    assert mlx_backend.backend.unavailable_reason() is not None


# ---------------------------------------------------------------- bad inputs
def _clone(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)
    return dst


def _missing_config(src, tmp):
    return _clone(src, tmp / "src", skip=("config.json",)), "missing config.json"


def _unsupported_arch(src, tmp):
    d = _clone(src, tmp / "src", skip=("config.json",))
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(config))
    return d, "architecture GPT2LMHeadModel is not supported"


def _truncated(src, tmp):
    d = _clone(src, tmp / "src", skip=("model.safetensors",))
    with open(src / "model.safetensors", "rb") as f, open(d / "model.safetensors", "wb") as g:
        (n,) = struct.unpack("<Q", f.read(8))
        g.write(struct.pack("<Q", n) + f.read(n) + f.read(4096))  # the header, then a little of the data
    return d, "truncated"


@pytest.mark.parametrize("make", [_missing_config, _unsupported_arch, _truncated],
                         ids=["missing-config", "unsupported-arch", "truncated-safetensors"])
def test_bad_input_is_one_line_and_leaves_nothing(make, tmp_path):
    src, phrase = make(fixtures.tiny_model_dir("qwen2"), tmp_path)
    out = tmp_path / "out"
    proc = run_qwqq("quantize", src, "--format", "mlx", "-o", out, cwd=tmp_path, timeout=120)
    one_line_error(proc, phrase)
    assert not out.exists() and not leftovers(tmp_path)


def test_existing_output_without_force(hub_sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_qwqq("quantize", hub_sources["qwen2"], "--format", "mlx", "-o", out, cwd=tmp_path, timeout=120)
    one_line_error(proc, "already exists (use --force to overwrite)")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not leftovers(tmp_path)


def test_bad_options(hub_sources, tmp_path):
    from qwqq.errors import QwqqError
    from qwqq.quantize import Flags, quantize

    for args, phrase in [(["--bits", "7"], "unknown --bits 7 for MLX"), (["--group-size", "48"], "unknown --group-size 48"),
                         (["--mixed", "5_7"], "unknown --mixed '5_7'"), (["--bits", "4", "--mixed", "3_6"], "--mixed 3_6"),
                         (["--type", "Q4_K_M"], "--type names a GGUF mixture")]:
        with pytest.raises(QwqqError, match=phrase):
            bits, type_name, group_size, mixed = _opts(args)
            quantize(Flags(str(hub_sources["qwen2"]), fmt="mlx", bits=bits, type_name=type_name, group_size=group_size,
                           mixed=mixed, out=tmp_path / "x", progress=False), lambda line: None)
        assert not (tmp_path / "x").exists()


def _opts(args: list[str]) -> tuple:
    d = dict(zip(args[::2], args[1::2]))
    return (int(d["--bits"]) if "--bits" in d else None, d.get("--type"),
            int(d["--group-size"]) if "--group-size" in d else None, d.get("--mixed"))


def test_failure_mid_write_leaves_nothing(hub_sources, tmp_path, monkeypatch):
    from qwqq.errors import QwqqError

    from qwqq.mlx import quantize as mlx_quantize

    real = mlx_quantize.write_mlx_weights

    def failing(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        assert any(folder.glob("*.safetensors"))
        raise QwqqError("simulated failure")

    monkeypatch.setattr(mlx_quantize, "write_mlx_weights", failing)
    out = tmp_path / "out"
    with pytest.raises(QwqqError, match="simulated"):
        quantize_to_mlx(hub_sources["qwen2"], out=out, progress=False)
    assert not out.exists() and not leftovers(tmp_path)
