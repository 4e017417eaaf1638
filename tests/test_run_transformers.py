"""`qwqq run --backend transformers`: GPTQ folders (GPTQModel's kernels when installed, else the same
weights dequantized) and unquantized safetensors folders, on the tiny fixtures (real Qwen tokenizer and
chat template). GPTQ checkpoints are written here with qwqq's writer and round-to-nearest."""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from qwqq.run.backends import ENTRY_POINT_GROUP, LoadOptions, backends, pick_backend
from qwqq.run.chat import ChatSession, RunOptions
from qwqq.errors import QwqqError
from qwqq.run.sampling import Sampling
from tests import fixtures
from tests.conftest import one_line_error, run_qwqq

torch = pytest.importorskip("torch", reason='needs torch: pip install "qwqq[gptq]"')
pytest.importorskip("transformers", reason='needs transformers: pip install "qwqq[gptq]"')

from qwqq.run.backends import transformers as tb  # noqa: E402
from qwqq.gptq import checkpoint as gf  # noqa: E402
from qwqq.gptq import packing
from qwqq.gptq.solver import rtn_quantize  # noqa: E402

HAVE_KERNELS = not tb.missing_kernels()
MESSAGES = [{"role": "user", "content": "hi"}]
N = 12
OPTS = LoadOptions(ctx=512, threads=2, n_gpu_layers=0)

# name: (arch, bits, group size, sym, act-order, checkpoint format)
GPTQ_CASES = {
    "qwen2-4bit-g128": ("qwen2", 4, 128, True, False, "gptq"),
    "qwen3-tied-8bit-g64-asym-v2": ("qwen3", 8, 64, False, False, "gptq_v2"),
    "qwen3_moe-3bit-g32-actorder": ("qwen3_moe", 3, 32, True, True, "gptq"),
}


def write_rtn_gptq(case: str, out: Path) -> Path:
    arch, bits, gs, sym, act, fmt = GPTQ_CASES[case]
    rng = np.random.default_rng(0)

    def quantize(lin, w):
        if not act:
            r = rtn_quantize(torch.from_numpy(w), bits=bits, group_size=gs, sym=sym)
            zeros = r.zeros.clamp(min=1) if fmt == "gptq" else r.zeros  # v1 cannot store a zero point of 0
            return packing.pack(r.q, r.scales, zeros, r.g_idx, bits, checkpoint_format=fmt)
        # act-order: columns in a random order fill the groups, so g_idx is a permutation of groups
        perm = rng.permutation(lin.in_features)
        r = rtn_quantize(torch.from_numpy(np.ascontiguousarray(w[:, perm])), bits=bits, group_size=gs, sym=sym)
        q, g_idx = np.empty_like(r.q.numpy()), np.empty(lin.in_features, np.int32)
        q[:, perm], g_idx[perm] = r.q.numpy(), r.g_idx.numpy()
        return packing.pack(q, r.scales.numpy(), r.zeros.numpy(), g_idx, bits, checkpoint_format=fmt)

    return gf.write_gptq(fixtures.tiny_model_dir(arch), out, quantize, bits=bits, group_size=gs, sym=sym,
                         desc_act=act, checkpoint_format=fmt).path


@pytest.fixture(scope="module")
def gptq_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gptq")
    return {case: write_rtn_gptq(case, root / case) for case in GPTQ_CASES}


@pytest.fixture
def dequantized(monkeypatch):
    """Force the dequantized path even where GPTQModel is installed."""
    monkeypatch.setattr(tb, "missing_kernels", lambda: ["gptqmodel"])


# ---------------------------------------------------------------- the reference: plain transformers, dequantized weights
def dequantized_reference(folder: Path, arch: str):
    """transformers' own model of the source architecture (float32) holding the GPTQ folder's weights
    dequantized by gptq_format.dequantize, read with safetensors (not with the backend's reader)."""
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    stored: dict[str, np.ndarray] = {}
    for f in folder.glob("*.safetensors"):
        stored.update(load_file(f))
    state = {k: v.astype(np.float32) for k, v in stored.items() if not k.endswith(packing.PACKED)}
    for k in [k for k in stored if k.endswith(".qweight")]:
        module = k.removesuffix(".qweight")
        packed = {s: stored[f"{module}.{s}"] for s in packing.PACKED}
        state[f"{module}.weight"] = packing.dequantize(packed, qcfg["bits"], qcfg["checkpoint_format"])
    model = AutoModelForCausalLM.from_pretrained(str(fixtures.tiny_model_dir(arch)), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    sd = model.state_dict()
    for key in [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]:  # transformers 5 fuses experts in memory
        base, n = key.removesuffix(".gate_up_proj"), sd[key].shape[0]
        state[key] = np.stack([np.concatenate([state.pop(f"{base}.{e}.gate_proj.weight"),
                                               state.pop(f"{base}.{e}.up_proj.weight")]) for e in range(n)])
        state[f"{base}.down_proj"] = np.stack([state.pop(f"{base}.{e}.down_proj.weight") for e in range(n)])
    expected = set(sd) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert expected <= set(state), sorted(expected - set(state))[:5]
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(state[k])) for k in expected}, strict=False)
    return model.eval()


