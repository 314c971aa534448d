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


def test_auto_serves_fp32_on_a_gpu_and_int8_on_cpus(tmp_path):
    """optimize: auto: a GPU replica loads the fp32 graph on CUDA (the dynamic-int8 graph is made for ONNX
    Runtime's CPU kernels), a CPU replica of the same artifact the int8 file."""
    import numpy as np

    from contract.config import ModelConfig
    from export_jobs.job import export_one
    from inference.encoder import EncoderSession
    from tests.tiny import MINILM

    entry = export_one(ModelConfig(id="m", source=MINILM, optimize="auto"), tmp_path)
    gpu, cpu = EncoderSession(entry, tmp_path, use_gpu=True), EncoderSession(entry, tmp_path)
    assert gpu.model_file == "model.onnx" and gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    assert cpu.model_file == "model.int8.onnx"
    texts = ["the same text on two devices"]
    assert float(np.sum(gpu.run(gpu.prepare(texts)) * cpu.run(cpu.prepare(texts)))) > 0.97
