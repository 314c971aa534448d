"""Causal LM export with KV cache, the decode loop and the decoder gate, on tiny random models."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from export_jobs.decoder_export import DecoderExportInfo, export_decoder
from export_jobs.decoder_sources import gpt2_tokenizer, save_tokenizer
from export_jobs.decoder_validate import (
    TokenMismatchError,
    compare_greedy,
    transformers_greedy,
    validate_decoder,
)
from export_jobs.validate import ParityError
from inference.decode_dynamic import DecoderSession, generate, generate_all
from inference.detokenize import IncrementalDecoder, StopStringMatcher, find_stop_string
from inference.sampling import SamplingParams, sample_next
from tests.tiny import WINDOW, one_thread, tiny_causal_lms, tiny_qwen2

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for name, model in {**tiny_causal_lms(), "qwen2": tiny_qwen2()}.items():
        path = tmp_path_factory.mktemp(name) / "model.onnx"
        info = export_decoder(model, path)
        out[name] = (model, path, info, DecoderSession(path, session_options=one_thread()))
    save_tokenizer(gpt2_tokenizer(), out["gpt_neo"][1].parent)
    yield out
    torch.set_num_threads(threads)


def prompts_for(name: str, model) -> list[list[int]]:
    if name == "gpt_neo":
        tok = gpt2_tokenizer()
        texts = ["The quick brown fox jumps over the lazy dog, and then it runs far away into the woods.",
                 "Hello there, my friend!"]
        prompts = [tok(t)["input_ids"] for t in texts]
        assert len(prompts[0]) > 2 * WINDOW and len(prompts[1]) < len(prompts[0])
        return prompts
    rng = np.random.default_rng(1)
    return [rng.integers(3, model.config.vocab_size, 21).tolist(), rng.integers(3, model.config.vocab_size, 9).tolist()]


@pytest.mark.parametrize("name", ["gpt_neo", "gpt2", "llama", "qwen2"])
def test_export_info_and_graph_io(decoders, name):
    model, path, info, session = decoders[name]
    assert info.num_layers == 2 and info.opset == 18 and info.exporter == "torchscript"
    assert info.num_kv_heads == (2 if name in ("llama", "qwen2") else 4)
    assert info.input_names[:4] == ("input_ids", "attention_mask", "position_ids", "past_key_values.0.key")
    assert info.output_names[:3] == ("logits", "present.0.key", "present.0.value")
    assert DecoderExportInfo.load(path.parent) == info
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in graph.input] == list(info.input_names)
    dims = [d.dim_param for d in graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and not dims[1] and not dims[3]  # batch and past are symbolic


@pytest.mark.parametrize("name", ["gpt_neo", "gpt2", "llama", "qwen2"])
def test_greedy_matches_transformers_batch_1_and_left_padded_2(decoders, name):
    model, path, info, session = decoders[name]
    figures = validate_decoder(model, path, prompts_for(name, model), new_tokens=NEW_TOKENS, session=session)
    assert figures["prefill_max_abs_diff"] < 1e-4 and figures["decode_max_abs_diff"] < 1e-4
    assert figures["greedy_match_tokens"] == figures["greedy_compared_tokens"] == 3 * NEW_TOKENS


def test_io_binding_path_gives_the_same_tokens(decoders):
    """The IO-binding step (what runs on CUDA) exercised on CPU."""
    model, path, _, session = decoders["gpt_neo"]
    bound = DecoderSession(path, session_options=one_thread(), io_binding=True)
    prompts = prompts_for("gpt_neo", model)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    assert generate_all(bound, prompts, params) == generate_all(session, prompts, params)


def test_gate_rejects_perturbed_initializer(decoders, tmp_path):
    model, path, info, _ = decoders["gpt2"]
    proto = onnx.load(str(path))
    biggest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = onnx.numpy_helper.to_array(biggest).copy()
    weights[: max(1, len(weights) // 10)] *= 1.5
    biggest.CopyFrom(onnx.numpy_helper.from_array(weights, biggest.name))
    broken = tmp_path / "model.onnx"
    onnx.save_model(proto, str(broken))
    shutil.copy(path.parent / "decoder_info.json", tmp_path)
    with pytest.raises(ParityError) as err:
        validate_decoder(model, broken, prompts_for("gpt2", model), new_tokens=4,
                         session=DecoderSession(broken, session_options=one_thread()))
    assert err.value.max_abs_diff > err.value.tolerance


def test_gate_rejects_wrong_positions(decoders, monkeypatch):
    """A decode loop that ignores left padding in position_ids must fail the gate."""
    import inference.decode_dynamic as loop

    model, path, info, session = decoders["gpt2"]
    monkeypatch.setattr(loop, "positions_from_mask", lambda mask: np.broadcast_to(np.arange(mask.shape[1]), mask.shape))
    with pytest.raises(TokenMismatchError) as err:
        validate_decoder(model, path, prompts_for("gpt2", model), new_tokens=16, session=session)
    assert err.value.what == "greedy left-padded batch 2" and err.value.row == 1


def test_compare_greedy_typed_error():
    assert compare_greedy("x", [[1, 2, 3]], [[1, 2, 3]], eos=set()) == 3
    assert compare_greedy("x", [[1, 9, 9, 9]], [[1, 9]], eos={9}) == 2  # transformers pads after EOS
    with pytest.raises(TokenMismatchError) as err:
        compare_greedy("x", [[1, 2, 3]], [[1, 5, 3]], eos=set())
    assert (err.value.row, err.value.position) == (0, 1)


def test_sampling_is_reproducible_with_a_seed(decoders):
    model, _, _, session = decoders["llama"]
    prompts = prompts_for("llama", model)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = generate_all(session, prompts, params)
    assert first == generate_all(session, prompts, params)
    others = [generate_all(session, prompts, SamplingParams(max_tokens=12, temperature=1.0, seed=s)) for s in (1, 2)]
    assert any(o != first for o in others)


def test_temperature_zero_is_greedy(decoders):
    model, _, _, session = decoders["gpt2"]
    prompts = prompts_for("gpt2", model)
    greedy = generate_all(session, prompts, SamplingParams(max_tokens=8, temperature=0.0, seed=3))
    assert greedy == generate_all(session, prompts, SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=4))
    assert greedy == transformers_greedy(model, prompts, 8, pad_token_id=999)


def test_stop_token_and_finish_reasons(decoders):
    model, _, _, session = decoders["gpt2"]
    prompts = prompts_for("gpt2", model)
    free = generate_all(session, prompts[:1], SamplingParams(max_tokens=10, temperature=0.0))[0]
    stop = free[4]
    steps = list(generate(session, prompts, SamplingParams(max_tokens=10, temperature=0.0), stop_ids=(stop,)))
    row0 = [s.token_ids[0] for s in steps if s.token_ids[0] is not None]
    assert row0 == free[: free.index(stop) + 1]
    assert steps[free.index(stop)].finish_reasons[0] == "stop"
    assert steps[-1].all_finished
    assert steps[-1].finish_reasons[1] in ("stop", "length")
    if steps[-1].finish_reasons[1] == "length":
        assert len(steps) == 10


def test_sampling_params_are_validated():
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                dict(max_tokens=0), dict(temperature=float("nan"))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 2.0  # frozen


def test_top_k_and_top_p_cut_the_tail():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    picks = {int(sample_next(logits, SamplingParams(top_k=2), rng)[0]) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample_next(logits, SamplingParams(top_p=0.75), rng)[0]) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample_next(logits, SamplingParams(top_p=0.4), rng)[0]) for _ in range(50)}
    assert picks == {0}


def test_external_data_export(decoders, tmp_path):
    model = decoders["llama"][0]
    path = tmp_path / "decoder.onnx"
    info = export_decoder(model, path, external_data=True)
    data = (tmp_path / "decoder.onnx.data").stat().st_size
    assert info.external_data and data > 500_000 and path.stat().st_size < data / 3
    tokens = generate_all(DecoderSession(path, session_options=one_thread()), prompts_for("llama", model),
                          SamplingParams(max_tokens=6, temperature=0.0))
    assert tokens == transformers_greedy(model, prompts_for("llama", model), 6, pad_token_id=2)


def test_tokenizer_saved_beside_the_onnx(decoders):
    from tokenizers import Tokenizer

    path = decoders["gpt_neo"][1]
    tok = Tokenizer.from_file(str(path.parent / "tokenizer.json"))
    assert tok.encode("Hello world").ids == [15496, 995]


def test_incremental_decoder_and_stop_strings():
    tok = gpt2_tokenizer()
    text = "Héllo wörld 🌍 — done. STOP here"
    ids = tok(text)["input_ids"]
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text
    assert "\ufffd" not in "".join(deltas)

    matcher = StopStringMatcher(["STOP", "\n\n"])
    emitted, stopped = [], False
    for d in deltas:
        out, stopped = matcher.push(d)
        emitted.append(out)
        if stopped:
            break
    assert stopped and "".join(emitted) == text[: text.index("STOP")]
    assert find_stop_string(text, ["STOP"]) == text.index("STOP")
    m = StopStringMatcher(["abc"])
    assert m.push("xab") == ("x", False) and m.push("d") == ("abd", False)
