"""GPTQ of the hybrid Qwen families (Qwen3.5, Qwen3.5-MoE, Qwen3-Next), one block at a time.

The checkpoint is the release as GPTQModel writes it (its qwen3_5 / qwen3_5_moe / qwen3_next definitions): the
release's own names (a Qwen3.5's `model.language_model.*`), the text decoder's linears quantized (attention,
Gated DeltaNet in_proj_qkv / in_proj_z / in_proj_qkvz / out_proj, MLP, shared expert, each routed expert), the
rest copied as floats: in_proj_a / in_proj_b / in_proj_ba, conv1d, norms, routers, shared_expert_gate,
embeddings, lm_head, the vision tower and the MTP block. Held against the solver's own weights, llama.cpp's
converter (which dequantizes GPTQ itself), qwqq eval (GPTQ closer to the source than round-to-nearest), qwqq fit's
predicted size, and qwqq run's transformers backend (the folder loaded and generating).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwqq.calib import engine as calibrate
from qwqq.calib import text as calib_text
from qwqq.gptq.checkpoint import write_gptq
from qwqq.gptq.packing import dequantize, pack
from qwqq.gptq.quantize import SolverSettings, gptq_model, quantize_to_gptq
from qwqq.gptq.solver import rtn_quantize
from qwqq.source import RowReader, open_checkpoint
from tests.fixtures import convert_hf_to_gguf
from tests.fixtures_hybrid import tiny_hybrid_dir

pytestmark = pytest.mark.slow  # GPTQ-calibrates tiny models (5-20 s each) and runs llama.cpp's converter
HYBRIDS = ["qwen3_5_moe", "qwen3_next"]  # between them every kind of linear the three families have (the dense
# qwen3_5 adds none: its in_proj_qkv / in_proj_z are qwen3_5_moe's, its MLP a plain one); a GPTQ build each
CALIB = dict(calib_tokens=2048, calib_seqlen=128)  # 512 starve the experts (8, top-2) and GPTQ fits the sample
PACKED = ("qweight", "qzeros", "scales", "g_idx")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d, made = tmp_path_factory.mktemp("hybrid-gptq"), {}

    def get(arch: str):
        if arch not in made:
            made[arch] = quantize_to_gptq(tiny_hybrid_dir(arch), out=d / arch, progress=False, **CALIB)
        return made[arch]

    return get


def _tensors(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _expected_modules(arch: str, src) -> set[str]:
    """The quantized modules, spelled out from the fixture's shape (3 Gated DeltaNet layers, then attention)."""
    prefix = "model.language_model.layers" if arch != "qwen3_next" else "model.layers"
    la = ["linear_attn.in_proj_qkvz", "linear_attn.out_proj"] if arch == "qwen3_next" else \
        ["linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj"]
    sa = [f"self_attn.{p}_proj" for p in "qkvo"]
    mlp = [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    if arch != "qwen3_5":
        mlp = [f"mlp.shared_expert.{p}_proj" for p in ("gate", "up", "down")] + \
              [f"mlp.experts.{e}.{p}_proj" for e in range(8) for p in ("gate", "up", "down")]
    return {f"{prefix}.{i}.{m}" for i in range(4) for m in (la if i < 3 else sa) + mlp}


@pytest.mark.parametrize("arch", HYBRIDS)
def test_checkpoint_is_the_release_with_its_decoder_linears_quantized(arch, built):
    run = built(arch)
    src = open_checkpoint(tiny_hybrid_dir(arch))
    out = _tensors(run.path)
    modules = {n.removesuffix(".qweight") for n in out if n.endswith(".qweight")}
    assert modules == _expected_modules(arch, src)
    assert all(f"{m}.{k}" in out for m in modules for k in PACKED)
    floats = set(out) - {f"{m}.{k}" for m in modules for k in PACKED}
    # every other source tensor is there, under its own name, with its values (as float16)
    fused = {n for n in src.tensors  # the decoder's fused experts, split into per-expert modules (MTP's: kept)
             if n.startswith("model.") and n.endswith((".experts.gate_up_proj", ".experts.down_proj"))}
    want_floats = {n for n in src.tensors if n.removesuffix(".weight") not in modules} - fused
    assert floats == want_floats
    assert any(n.startswith("model.visual.") for n in floats) == (arch != "qwen3_next")
    assert {"mtp.fc.weight", "mtp.layers.0.self_attn.q_proj.weight"} <= floats  # the MTP block: as released
    assert any(n.endswith("linear_attn.in_proj_ba.weight" if arch == "qwen3_next" else "linear_attn.in_proj_a.weight")
               for n in floats)
    with RowReader() as reader:
        for name in floats:
            ref = src.tensors[name]
            want = reader.read_f32(ref, 0, ref.rows).reshape(ref.shape).astype(np.float16)
            np.testing.assert_array_equal(out[name], want, err_msg=name)
    config = json.loads((run.path / "config.json").read_text())
    source = json.loads((tiny_hybrid_dir(arch) / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("quantization_config", "dtype", "torch_dtype")} == \
        {k: v for k, v in source.items() if k not in ("dtype", "torch_dtype")}
    q = config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"]) == ("gptq", 4, 128, False)


@pytest.mark.parametrize("arch", HYBRIDS)
def test_checkpoint_holds_exactly_the_solver_weights(arch, built):
    """The block engine's GPTQ on the text model's names, written under the release's."""
    run = built(arch)
    ckpt = open_checkpoint(tiny_hybrid_dir(arch))
    tokens = calib_text.tokenize(ckpt, calib_text.default_text(), CALIB["calib_tokens"], CALIB["calib_seqlen"])
    results = {}
    model = calibrate.open_block_model(ckpt, torch.device("cpu"))
    quantized = {n.removeprefix("model.language_model.").removeprefix("model.") for n in _expected_modules(arch, ckpt)}
    try:
        gptq_model(model, tokens, SolverSettings(), lambda i, q, u: results.update(q),
                   only=lambda n: n.removeprefix("model.").removesuffix(".weight") in quantized)
    finally:
        model.close()
    out = _tensors(run.path)
    prefix = "model.language_model." if arch != "qwen3_next" else "model."
    assert len(results) == len(quantized)
    for name, r in results.items():
        module = prefix + name.removeprefix("model.").removesuffix(".weight")
        got = dequantize({k: out[f"{module}.{k}"] for k in PACKED}, 4)
        np.testing.assert_array_equal(got, r.weight.numpy(), err_msg=name)


@pytest.mark.parametrize("arch", HYBRIDS)
def test_llama_cpp_converter_reads_it(arch, built, tmp_path):
    """convert_hf_to_gguf.py dequantizes GPTQ with its own code and converts the release's names (vision tower
    left to its mmproj path, MTP block as nextn): every F32 tensor it writes from the GPTQ folder equals what it
    writes from the same folder with qwqq's dequantized weights in place of the packed linears."""
    import gguf
    from safetensors.numpy import save_file

    run = built(arch)
    out = _tensors(run.path)
    plain = tmp_path / "dequantized"
    plain.mkdir()
    tensors = {n: t for n, t in out.items() if not n.endswith(PACKED)}
    for name in (n for n in out if n.endswith(".qweight")):
        module = name.removesuffix(".qweight")
        tensors[f"{module}.weight"] = dequantize({k: out[f"{module}.{k}"] for k in PACKED}, 4)
    save_file(tensors, str(plain / "model.safetensors"), metadata={"format": "pt"})
    for f in run.path.iterdir():
        if f.suffix != ".safetensors":
            (plain / f.name).write_bytes(f.read_bytes())
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))

    def f32(folder):
        reader = gguf.GGUFReader(convert_hf_to_gguf(folder, tmp_path / f"{folder.name}.gguf", "f32"))
        return {t.name: np.asarray(t.data) for t in reader.tensors}

    theirs, want = f32(run.path), f32(plain)
    assert set(theirs) == set(want) and any(n.startswith("blk.4.") for n in theirs)  # MTP kept, as nextn
    for name, w in want.items():
        assert np.array_equal(theirs[name], w), name


