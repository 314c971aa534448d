"""Each architecture declared once (export_jobs.specs): the options a family takes, what its static graph refuses,
unknown model types, and no architecture name compared anywhere else."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from contract.config import ModelConfig, SpeedOption, Task
from export_jobs.specs import UnsupportedModelError, decoder_spec, known_model_types
from export_jobs.validate import ExportError

ROOT = Path(__file__).resolve().parents[2]


def _tiny_qwen3():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, eos_token_id=2, bos_token_id=1,
    )).eval()


def _sliding_qwen2():
    from tests.tiny import tiny_qwen2

    return tiny_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=0)


def test_an_unknown_model_type_names_the_known_ones():
    with pytest.raises(UnsupportedModelError, match=r"model type 't5'; known: \[.*'gpt2'.*'qwen2'"):
        decoder_spec("t5")


@pytest.mark.parametrize("build, option, message", [
    (_tiny_qwen3, SpeedOption.fused, "the qwen3 decoder family supports optimize: none; not fused"),
    (_sliding_qwen2, SpeedOption.int8, r"optimize: int8 builds the static-cache graph, which does not implement "
                                       r"sliding-window attention \(sliding_window=8\)"),
])
def test_the_export_job_refuses_what_the_family_cannot_do_before_exporting(tmp_path, build, option, message):
    from export_jobs.decoder_job import export_decoder_model
    from export_jobs.decoder_sources import gpt2_tokenizer
    from export_jobs.sources import resolve

    source = tmp_path / "source"
    build().save_pretrained(source)
    gpt2_tokenizer().save_pretrained(source)
    staging = tmp_path / "staging"
    staging.mkdir()
    cfg = ModelConfig(id="tiny", source=str(source), task=Task.generation, optimize=option)
    with pytest.raises(ExportError, match=f"^tiny: {message}"):
        export_decoder_model(cfg, resolve(str(source)), staging)
    assert list(staging.iterdir()) == []


def test_the_static_graph_refuses_a_sliding_window_that_the_dynamic_graph_serves(tmp_path):
    from export_jobs.decoder_export import export_decoder
    from export_jobs.decoder_validate import validate_decoder
    from export_jobs.static_decoder import export_static_decoder

    model = _sliding_qwen2()
    assert decoder_spec("qwen2").refusal(SpeedOption.none, model.config) is None
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        export_static_decoder(model, tmp_path / "static" / "model.onnx", max_length=64)
    assert not (tmp_path / "static" / "model.onnx").exists()
    export_decoder(model, tmp_path / "model.onnx")
    figures = validate_decoder(model, tmp_path / "model.onnx", new_tokens=8)  # raises unless it equals generate()
    assert min(figures["prompt_lengths"]) > model.config.sliding_window  # the window drops keys in both prompts


def _compared_strings(tree: ast.AST):
    """(line, string) for each string constant that is an operand of a comparison (==, !=, in, not in)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else (operand,)
                for item in items:
                    if isinstance(item, ast.Constant) and isinstance(item.value, str):
                        yield node.lineno, item.value


def test_no_architecture_name_is_compared_outside_the_specs():
    names = {t for types in known_model_types().values() for t in types}
    found = [f"{path.relative_to(ROOT)}:{line}: {value!r}"
             for package in ("contract", "inference", "export_jobs", "serve_app")
             for path in sorted((ROOT / package).rglob("*.py")) if path != ROOT / "export_jobs" / "specs.py"
             for line, value in _compared_strings(ast.parse(path.read_text(encoding="utf-8")))
             if value in names]
    assert found == []
