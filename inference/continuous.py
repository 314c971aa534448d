"""Continuous batching over a static-cache decoder: all requests of a replica share one KV bucket and one step.

Without it every generation decodes in its own bucket and concurrent generations take turns per step, so a
GPU that decodes 32 rows in little more than the time of one row serves 32 users at 1/32 of its throughput
(BENCHMARKS.md, "Concurrent generation"). Here one scheduler thread runs decode steps over a bucket of `rows` rows;
a request takes the lowest free rows as it arrives and gives them back the step it finishes (or is cancelled),
so rows join and leave between steps and every step decodes every active row. A step runs over the smallest
power-of-two prefix of the rows that holds the active ones (each prefix has its own captured graphs over the
same KV memory), so a lone request decodes at the speed of a 1-row bucket.

A new row's prompt goes into the cache one of two ways. A prefill runs the new rows' prompts in one uncaptured
call over their slice of the bucket (StaticDecoderSession.prefill_rows), so a row's first token comes after one
call instead of one step per prompt token; the call stalls the rows that are decoding for about a step. Fed one
token per step through the captured decode graph instead, a prompt costs its neighbours nothing (the step is
bound by the weights, not the rows) but costs itself a step per token. So new rows are prefilled when the steps
they save (prompt tokens - 1, summed) are at least the rows the prefill stalls: always when nothing decodes (a
lone request), a burst of arrivals at once, a long prompt; a short prompt joining a busy batch is fed.

Each request keeps its own sampling state (seeded rng, finish rules); greedy rows take the token
the graph picked on the device, so only sampling rows read logits back. Steps are pushed to each request's
queue; a request whose reader is MAX_AHEAD steps behind pauses (its rows rewrite their last cache slot with
the token already there), so a slow reader buffers little and a vanished one stops soon after it is noticed. A
reader may ask for its steps in lists, one per interval (`stream`), and sleep in between: then it counts as behind
only once it is late for its next read.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from .decode_static import StaticDecoderSession, bucket_width
from .sampling import Finish, SamplingParams, StepOutput, sample_next

logger = logging.getLogger("serve_app")
# cache slots per row of a served batcher (its context): 32 rows of GPT-Neo 1.3B in float16 take 6.4 GB
CONTINUOUS_SLOTS = 1024
MAX_AHEAD = 8  # steps a request may have waiting for a late reader before its rows pause
READ_SLACK_S = 0.05  # how late a reader may be beyond its interval before it counts as late


class _Request:
    def __init__(self, prompts: Sequence[Sequence[int]], params: SamplingParams, finish: Finish):
        self.prompts = [list(p) for p in prompts]
        self.params, self.finish, self.pad = params, finish, finish.pad
        self.rng = np.random.default_rng(params.seed)
        self.rows: list[int] = []  # bucket row of each prompt, once admitted
        self.fed = [0] * len(prompts)  # prompt tokens in the cache
        self.last = [0] * len(prompts)  # the token the row feeds next, once its prompt is in
        self.previous = [0] * len(prompts)  # the token in each row's last cache slot
        self.generated = [0] * len(prompts)
        self.reasons: list[str | None] = [None] * len(prompts)
        self.out: queue.Queue = queue.Queue()  # StepOutput, an exception, or None at the end
        self.interval_s = 0.0  # how long its reader sleeps between reads (stream)
        self.read_at = 0.0  # time.monotonic() of the reader's last read; 0: none yet
        self.step = 0
        self.cancelled = False


class ContinuousBatcher:
    """One bucket of `rows` x `slots` and the thread that decodes it; `generate` is generate_static's contract."""

    def __init__(self, session: StaticDecoderSession, rows: int | None = None, slots: int | None = None,
                 prefill: bool = True):
        """prefill: False feeds every prompt one token per step (prompt and decode kernels never mix).
        With the session's shape_buckets (on the CUDA EP, where a new shape's first run is slow)
        prefill calls come in power-of-two rows and widths only, each shape run once at start."""
        self.session, self.prefill = session, prefill
        self.rows = rows or session.max_batch
        self.bucket = session.acquire(self.rows, slots or session.max_length)  # held for the batcher's life
        self.rows, self.slots = self.bucket.batch, self.bucket.slots  # as the session rounded them
        # a step decodes the smallest power-of-two prefix of rows that holds every active row (rows are handed
        # out lowest first), so a lone request pays for a 1-row step, not a `rows`-row one
        self.prefixes = {self.rows: self.bucket}
        size = 1
        while size < self.rows:
            self.prefixes[size] = session.row_prefix(self.bucket, size)
            size *= 2
        self.warmup_seconds = 0.0
        if prefill and session.shape_buckets and session.on_cuda:
            self._warm_prefill_shapes()
        self.owner: list[_Request | None] = [None] * self.rows
        self.position = np.zeros(self.rows, np.int64)  # tokens each row holds in the cache
        self.steps_run = 0
        self.prefills_run = 0
        self.rows_decoded = 0  # summed over steps: the rows of the prefix each step ran
        self.prefill_seconds = 0.0  # wall time in prefill calls
        self._pending: collections.deque[_Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
        self._thread.start()

    @property
    def active_rows(self) -> int:
        return self.rows - self.owner.count(None)

    def _active(self) -> set[_Request]:
        """The requests that hold rows."""
        return {r for r in self.owner if r is not None}

    def generate(self, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 pad_token_id: int | None = None, stop_ids: Sequence[int] | None = None) -> Iterator[StepOutput]:
        """Yield this request's steps (a step where none of its rows produced a token is skipped)."""
        for steps in self.stream(prompts_token_ids, params, pad_token_id, stop_ids=stop_ids):
            yield from steps

    def stream(self, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams,
               pad_token_id: int | None = None, interval_s: float = 0.0,
               stop_ids: Sequence[int] | None = None) -> Iterator[list[StepOutput]]:
        """This request's steps in lists: the first list as soon as the first step is ready (with any step already
        queued behind it, if the reader woke late), then every step that is ready once `interval_s` has passed
        since the previous list (at least one). The reader sleeps between lists instead of waking at every step,
        so 32 readers do not contend with the batcher thread for the interpreter at every step."""
        if not prompts_token_ids or any(len(p) == 0 for p in prompts_token_ids):
            raise ValueError("every prompt needs at least one token")
        if len(prompts_token_ids) > self.rows:
            raise ValueError(f"{len(prompts_token_ids)} prompts; the batcher decodes at most {self.rows} rows")
        longest = max(len(p) for p in prompts_token_ids)
        if longest >= self.slots:
            raise ValueError(f"a prompt of {longest} tokens leaves no room in {self.slots} cache slots")
        request = _Request(prompts_token_ids, params,
                           Finish(self.session.eos_token_ids, params.max_tokens, pad_token_id, stop_ids))
        request.interval_s = interval_s  # before the batcher thread can see the request
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(request)
            self._cv.notify()
        try:
            while True:
                if interval_s and request.read_at:
                    time.sleep(max(0.0, request.read_at + interval_s - time.monotonic()))
                items = [request.out.get()]
                while isinstance(items[-1], StepOutput):
                    try:
                        items.append(request.out.get_nowait())
                    except queue.Empty:
                        break
                request.read_at = time.monotonic()
                if steps := [item for item in items if isinstance(item, StepOutput)]:
                    yield steps
                if items[-1] is None:
                    return
                if isinstance(items[-1], BaseException):
                    raise items[-1]
        finally:  # finished, or the caller stopped early: its rows are freed before the next step
            request.cancelled = True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)
        self.session.release(self.bucket)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._pending and not self.active_rows:
                    self._cv.wait()
                if self._closed:
                    for request in {*self._pending, *self._active()}:
                        request.out.put(RuntimeError("the batcher was closed"))
                    return
                self._admit()
            self._free_cancelled()
            self._prefill_new()
            if not self.active_rows:
                continue
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - every active request gets the error, the loop goes on
                logger.exception("continuous batch step failed")
                for request in self._active():
                    request.out.put(exc)
                    self._free(request)

    def _admit(self) -> None:
        """Give free rows to waiting requests, first come first served (a request takes all its rows at once)."""
        free = [row for row, owner in enumerate(self.owner) if owner is None]
        while self._pending and (self._pending[0].cancelled or len(self._pending[0].prompts) <= len(free)):
            request = self._pending.popleft()
            if request.cancelled:
                continue
            request.rows, free = free[:len(request.prompts)], free[len(request.prompts):]
            for row in request.rows:
                self.owner[row] = request
                self.position[row] = 0  # older keys past the row's length are masked by seqlens_k

    def _free_cancelled(self) -> None:
        for request in [r for r in self._active() if r.cancelled]:
            self._free(request)

    def _free(self, request: _Request) -> None:
        for row in request.rows:
            if self.owner[row] is request:
                self.owner[row] = None
                self.position[row] = 0

    def _step(self) -> None:
        tokens = np.zeros(self.rows, np.int64)  # free rows decode a junk token at slot 0, unread
        at = np.zeros(self.rows, np.int64)  # the position each row writes this step
        advancing: set[_Request] = set()
        for request in self._active():
            rows = [(i, row) for i, row in enumerate(request.rows) if self.owner[row] is request]
            if self._reader_behind(request) and all(self.position[row] > 0 for _, row in rows):
                # its reader is behind: each row rewrites its last cache slot with the token already there
                # (the same keys and values), so it waits without growing the reader's queue
                for i, row in rows:
                    tokens[row], at[row] = request.previous[i], self.position[row] - 1
                continue
            for i, row in rows:
                fed, prompt = request.fed[i], request.prompts[i]
                tokens[row] = prompt[fed] if fed < len(prompt) else request.last[i]
                at[row] = self.position[row]
            advancing.add(request)
        if not advancing:  # every reader is behind: wait for one instead of spinning
            with self._cv:
                self._cv.wait(0.005)
            return
        top = self.rows - next(i for i, owner in enumerate(reversed(self.owner)) if owner is not None)
        bucket = self.prefixes[1 << (top - 1).bit_length()]
        n = bucket.batch
        session, inputs = self.session, bucket.sets[bucket.current]
        session.write(inputs["input_ids"], tokens[:n].reshape(n, 1))
        if "position_ids" in inputs:
            session.write(inputs["position_ids"], at[:n].reshape(n, 1))
        session.write(inputs["seqlens_k"], at[:n].astype(np.int32))  # tokens after this step, minus 1
        session.decode(bucket, None, int(at.max()) + 1)
        self.steps_run += 1
        self.rows_decoded += n
        for request in advancing:
            for i, row in enumerate(request.rows):
                if self.owner[row] is request:
                    self.position[row] += 1
                    request.previous[i] = int(tokens[row])
        greedy = session.read(bucket.next_token)
        logits: list[np.ndarray] = []  # read once, if a row samples

        def read_logits() -> np.ndarray:
            if not logits:
                logits.append(session.read(bucket.logits))
            return logits[0]

        for request in advancing:
            producing = []  # prompt indices whose row gives a new token this step
            for i, row in enumerate(request.rows):
                if request.reasons[i] is not None:
                    continue
                if request.fed[i] < len(request.prompts[i]):
                    request.fed[i] += 1
                    if request.fed[i] < len(request.prompts[i]):
                        continue  # still reading its prompt
                producing.append(i)
            if producing:
                self._produce(request, producing, greedy, read_logits)

    @staticmethod
    def _reader_behind(request: _Request) -> bool:
        """MAX_AHEAD steps wait for a reader that is late: it has not read for longer than its interval plus
        READ_SLACK_S (a reader on time sleeps through its interval while steps queue up)."""
        return (request.out.qsize() >= MAX_AHEAD
                and time.monotonic() - request.read_at > request.interval_s + READ_SLACK_S)

    def _prefill_new(self) -> None:
        """Prefill the prompts of admitted rows with nothing in the cache yet, one call per run of adjacent
        rows (see the module doc for which ones)."""
        if not self.prefill:
            return
        picked, decoding = [], 0
        for row, request in enumerate(self.owner):
            if request is not None:
                i = request.rows.index(row)
                if request.fed[i]:
                    decoding += 1
                elif len(request.prompts[i]) > 1:
                    picked.append((row, request, i))
        if not picked or sum(len(r.prompts[i]) - 1 for _, r, i in picked) < decoding:
            return
        runs: list[list] = []
        for entry in picked:
            if runs and runs[-1][-1][0] == entry[0] - 1 and runs[-1][-1][1].pad == entry[1].pad:
                runs[-1].append(entry)
            else:
                runs.append([entry])
        for first, run, filler in [call for run in runs for call in self._calls(run)]:
            if any(self.owner[row] is not request for row, request, _ in run):
                continue  # a request whose earlier call failed (and was freed); the rest waits for the next round
            pad = run[0][1].pad
            started = time.perf_counter()
            try:
                logits, greedy = self.session.prefill_rows(
                    self.bucket, first, [r.prompts[i] for _, r, i in run] + [[pad]] * filler, pad,
                    self.session.prefill_width(max(len(r.prompts[i]) for _, r, i in run), self.slots))
            except Exception as exc:  # noqa: BLE001 - the run's requests get the error, the others go on
                logger.exception("continuous batch prefill failed")
                for request in {r for _, r, _ in run}:
                    request.out.put(exc)
                    self._free(request)
                continue
            self.prefills_run += 1
            self.prefill_seconds += time.perf_counter() - started
            producing: dict[_Request, list[int]] = {}
            for row, request, i in run:
                request.fed[i] = len(request.prompts[i])
                request.previous[i] = request.prompts[i][-1]
                self.position[row] = request.fed[i]
                producing.setdefault(request, []).append(i)
            for request, indices in producing.items():
                self._produce(request, indices, greedy, lambda: logits, offset=first)

    def _calls(self, run: list) -> list[tuple[int, list, int]]:
        """(first row, entries, free filler rows) per prefill call for a run of adjacent rows. With shape buckets a
        call covers a power-of-two count of rows: the free rows after a run fill it up where there are enough
        (they get a junk token in slot 0, as free rows do in every step), otherwise the run is split."""
        if not self.session.shape_buckets:
            return [(run[0][0], run, 0)]
        first, count = run[0][0], len(run)
        end = first + (1 << (count - 1).bit_length())
        if end <= self.rows and all(self.owner[row] is None for row in range(first + count, end)):
            return [(first, run, end - first - count)]
        calls, at = [], 0
        while at < count:
            size = 1 << ((count - at).bit_length() - 1)
            calls.append((run[at][0], run[at:at + size], 0))
            at += size
        return calls

    def _warm_prefill_shapes(self) -> None:
        """Run every (rows, width) prefill shape once, before any request: on the CUDA EP ONNX Runtime spends
        a slow first run of each new input shape on the CUDA EP, which would otherwise stall every decoding
        row the first time an arrival has that shape. The junk goes into rows nobody holds yet."""
        started = time.perf_counter()
        widths = sorted({bucket_width(min(1 << e, self.slots - 1), self.slots) for e in range(self.slots.bit_length())})
        rows, shapes = 1, 0
        while rows <= self.rows:
            for width in widths:
                self.session.prefill_rows(self.bucket, 0, [[0]] * rows, 0, width)
                shapes += 1
            rows *= 2
        self.warmup_seconds = time.perf_counter() - started
        logger.info("continuous batcher: %d prefill shapes warmed in %.1f s", shapes, self.warmup_seconds)

    def _produce(self, request: _Request, producing: list[int], greedy: np.ndarray, read_logits,
                 offset: int = 0) -> None:
        """Pick the next token of each producing prompt (greedy[row - offset], or from its logits row),
        record it and queue the request's step; rows that finish are freed."""
        params = request.params
        at = [request.rows[i] - offset for i in producing]
        picked = greedy[at] if params.greedy else sample_next(read_logits()[at], params, request.rng)
        emitted: list[int | None] = [None] * len(request.prompts)
        for i, token in zip(producing, picked):
            token = int(token)
            emitted[i] = token
            request.last[i] = token
            request.generated[i] += 1
            row = request.rows[i]
            request.reasons[i] = request.finish.reason(token, request.generated[i], self.position[row] < self.slots)
            if request.reasons[i] is not None:  # a finished row is free from the next step on
                self.owner[row], self.position[row] = None, 0
        request.out.put(StepOutput(request.step, tuple(emitted), tuple(request.reasons)))
        request.step += 1
        if all(r is not None for r in request.reasons):
            request.out.put(None)
            self._free(request)