@pytest.mark.parametrize("arch", ["qwen3_5_moe"])  # 2048 calibration tokens and two evals: one family, the MoE
def test_gptq_beats_round_to_nearest(arch, built, tmp_path, monkeypatch):
    """qwqq eval reads the folder back through the block engine (the GPTQ linears dequantized, a multimodal
    release's names included): GPTQ's KL divergence from the source is below round-to-nearest's."""
    from qwqq.eval.harness import evaluate

    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))
    src = tiny_hybrid_dir(arch)

    def rtn(lin, w):
        r = rtn_quantize(torch.from_numpy(w), bits=4, group_size=128)
        return pack(r.q, r.scales, r.zeros, r.g_idx, 4)

    rtn_dir = write_gptq(src, tmp_path / "rtn", rtn, bits=4, group_size=128).path
    kw = dict(ctx=128, max_tokens=1024, progress=False)
    k_gptq = evaluate(built(arch).path, src, **kw).summary.kld_mean
    k_rtn = evaluate(rtn_dir, src, **kw).summary.kld_mean
    assert 0 < k_gptq < k_rtn, (k_gptq, k_rtn)


@pytest.mark.parametrize("arch", HYBRIDS)
def test_fit_predicts_the_written_folder(arch, built):
    """qwqq fit's GPTQ-Int4 size of the source, from config.json alone and from the folder, is the calibrated
    folder's safetensors tensor data, to the byte."""
    from qwqq.fit import gptq as gptq_fit
    from qwqq.fit import subject as models

    src = tiny_hybrid_dir(arch)
    config = json.loads((src / "config.json").read_text())
    if arch == "qwen3_next":
        config["mtp_layers"] = 1  # its config does not declare the MTP block (a catalog entry states it)
    written = 0
    for f in built(arch).path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            written += f.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
    by_config = gptq_fit.gptq_build(models.from_config(config, arch, "hub", f"x/{arch}"), "GPTQ-Int4", 4, 128)
    by_folder = gptq_fit.gptq_build(models.resolve(str(src)), "GPTQ-Int4", 4, 128)
    assert by_config.tensor_bytes == by_folder.tensor_bytes == written


