"""`qwqq run` with real llama.cpp on SmolLM2-135M (Q4_1), plus format detection and backend choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwqq.formats import detect_format
from qwqq.run.backends import ENTRY_POINT_GROUP, Backend, LoadOptions, backends, pick_backend
from qwqq.run.chat import ChatSession, RunOptions
from qwqq.errors import QwqqError
from qwqq.run.sampling import Sampling
from tests.conftest import one_line_error

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("llama_cpp", reason='needs llama-cpp-python: pip install "qwqq[llama]"')


@pytest.fixture(scope="module")
def gguf_path(smollm2_gguf) -> Path:  # SmolLM2-135M-Instruct Q4_1, from tests/conftest.py
    return Path(smollm2_gguf)


def qwqq(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("QWQQ_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "qwqq.cli", *args], input=stdin, capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


FAST = ("--ctx", "512", "--threads", "2")


# ---------------------------------------------------------------- one-shot runs
@pytest.mark.slow
def test_one_shot_prints_an_answer(gguf_path):
    r = qwqq("run", str(gguf_path), "-p", "What is 2+2?", "--max-tokens", "16", "--seed", "1", *FAST)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "<|im_end|>" not in r.stdout and "<|im_start|>" not in r.stdout


@pytest.mark.slow
def test_greedy_is_repeatable(gguf_path):
    args = ("run", str(gguf_path), "-p", "Name three colours.", "--max-tokens", "16", "--greedy", *FAST)
    first, second = qwqq(*args), qwqq(*args)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() and first.stdout == second.stdout


@pytest.mark.slow
def test_interactive_loop_over_stdin(gguf_path):
    r = qwqq("run", str(gguf_path), "-n", "12", "--greedy", *FAST, stdin="What is 2+2?\n/reset\nHello!\n/exit\nnever asked\n")
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2  # two questions answered, nothing after /exit
    assert "conversation cleared" in r.stderr


@pytest.mark.slow
def test_interactive_loop_ends_on_eof(gguf_path):
    r = qwqq("run", str(gguf_path), "-n", "8", "--greedy", *FAST, stdin="Hi\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


# ---------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    one_line_error(qwqq("run", str(tmp_path / "nope.gguf"), "-p", "hi"), "nope.gguf", "no such file")


def test_not_gguf(tmp_path):
    bad = tmp_path / "fake.gguf"
    bad.write_text("not a model at all\n")
    one_line_error(qwqq("run", str(bad), "-p", "hi"), "fake.gguf", "not a GGUF file")


def test_truncated_gguf_says_why(gguf_path, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_path.read_bytes()[: 50_000_000])
    one_line_error(qwqq("run", str(bad), "-p", "hi", *FAST), "cut.gguf", "truncated")


def test_file_being_written_is_refused(gguf_path, tmp_path):
    link = tmp_path / "model.gguf"
    link.symlink_to(gguf_path)
    (tmp_path / "model.gguf.lock").write_text("1234")
    one_line_error(qwqq("run", str(link), "-p", "hi"), "being written by another qwqq process")


def test_unknown_backend(gguf_path):
    one_line_error(qwqq("run", str(gguf_path), "-p", "hi", "--backend", "vllm"), "unknown backend 'vllm'", "llama.cpp")


def test_prompt_longer_than_context(gguf_path):
    r = qwqq("run", str(gguf_path), "-p", "word " * 600, "--ctx", "128", "-n", "4")
    one_line_error(r, "--ctx")


# ---------------------------------------------------------------- backend API in-process
@pytest.fixture(scope="module")
def model(gguf_path):
    backend = pick_backend("auto", gguf_path)
    m = backend.load(gguf_path, LoadOptions(ctx=512, threads=2, seed=1))
    yield m
    m.close()


def test_registry_and_protocol():
    found = backends()
    assert "llama.cpp" in found
    b = found["llama.cpp"]
    assert isinstance(b, Backend)
    assert b.formats == ("gguf",) and b.unavailable_reason() is None


def test_entry_point_declared():
    from importlib.metadata import PackageNotFoundError, entry_points

    try:
        eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except PackageNotFoundError:  # pragma: no cover
        eps = {}
    if not eps:
        pytest.skip("qwqq is not installed (pip install -e .): entry points not visible")
    assert eps["llama.cpp"] == "qwqq.run.backends.llamacpp:backend"


@pytest.mark.slow
def test_model_renders_its_own_template_and_streams(model):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = model.render(messages)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in prompt  # from the GGUF's template
    pieces = list(model.stream_chat(messages, Sampling(greedy=True), max_tokens=8))
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert model.finish_reason in ("stop", "length")


@pytest.mark.slow
def test_history_through_a_real_session(model, capsys):
    from rich.console import Console

    session = ChatSession(model, Sampling(greedy=True), RunOptions(model=Path("x"), max_tokens=8), Console(stderr=True))
    turn = session.ask("Say hello.")
    assert session.conversation.messages == [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": turn.answer},
    ]
    assert capsys.readouterr().out.strip() == turn.answer
    assert turn.answer in model.render(session.conversation.with_user("Again."))


@pytest.mark.slow
def test_stopping_mid_answer_leaves_the_model_usable(model):
    messages = [{"role": "user", "content": "Count from one to fifty."}]
    stream = model.stream_chat(messages, Sampling(greedy=True), max_tokens=40)
    next(stream)
    stream.close()  # what Ctrl-C does to the generator
    full = "".join(model.stream_chat(messages, Sampling(greedy=True), max_tokens=6))
    again = "".join(model.stream_chat(messages, Sampling(greedy=True), max_tokens=6))
    assert full and full == again


@pytest.mark.slow
def test_same_seed_same_text_and_seeds_differ(model):
    messages = [{"role": "user", "content": "Tell me a story."}]

    def sample(seed):
        return "".join(model.stream_chat(messages, Sampling(temperature=1.5, top_k=0, top_p=1.0, seed=seed), max_tokens=16))

    a = sample(1)
    assert a == sample(1)
    assert a != sample(2)


def test_template_is_sandboxed(tmp_path):
    from qwqq.run.template import ChatTemplate

    def render(source, messages=()):
        return ChatTemplate(source, "", "", tmp_path).render(list(messages))

    with pytest.raises(QwqqError, match="chat template failed: .*unsafe|access to attribute"):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(QwqqError, match="chat template failed"):
        render("{% set x = [] %}{{ x.append(1) }}")
    t = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
    assert render(t, [{"a": "é"}, {"b": 2}]) == '{"a": "é"}'


# ---------------------------------------------------------------- format detection
def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_detect_format(gguf_path, tmp_path):
    assert detect_format(gguf_path) == "gguf"
    mlx = write_config(tmp_path / "mlx", {"model_type": "qwen2", "quantization": {"group_size": 64, "bits": 4}})
    assert detect_format(mlx) == "mlx"
    gptq = write_config(tmp_path / "gptq", {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert detect_format(gptq) == "gptq"
    hf = write_config(tmp_path / "hf", {"model_type": "qwen2"})
    (hf / "model.safetensors").write_bytes(b"")
    assert detect_format(hf) == "safetensors"
    with pytest.raises(QwqqError, match="no model"):
        detect_format(write_config(tmp_path / "empty", {}))
    bad_version = tmp_path / "v9.gguf"
    bad_version.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(QwqqError, match="version 9"):
        detect_format(bad_version)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(QwqqError, match="truncated"):
        detect_format(short)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 64)
    with pytest.raises(QwqqError, match="unknown model format"):
        detect_format(other)


def test_pick_backend_says_what_to_do(gguf_path, tmp_path, monkeypatch):
    assert pick_backend("auto", gguf_path).name == "llama.cpp"
    assert pick_backend("llamacpp", gguf_path).name == "llama.cpp"
    mlx = write_config(tmp_path / "mlx", {"quantization": {"bits": 4}})
    from qwqq.run.backends import mlx as mlx_backend  # as if mlx-lm were not installed

    monkeypatch.setattr(mlx_backend.MLXBackend, "unavailable_reason",
                        lambda self: 'mlx-lm not installed; install it with: pip install "qwqq[mlx]"')
    with pytest.raises(QwqqError, match=r'pip install "qwqq\[mlx\]"'):
        pick_backend("auto", mlx)
    with pytest.raises(QwqqError, match="cannot load mlx"):
        pick_backend("llama.cpp", mlx)
    hf = write_config(tmp_path / "hf", {"model_type": "qwen2"})
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(QwqqError, match="qwqq quantize"):
        pick_backend("auto", hf)
