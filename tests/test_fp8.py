"""Block-scaled FP8 sources (DeepSeek-V3 / R1's release format) read as float32, row chunk by row chunk,
bit for bit what llama.cpp's converter computes (`weight.float() * scale` with the scale repeated over
each 128x128 block, edge blocks partial)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwqq.errors import SourceError
from qwqq.source import RowReader, open_checkpoint


def _fp8_folder(tmp_path, shape=(200, 300), block=(128, 128), scale_shape=None):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 3).to(torch.float8_e4m3fn)
    sshape = scale_shape or tuple(-(-n // b) for n, b in zip(shape, block))
    s = torch.rand(sshape, generator=gen, dtype=torch.float32) * 0.01 + 1e-4
    save_file({"model.layers.0.mlp.down_proj.weight": w, "model.layers.0.mlp.down_proj.weight_scale_inv": s,
               "model.norm.weight": torch.ones(shape[1], dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}}))
    if scale_shape is not None:
        return None
    # llama.cpp's converter: dequant_simple
    scale = s.float()
    for i, size in enumerate(block):
        scale = scale.repeat_interleave(size, i)
    return (w.float() * scale[: shape[0], : shape[1]]).numpy()


def test_fp8_rows_are_the_converters_dequantization(tmp_path):
    want = _fp8_folder(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" not in ckpt.tensors
    ref = ckpt.tensors["model.layers.0.mlp.down_proj.weight"]
    assert ref.quantizable and ref.block == (128, 128)
    with RowReader() as r:
        for r0, r1 in ((0, 200), (0, 1), (127, 129), (130, 200), (5, 133)):
            got = r.read_f32(ref, r0, r1)
            assert got.tobytes() == np.ascontiguousarray(want[r0:r1]).tobytes(), (r0, r1)


def test_fp8_scales_of_the_wrong_shape_are_one_line(tmp_path):
    _fp8_folder(tmp_path, scale_shape=(1, 3))
    with pytest.raises(SourceError, match=r"expected float32 \[2, 3\] scales"):
        open_checkpoint(tmp_path)


def test_fp8_bad_input_is_one_line(tmp_path):
    """An FP8 tensor without its scale, and a DeepSeek-V3.2 checkpoint: one line each, nothing written."""
    import shutil

    from tests.conftest import one_line_error, run_qwqq
    from tests.fixtures_deepseek import tiny_deepseek_dir

    src = tiny_deepseek_dir("fp8")
    bad = tmp_path / "no-scale"
    shutil.copytree(src, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    gone = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    shard = bad / index["weight_map"].pop(gone)
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    del tensors[gone]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    r = run_qwqq("quantize", bad, "--bits", "4", "-o", tmp_path / "out.gguf", "-q")
    one_line_error(r, "q_a_proj.weight is F8_E4M3 without block scales")
    v32 = tmp_path / "v32"
    shutil.copytree(src, v32)
    config = json.loads((v32 / "config.json").read_text())
    config.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32")
    (v32 / "config.json").write_text(json.dumps(config))
    r = run_qwqq("quantize", v32, "--bits", "4", "-o", tmp_path / "out.gguf", "-q")
    one_line_error(r, "architecture DeepseekV32ForCausalLM (DeepSeek-V3.2) is not supported", "DeepSeek-V3 / R1 / V3.1 are supported")
    assert not list(tmp_path.glob("out.gguf*"))