@pytest.mark.parametrize("arch", ["qwen3_5_moe"])  # release names, fused experts; Qwen3.5 dense runs in the CLI test
def test_transformers_backend_runs_the_folder(arch, built, monkeypatch):
    """`qwqq run --backend transformers` without GPTQModel: the text model (transformers' *ForCausalLM) holds the
    folder's weights, read here with safetensors under the release's names (linears dequantized, experts fused as
    transformers 5 holds them), and its greedy answer through the cache is the direct argmax, step by step."""
    from qwqq.run.backends import LoadOptions
    from qwqq.run.backends import transformers as tb
    from qwqq.run.sampling import Sampling

    monkeypatch.setattr(tb, "missing_kernels", lambda: ["gptqmodel"])
    out = _tensors(built(arch).path)
    prefix = "model.language_model." if arch != "qwen3_next" else "model."

    def weight(hub: str) -> np.ndarray:
        module = hub.removesuffix(".weight")
        if f"{module}.qweight" in out:
            return dequantize({k: out[f"{module}.{k}"] for k in PACKED}, 4)
        return out[hub].astype(np.float32)

    def stored(name: str) -> np.ndarray:
        hub = name if name.startswith("lm_head.") else prefix + name.removeprefix("model.")
        base, _, which = hub.rpartition(".")
        if which not in ("gate_up_proj", "down_proj") or hub in out:
            return weight(hub)
        n = sum(k.startswith(base + ".") and k.endswith(".down_proj.qweight") for k in out)
        if which == "down_proj":
            return np.stack([weight(f"{base}.{e}.down_proj.weight") for e in range(n)])
        return np.stack([np.concatenate([weight(f"{base}.{e}.gate_proj.weight"), weight(f"{base}.{e}.up_proj.weight")])
                         for e in range(n)])

    m = tb.backend.load(built(arch).path, LoadOptions(ctx=256, threads=2, n_gpu_layers=0))
    try:
        assert m.metadata["transformers.weights"] == "gptq dequantized"
        params = dict(m.model.named_parameters())
        assert any(n.endswith("linear_attn.out_proj.weight") for n in params)
        for name, p in params.items():
            np.testing.assert_array_equal(p.detach().numpy(), stored(name), err_msg=name)
        messages = [{"role": "user", "content": "hi"}]
        text = "".join(m.stream_chat(messages, Sampling(greedy=True), max_tokens=6))
        ids, want = m.tokens(m.render(messages)), []
        with torch.no_grad():
            while len(want) < 6:
                t = int(m.model(torch.tensor([ids + want]), use_cache=False).logits[0, -1].argmax())
                if t in m.eos_ids:
                    break
                want.append(t)
        assert want and m.generated == want and text == m.tokenizer.decode(want, skip_special_tokens=True)
    finally:
        m.close()


def test_cli_quantize_fit_and_run(tmp_path):
    """The three commands on the tiny Qwen3.5 (dense, vision tower, MTP block), as a user types them: quantize
    writes the GPTQ folder, fit predicts its tensor data to the byte, run answers from it (without GPTQModel:
    dequantized, one note, no kernel chatter)."""
    from tests.conftest import run_qwqq

    src, out = tiny_hybrid_dir("qwen3_5"), tmp_path / "q35-gptq"
    r = run_qwqq("quantize", src, "--format", "gptq", "--bits", "4", "--calib-tokens", "256", "--calib-seqlen", "128",
                 "-o", out, "-q", "--threads", "2")
    assert r.returncode == 0, r.stderr
    tensors = _tensors(out)
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.qweight" in tensors
    assert "mtp.fc.weight" in tensors and any(n.startswith("model.visual.") for n in tensors)
    written = 0
    for f in out.glob("*.safetensors"):
        with open(f, "rb") as fh:
            written += f.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
    fit = run_qwqq("fit", src, "--vram", "8", "--type", "GPTQ-Int4", "--json")
    assert fit.returncode == 0, fit.stderr
    row = json.loads(fit.stdout)[0]
    assert row["type"] == "GPTQ-Int4" and row["file_bytes"] == written
    run = run_qwqq("run", out, "--backend", "transformers", "-p", "hi", "--greedy", "-n", "4", "--threads", "2",
                   "--ctx", "256", timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "falling back" not in run.stderr
    from qwqq.run.backends.transformers_weights import missing_kernels

    if missing_kernels():
        assert sum(line.startswith("note:") for line in run.stderr.splitlines()) == 1
