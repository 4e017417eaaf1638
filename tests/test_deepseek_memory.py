"""qwqq quantize's memory does not grow with the number of experts: a tiny DeepSeek-V3 FP8 release with 256
routed experts (R1's count) peaks within 10 % of the same model with 16 (bench/deepseek_experts.py measures the
same for docs/bench-gguf.md)."""

from __future__ import annotations

import pytest

from bench.common import Launcher, qwqq_command
from tests.fixtures_deepseek import tiny_deepseek_dir


@pytest.mark.slow  # two quantizations, ~15 s (and the two fixtures, ~20 s, built once)
def test_peak_rss_is_flat_from_16_to_256_experts(tmp_path):
    launch = Launcher()  # children of a small process: ru_maxrss is theirs alone
    peaks, sizes = {}, {}
    try:
        for experts in (16, 256):
            out = tmp_path / f"e{experts}.gguf"
            m = launch.measure([*qwqq_command(), "quantize", str(tiny_deepseek_dir("fp8", mtp=False, experts=experts)),
                                "--type", "Q8_0", "-o", str(out), "-j", "2", "-q"], tmp_path / f"e{experts}.log")
            peaks[experts], sizes[experts] = m["peak_rss"], out.stat().st_size
    finally:
        launch.close()
    stacked_growth = 240 * 3 * 3 * 128 * 256 * 4  # float32 bytes the 240 more experts add (3 MoE layers)
    assert sizes[256] - sizes[16] > 0.2 * stacked_growth  # the experts are there, in the file
    assert peaks[256] <= 1.10 * peaks[16], peaks
    assert abs(peaks[256] - peaks[16]) < 0.1 * stacked_growth, peaks  # far less than holding them would take
