"""inference.continuous: requests that share one KV bucket and one decode step write the tokens they write alone."""
from __future__ import annotations

import numpy as np

from export_jobs.static_decoder import export_static_decoder
from inference.continuous import ContinuousBatcher
from inference.decode_static import StaticDecoderSession
from inference.sampling import SamplingParams, collect
from tests.tiny import run_concurrently

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def test_concurrent_generations_on_cuda_graphs_write_their_sequential_tokens(tmp_path):
    """On the CUDA EP, 8 generations at once (new buckets captured while others decode) and the same 8 through
    the continuous batcher write the tokens each writes alone. A capture used to fail when another thread copied
    to the device meanwhile (cudaErrorStreamCaptureUnsupported)."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from export_jobs.static_decoder import save_float16
    from inference.decode_static import generate_all_static, generate_static

    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=1000, hidden_size=128, num_layers=2, num_heads=2, window_size=16, max_position_embeddings=512,
        attention_types=[[["global", "local"], 1]], eos_token_id=None, bos_token_id=None)).eval()
    export_static_decoder(model, tmp_path / "fp32" / "model.onnx", max_length=256)
    save_float16(tmp_path / "fp32" / "model.onnx", tmp_path / "model.onnx")  # GQA runs on CUDA in float16 only
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    rng = np.random.default_rng(0)
    requests = [([rng.integers(1, 1000, 3 + 5 * i).tolist()], SamplingParams(max_tokens=8 + 12 * i, temperature=0))
                for i in range(8)]  # 8 lengths: 16- to 128-slot buckets
    alone = StaticDecoderSession(tmp_path / "model.onnx", providers=cuda, max_batch=1, min_slots=16)
    expected = [generate_all_static(alone, prompts, params) for prompts, params in requests]
    concurrent = StaticDecoderSession(tmp_path / "model.onnx", providers=cuda, max_batch=1, min_slots=16)
    assert concurrent.cuda_graph

    class Shared:  # generate_static's contract over the per-request session, for run_concurrently
        def generate(self, prompts, params):
            return generate_static(concurrent, prompts, params)

    assert run_concurrently(Shared(), requests) == expected
    # Rows of one bucket are computed independently, so a request in a full batch writes what it writes in the
    # same bucket alone (a 1-row bucket runs other kernels: float16 near-ties may differ there). Prompts go in one
    # token per step here: a prefill runs the prompt kernels, another source of float16 near-ties
    session = StaticDecoderSession(tmp_path / "model.onnx", providers=cuda, max_batch=8)
    batcher = ContinuousBatcher(session, slots=256, prefill=False)
    try:
        one_by_one = [collect(batcher.generate(prompts, params), 1) for prompts, params in requests]
        assert run_concurrently(batcher, requests) == one_by_one
        assert sum(a == b for a, b in zip(one_by_one, expected)) >= 4
    finally:
        batcher.close()
    # A prefill into rows 3 and 4 of an 8-row bucket, bound by device address, computes what the same two
    # prompts compute in a 2-row bucket of their own, and leaves the other rows alone
    prompts = [requests[7][0][0], requests[2][0][0]]
    own = session.bucket(2, 256)
    session.prefill(own, prompts, 0)
    shared = session.bucket(8, 256)
    for value in shared.cache:
        session.write(value, np.zeros(value.shape(), np.float16))
    logits, greedy = session.prefill_rows(shared, 3, prompts, 0)
    assert np.array_equal(logits, session.read(own.logits)) and np.array_equal(greedy, session.read(own.next_token))
    for mine, theirs in zip(shared.cache, own.cache):
        mine, theirs = session.read(mine), session.read(theirs)
        for row, prompt in zip((3, 4), prompts):
            assert np.array_equal(mine[row, :, :len(prompt)], theirs[row - 3, :, :len(prompt)])
        assert not mine[[0, 1, 2, 5, 6, 7]].any()
    prefilling = ContinuousBatcher(session, slots=256)
    try:
        alone = [collect(prefilling.generate(prompts, params), 1) for prompts, params in requests]
        assert prefilling.prefills_run == len(requests)
        assert sum(a == b for a, b in zip(alone, one_by_one)) >= 4
    finally:
        prefilling.close()
