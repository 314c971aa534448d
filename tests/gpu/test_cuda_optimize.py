"""Speed options on the real packaged MiniLM: each new file passes its own gate against torch."""
from __future__ import annotations

import pytest

from tests.tiny import speed_gate

pytestmark = pytest.mark.slow


def test_fp16_minilm_passes_its_gate_on_cuda(minilm_speed, tmp_path):

    from contract.config import SpeedOption
    from export_jobs.optimize import apply_speed_option

    fp32, *_, config = minilm_speed
    apply_speed_option(fp32, tmp_path / "model.fp16.onnx", SpeedOption.fp16, config)
    gate = speed_gate(minilm_speed, tmp_path / "model.fp16.onnx", SpeedOption.fp16,
                 ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert gate["providers"][0] == "CUDAExecutionProvider"
    assert gate["min_cosine"] >= 0.999