def greedy_argmax(model, tokens: list[int], n: int, eos: set[int]) -> list[int]:
    """The greedy continuation, the direct way: the whole sequence through the model each step, argmax."""
    ids, out = list(tokens), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if t in eos:
                break
            out.append(t)
            ids.append(t)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_greedy_tokens_equal_the_dequantized_weights_in_transformers(case, gptq_dirs, dequantized):
    folder = gptq_dirs[case]
    m = tb.backend.load(folder, OPTS)
    try:
        assert m.metadata["transformers.weights"] == "gptq dequantized"
        assert m.metadata["transformers.dtype"] == "float32"
        text = "".join(m.stream_chat(MESSAGES, Sampling(greedy=True), max_tokens=N))
        tokens = m.tokens(m.render(MESSAGES))
        want = greedy_argmax(dequantized_reference(folder, GPTQ_CASES[case][0]), tokens, N, m.eos_ids)
        assert want and m.generated == want
        assert text == m.tokenizer.decode(want, skip_special_tokens=True)
        assert m.finish_reason == ("length" if len(want) == N else "stop")
    finally:
        m.close()


@pytest.mark.slow
def test_unquantized_bf16_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    src = fixtures.tiny_model_dir("qwen3")
    m = tb.backend.load(src, OPTS)
    try:
        assert (m.metadata["transformers.weights"], m.metadata["transformers.dtype"]) == ("unquantized", "bfloat16")
        "".join(m.stream_chat(MESSAGES, Sampling(greedy=True), max_tokens=N))
        ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        # teacher-forced: transformers' bf16 logits after the prompt and each generated prefix. bf16 logits tie
        # exactly now and then (one ulp is 1/64 at |logit| ~ 3), and which of two tied tokens argmax returns
        # depends on the kernel's reduction order, so a token must be the argmax or tied with it within one ulp.
        tokens, gen = m.tokens(m.render(MESSAGES)), m.generated
        assert len(gen) == N
        with torch.no_grad():
            rows = ref(torch.tensor([tokens + gen])).logits[0, len(tokens) - 1:-1].float()
        top = rows.max(dim=-1).values
        ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(top.abs())))
        picked = rows[torch.arange(N), torch.tensor(gen)]
        assert bool((picked >= top - ulp).all()), (picked - top).tolist()
        assert int((picked == top).sum()) >= N - 1  # ties are rare: all but at most one step is the exact argmax
    finally:
        m.close()


