"""fit for the hybrid Qwen models: the shapes a config implies are the tensors quantize writes, the memory
model keeps a KV cache on the full-attention layers only plus a fixed recurrent state per sequence, the
MTP block is in the file but not in memory, and the catalog answers for today's releases.

(llama.cpp's own reports for the tiny hybrids are held in tests/test_fit_llamacpp.py.)"""

from __future__ import annotations

import json

import pytest

from qwqq.archs import find_arch, hparams
from qwqq.errors import QwqqError
from qwqq.fit import candidate as C
from qwqq.fit import memory as M
from qwqq.fit import search as F
from qwqq.fit import subject as models
from qwqq.gguf.prepared import prepare
from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture
from tests.fixtures_hybrid import HYBRID_ARCHS, tiny_hybrid_dir

NEW_CATALOG = ["Qwen3.5-0.8B", "Qwen3.5-2B", "Qwen3.5-4B", "Qwen3.5-9B", "Qwen3.5-27B", "Qwen3.6-27B", "Qwen3.8-27B",
               "Qwen3.5-35B-A3B", "Qwen3.6-35B-A3B", "Qwen3.5-122B-A10B", "Qwen3.5-397B-A17B", "Qwen3-Next-80B-A3B",
               "Qwen3-4B-2507", "Qwen3-30B-A3B-2507", "Qwen3-235B-A22B-2507"]


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_a_configs_shapes_are_the_tensors_quantize_writes(arch):
    src = tiny_hybrid_dir(arch)
    config = json.loads((src / "config.json").read_text())
    hp = {**hparams(config), "mtp_layers": 1}  # Qwen3-Next's config does not declare its MTP block
    predicted = dict(find_arch(config).shapes(hp, False))
    assert predicted == {t.name: tuple(t.shape) for t in prepare(src).tensors}


def test_qwen3_6_27b_state_as_llama_cpp_keeps_it():
    """Field notes (llama.cpp's reports for the real model): KV on 16 of 64 layers, f16 8192 cells 512 MiB;
    recurrent state 149.6 MiB per sequence (conv 5.62 + delta-net 144.00)."""
    d = models.resolve("Qwen/Qwen3.6-27B").dims
    assert d.kv_layers == 16 and sum(d.recurrent) == 48
    assert M.kv_bytes(d, 8192, "f16") == 512 * M.MiB
    conv = 4 * sum(d.recurrent) * d.n_embd_r
    assert round(conv / M.MiB, 2) == 5.62 and M.recurrent_bytes(d) - conv == 144 * M.MiB
    assert M.recurrent_bytes(d, n_seq=4) == 4 * M.recurrent_bytes(d)
    state = M.state_bytes(d, 8192, "f16")
    assert [s == M.kv_bytes(d, 8192, "f16", n_layers=1) for s in state] == [(i + 1) % 4 == 0 for i in range(64)]


def test_the_catalog_answers_for_todays_releases():
    names = {e.name for e in models.catalog()}
    assert set(NEW_CATALOG) <= names
    for hub in ("Qwen/Qwen3.6-35B-A3B", "Qwen/Qwen3-Next-80B-A3B-Thinking", "Qwen/Qwen3-30B-A3B-Thinking-2507"):
        assert models.find_catalog(hub) is not None
    for name in NEW_CATALOG:
        m = models.resolve(name)
        assert m.dims.ctx_train == 262144
    # the MTP block is in the file, not in memory
    m = models.resolve("Qwen3.6-27B")
    w = m.build("Q4_K_M").split(m.dims.n_layer)
    assert w.unloaded > 0 and any(n.startswith("blk.64.nextn.") for n, _ in m.shapes)


def test_fit_says_what_runs_on_a_24_gb_card():
    """Qwen3.6-27B fits a 24 GB GPU whole at 4-5 bits; Qwen3.6-35B-A3B too; the 397B needs experts in RAM."""
    hw = F.machine(vram=24, ram=64)
    for name in ("Qwen3.6-27B", "Qwen3.6-35B-A3B"):
        best = next(c for c in F.run_fit(name, hw, C.Request(), ["Q4_K_M"]).candidates if c.fits)
        assert best.mode == "gpu" and best.ctx >= 32768
    big = F.run_fit("Qwen3.5-397B-A17B", F.machine(vram=24, ram=256), C.Request(), ["Q2_K"]).candidates[0]
    assert big.mode == "offload" and big.cpu_moe_layers > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_fits_predicted_file_is_the_written_file(arch, tmp_path):
    src = tiny_hybrid_dir(arch)
    model = models.resolve(str(src))
    predicted = model.build("Q4_K_M").file_bytes
    out = quantize_to_gguf(src, resolve_mixture(type_name="Q4_K_M"), out=tmp_path / "q.gguf", progress=False,
                           threads=2).path
    assert out.stat().st_size == predicted


@pytest.mark.slow
def test_no_mtp_is_sized_as_quantize_no_mtp_writes_it(tmp_path):
    """fit --no-mtp: the predicted file (a folder with weights: to the byte) is the one `quantize --no-mtp` writes;
    from config.json alone the tensors are the same; the printed quantize line carries --no-mtp; a model
    without MTP, a GGUF and the catalog ranking refuse it in one line."""
    src = tiny_hybrid_dir("qwen3_5")
    kept, left = models.resolve(str(src)), models.resolve(str(src), mtp=False)
    out = quantize_to_gguf(prepare(src, mtp=False), resolve_mixture(type_name="Q4_K_M"), out=tmp_path / "q.gguf",
                           progress=False, threads=2).path
    assert out.stat().st_size == left.build("Q4_K_M").file_bytes < kept.build("Q4_K_M").file_bytes
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((src / "config.json").read_text())
    by_config = models.resolve(str(config_only), mtp=False)
    assert by_config.build("Q4_K_M").tensor_bytes == left.build("Q4_K_M").tensor_bytes
    assert by_config.n_params == left.n_params < kept.n_params
    hw = F.machine(vram=24)
    best = next(c for c in F.run_fit(str(src), hw, C.Request(), ["Q4_K_M"], mtp=False).candidates if c.fits)
    assert best.commands()["quantize"].endswith("--type Q4_K_M --no-mtp")
    for spec, message in ((str(tiny_hybrid_dir("qwen3_next")) + "/../none.gguf", "written already"),
                          ("QwQ-32B", "no multi-token-prediction"), (None, "name it")):
        with pytest.raises(QwqqError, match=message):
            F.run_fit(spec, hw, C.Request(), mtp=False)
