"""Speed options on the real packaged MiniLM: each new file passes its own gate against torch."""
from __future__ import annotations

import pytest

from tests.tiny import MINILM


@pytest.fixture(scope="module")
def minilm(minilm_root):
    """(fp32 path, torch sentence module, tokenizer, spec, max_length, hf config) for MiniLM."""
    from contract import manifest
    from contract.config import Task
    from export_jobs.encoder_sources import load_encoder
    from export_jobs.sources import resolve
    from export_jobs.specs import spec_for
    from export_jobs.torch_export import SentenceEncoder

    entry = manifest.load(minilm_root)["all-MiniLM-L6-v2"]
    model, tokenizer, settings, _ = load_encoder(resolve(MINILM))
    spec = spec_for(Task.embedding, model.config.model_type)
    module = SentenceEncoder(model, spec.inputs, settings.pooling, settings.normalize).eval()
    return entry.model_path(minilm_root), module, tokenizer, spec, entry.max_length, model.config


def _gate(minilm, path, option, providers=("CPUExecutionProvider",)):
    from export_jobs.optimize import check_speed_option

    _, module, tokenizer, spec, max_length, config = minilm
    return check_speed_option(module, path, tokenizer, spec, max_length, config.vocab_size, option,
                              spec.tolerance, providers)



pytestmark = pytest.mark.slow


def test_fp16_minilm_passes_its_gate_on_cuda(minilm, tmp_path):

    from contract.config import SpeedOption
    from export_jobs.optimize import apply_speed_option

    fp32, *_, config = minilm
    apply_speed_option(fp32, tmp_path / "model.fp16.onnx", SpeedOption.fp16, config)
    gate = _gate(minilm, tmp_path / "model.fp16.onnx", SpeedOption.fp16,
                 ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert gate["providers"][0] == "CUDAExecutionProvider"
    assert gate["min_cosine"] >= 0.999