# ---------------------------------------------------------------- --load-in-4bit: bitsandbytes NF4
@pytest.mark.slow
def test_load_in_4bit_is_bitsandbytes_nf4_and_generates_as_that_model(smollm2_dir):
    """SmolLM2's real weights, quantized on load by bitsandbytes (NF4, double quant): every decoder linear is a
    bitsandbytes 4-bit layer, its weights read back are NF4-close to the source's, the model takes under half
    the memory, and the backend's token loop gives the tokens a direct greedy pass of that model gives."""
    bnb = pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "qwqq[nf4]"')
    from safetensors.torch import load_file

    m = tb.backend.load(smollm2_dir, LoadOptions(ctx=512, threads=2, n_gpu_layers=0, load_in_4bit=True))
    try:
        assert m.metadata["transformers.weights"] == "bitsandbytes nf4"
        linears = {n: mod for n, mod in m.model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
        assert len(linears) == 30 * 7  # q k v o gate up down in each of the 30 layers
        q = linears["model.layers.0.self_attn.q_proj"].weight
        assert q.quant_state.quant_type == "nf4" and q.quant_state.nested
        w = bnb.functional.dequantize_4bit(q.data, q.quant_state).float().numpy()
        src = load_file(str(smollm2_dir / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
        src = src.float().numpy()
        rel = np.linalg.norm(w - src) / np.linalg.norm(src)
        assert 0.02 < rel < 0.15, rel  # quantized (not a copy), and to 4 bits' precision
        bf16_bytes = (smollm2_dir / "model.safetensors").stat().st_size  # the source: bf16, embedding tied
        assert m.model.get_memory_footprint() < 0.45 * bf16_bytes  # linears at ~4.1 bits, embedding still bf16
        "".join(m.stream_chat(MESSAGES, Sampling(greedy=True), max_tokens=N))
        assert m.generated == greedy_argmax(m.model, m.tokens(m.render(MESSAGES)), N, m.eos_ids)
    finally:
        m.close()


@pytest.mark.slow
def test_cli_load_in_4bit(smollm2_dir, gptq_dirs):
    pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "qwqq[nf4]"')
    r = run_qwqq("run", smollm2_dir, "--load-in-4bit", "-p", "What is the capital of France?", "--greedy", "-n", "8",
                 "--threads", "2", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    one_line_error(run_qwqq("run", smollm2_dir, "--load-in-4bit", "--backend", "llama.cpp", "-p", "hi"),
                   "--load-in-4bit", "--backend llama.cpp")
    one_line_error(run_qwqq("run", gptq_dirs["qwen2-4bit-g128"], "--load-in-4bit", "-p", "hi"),
                   "already quantized (gptq)")


# ---------------------------------------------------------------- through the CLI
@pytest.mark.slow
def test_cli_runs_a_gptq_folder(gptq_dirs):
    r = run_qwqq("run", gptq_dirs["qwen2-4bit-g128"], "--backend", "transformers", "-p", "hi", "--greedy", "-n", "8",
                 "--threads", "2", timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "<|im_end|>" not in r.stdout and "<|im_start|>" not in r.stdout
    if not HAVE_KERNELS:
        notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and "dequantized to float" in notes[0] and "pip install gptqmodel" in notes[0]


@pytest.mark.slow
def test_cli_runs_an_unquantized_folder_when_named():
    src = fixtures.tiny_model_dir("qwen2")
    r = run_qwqq("run", src, "--backend", "transformers", "-p", "hi", "--seed", "3", "-n", "6", "--threads", "2",
                 timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "note:" not in r.stderr


# ---------------------------------------------------------------- backend choice
def test_backend_choice(gptq_dirs, tmp_path):
    assert "transformers" in backends()
    gptq = gptq_dirs["qwen2-4bit-g128"]
    assert pick_backend("auto", gptq).name == "transformers"
    assert pick_backend("hf", gptq).name == "transformers"
    plain = fixtures.tiny_model_dir("qwen2")
    assert pick_backend("transformers", plain).name == "transformers"
    with pytest.raises(QwqqError, match=r"qwqq quantize.*--backend transformers"):
        pick_backend("auto", plain)  # auto keeps saying "quantize it first" for an unquantized folder
    with pytest.raises(QwqqError, match=r"cannot load safetensors models; use --backend transformers$"):
        pick_backend("llama.cpp", plain)


def test_entry_point_declared():
    import tomllib

    assert ENTRY_POINT_GROUP == "qwqq.backends"  # the group plugins register under: a public name
    eps = tomllib.loads((fixtures.REPO / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert eps["transformers"] == "qwqq.run.backends.transformers:backend"


# ---------------------------------------------------------------- sampling, stopping, context
@pytest.fixture(scope="module")
def model(gptq_dirs):
    mp = pytest.MonkeyPatch()
    mp.setattr(tb, "missing_kernels", lambda: ["gptqmodel"])
    m = tb.backend.load(gptq_dirs["qwen2-4bit-g128"], OPTS)
    mp.undo()
    yield m
    m.close()


@pytest.mark.slow
def test_seeded_sampling_is_repeatable(model):
    def sample(seed):
        text = "".join(model.stream_chat(MESSAGES, Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=seed), 10))
        return text, list(model.generated)

    a = sample(1)
    assert a == sample(1)
    assert a[1] != sample(2)[1]
    # top_k 1 is greedy whatever the temperature
    "".join(model.stream_chat(MESSAGES, Sampling(temperature=2.0, top_k=1, seed=5), 6))
    top1 = list(model.generated)
    "".join(model.stream_chat(MESSAGES, Sampling(greedy=True), 6))
    assert top1 == model.generated


@pytest.mark.slow
def test_stops_at_eos_and_at_the_context(model, monkeypatch):
    "".join(model.stream_chat(MESSAGES, Sampling(greedy=True), 4))
    first = model.generated[0]
    monkeypatch.setattr(model, "eos_ids", model.eos_ids | {first})
    assert "".join(model.stream_chat(MESSAGES, Sampling(greedy=True), 4)) == ""
    assert model.finish_reason == "stop" and model.generated == []
    monkeypatch.undo()
    n_prompt = len(model.tokens(model.render(MESSAGES)))
    monkeypatch.setattr(model, "n_ctx", n_prompt + 3)
    "".join(model.stream_chat(MESSAGES, Sampling(greedy=True), 100))
    assert len(model.generated) == 3 and model.finish_reason == "length"
    monkeypatch.setattr(model, "n_ctx", n_prompt)
    with pytest.raises(QwqqError, match="--ctx"):
        list(model.stream_chat(MESSAGES, Sampling(greedy=True), 4))


@pytest.mark.slow
def test_history_through_a_session_and_stopping_mid_answer(model, capsys):
    from rich.console import Console

    prompt = model.render(MESSAGES)
    assert prompt.endswith("<|im_start|>assistant\n")  # the Qwen template, rendered in qwqq's sandbox
    session = ChatSession(model, Sampling(greedy=True), RunOptions(model=Path("x"), max_tokens=6), Console(stderr=True))
    turn = session.ask("Say hello.")
    assert session.conversation.messages[-1] == {"role": "assistant", "content": turn.answer}
    assert capsys.readouterr().out.strip() == turn.answer
    stream = model.stream_chat(MESSAGES, Sampling(greedy=True), 20)
    next(stream)
    stream.close()  # what Ctrl-C does
    "".join(model.stream_chat(MESSAGES, Sampling(greedy=True), 5))
    again = list(model.generated)
    "".join(model.stream_chat(MESSAGES, Sampling(greedy=True), 5))
    assert again and again == model.generated


def test_no_deprecated_transformers_arguments(model):
    """transformers says FutureWarning for an argument it is about to remove (past_key_values goes in 5.40): the
    token loop passes none, and the cache it passes fills as the prompt goes through."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        "".join(model.stream_chat(MESSAGES, Sampling(greedy=True), 4))
    assert model.generated


def test_a_model_that_ignores_the_cache_is_one_line(model, monkeypatch):
    """A transformers whose models do not take `cache` (older ones call it by its old name) would recompute
    each step from one token: said in one line instead."""

    class OldCacheName:
        def __init__(self, inner):
            self.inner, self.config = inner, inner.config

        def __call__(self, cache=None, **kw):
            return self.inner(**kw)

    monkeypatch.setattr(model, "model", OldCacheName(model.model))
    with pytest.raises(QwqqError, match=r"does not take the KV cache as `cache`.*pip install -U transformers"):
        list(model.stream_chat(MESSAGES, Sampling(greedy=True), 4))


def test_note_names_what_is_missing():
    assert tb.dequantized_note(["gptqmodel"]).startswith("note: GPTQModel is not installed: running the GPTQ weights")
    assert "pip install gptqmodel optimum" in tb.dequantized_note(["gptqmodel", "optimum"])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_KERNELS, reason="GPTQModel and optimum are not installed (docs/gptq.md)")
def test_gptqmodel_kernels(gptq_dirs):
    m = tb.backend.load(gptq_dirs["qwen2-4bit-g128"], OPTS)
    try:
        assert m.metadata["transformers.weights"].startswith("gptq kernels")
        assert "".join(m.stream_chat(MESSAGES, Sampling(greedy=True), 4)) is not None and m.generated
    finally:
        m.close()


# ---------------------------------------------------------------- bad inputs: one line
def test_pickle_only_folders_are_refused(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (plain / "pytorch_model.bin").write_bytes(b"\x80\x02" + b"\x00" * 64)
    one_line_error(run_qwqq("run", plain, "--backend", "transformers", "-p", "hi"), "no model qwqq can run")
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps({"model_type": "qwen2", "quantization_config": {"quant_method": "gptq"}}))
    (gptq / "pytorch_model.bin").write_bytes(b"\x80\x02" + b"\x00" * 64)
    one_line_error(run_qwqq("run", gptq, "--backend", "transformers", "-p", "hi"), "pickle", "pytorch_model.bin")


def test_truncated_gptq_safetensors(gptq_dirs, tmp_path):
    bad = tmp_path / "cut"
    shutil.copytree(gptq_dirs["qwen2-4bit-g128"], bad)
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    one_line_error(run_qwqq("run", bad, "-p", "hi"), "model.safetensors", "truncated")


def test_gguf_and_single_files_are_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    one_line_error(run_qwqq("run", gguf, "--backend", "transformers", "-p", "hi"),
                   "transformers backend cannot load gguf models", "--backend llama.cpp")
    single = tmp_path / "model.safetensors"
    shutil.copy(fixtures.tiny_model_dir("qwen2") / "model.safetensors", single)
    one_line_error(run_qwqq("run", single, "--backend", "transformers", "-p", "hi"), "model folder", "not a file")


def test_other_quantization_methods_are_refused(tmp_path):
    awq = tmp_path / "awq"
    shutil.copytree(fixtures.tiny_model_dir("qwen2"), awq)
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (awq / "config.json").write_text(json.dumps(config))
    one_line_error(run_qwqq("run", awq, "--backend", "transformers", "-p", "hi"), "quantization method 'awq'")


def test_unavailable_without_torch(monkeypatch, gptq_dirs):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert "torch not installed" in tb.backend.unavailable_reason()
    with pytest.raises(QwqqError, match=r'gptq needs the transformers backend.*pip install "qwqq\[gptq\]"'):
        pick_backend("auto", gptq_dirs["qwen2-4bit-g128"])
