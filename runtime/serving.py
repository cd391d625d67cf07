"""Continuous batching: many requests sharing one backend's max_batch KV-cache rows.

    engine = Engine(backend, tokenizer)                  # starts its step thread
    request = engine.submit("Hello", SamplingParams(max_new_tokens=32))
    async for text in request:                           # or `for text in request` in a thread
        print(text, end="")
    request.completion                                   # token ids, text, finish_reason, stats
    engine.shutdown(timeout=30)                          # drain, then stop the thread

One thread owns the backend. Each turn it
- admits waiting requests in FIFO order into free cache rows, the lowest first so that calls
  stay small (a full queue refuses new ones: `QueueFull`);
- runs one prefill chunk (at most max_prefill tokens, cut at KV ring ends as in
  `runtime.generate`) of the oldest admitted request, alone on its row (`Backend.row`): a
  running stream waits at most one chunk per token;
- runs one decode step over rows 0..n-1 (n: the highest decoding row + 1, rounded up to a
  power of two or a multiple of 16, so that few call shapes come up: `Engine._rows`).
  Decoding rows feed their last token at its position; the others feed a pad token at the
  slot they write next (a free row: slot 0), which is written again before anything reads
  it.

Decode steps run one ahead of the host's streaming. While the rows and their requests stay the
same and no prompt is being prefilled, the next step is submitted before the thread streams
the tokens of the step before: a step whose tokens the engine picks (greedy, or drawn in the
engine by each request's uniform numbers: `runtime.readout.engine_draws`) fed that step's
next_token on the device (`Backend.submit` with input_ids None) before the thread even
collects it, a step sampled on the host fed the tokens just drawn from it. The GPU then
runs while the thread detokenizes, streams and takes its next turn. Rows that finish
meanwhile run one more step whose tokens are dropped (no step follows one that ends every
request at max_new_tokens); anything else (a prefill, a row set that changed) first
collects the step in flight.

Why prefill alone and decode batched: a prefill chunk inside a mixed [B, S] call would make
every row compute S tokens; alone it costs only its own. The decode call keeps the engine's
usual shape (the caches' first n rows), so the TensorRT backend's CUDA graphs still apply.
A request that finishes, is cancelled or fails frees its row for the next waiting one at the
next turn; rows are never cleared (stale slots are never read, docs/architecture.md).

Each request samples with its own parameters and random generator, seeded as a batch of one
in `runtime.generate`, and its prefill chunks are the ones it gets alone: its output is the
output it gets alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from itertools import count

import numpy as np

from netdef.contract import LOG_NORMALIZER, NEXT_TOKEN
from netdef.slots import call_end
from weights.config import is_int

from .backend import Backend
from .generate import (
    HOLDERS,
    Completion,
    Generator,
    Prompt,
    TextStream,
    check_not_served,
    check_params,
)
from .readout import (
    ALL_LOGITS,
    ARGMAX,
    TOP_K,
    TOP_P,
    Draws,
    Outputs,
    Readout,
    draws_for,
    next_tokens_from,
    readout_for,
)
from .sampling import SamplingParams
from .tokenizer import Tokenizer

_END = object()  # the last event of a request
ROW_STEP = 16  # decode steps run a power of two of rows up to this, a multiple of it above


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is at its bound: try again later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class EngineFault(RuntimeError):
    """The backend failed during a call this request was part of."""


class Request:
    """One submitted prompt: iterate it (in a thread or with `async for`) for its text deltas;
    `completion` fills in as it goes. `cancel()` ends it and frees its row."""

    def __init__(self, engine: Engine, rid: int, prompt_ids: list[int], params: SamplingParams):
        self.engine, self.id, self.params = engine, rid, params
        self.completion = Completion(prompt_ids=prompt_ids)
        self.completion.stats.prompt_tokens = len(prompt_ids)
        self.text = TextStream(engine.gen, self.completion, params.stop)
        backend = engine.backend
        self.readout = readout_for(params, backend.sample_top_k, backend.has_log_normalizer)
        self.rng = np.random.default_rng(params.seed)
        self.row: int | None = None
        self.prefilled = 0  # prompt tokens in the cache
        self.next_token = 0  # the token the next decode step feeds
        self.cancelled = False
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._events: deque = deque()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.completion.prompt_ids

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids)

    @property
    def next_slot(self) -> int:
        """The cache slot the next call of this request writes."""
        if not self.decoding:
            return self.prefilled
        return len(self.prompt_ids) + len(self.completion.token_ids) - 1

    @property
    def done(self) -> bool:
        return self.completion.finish_reason is not None

    @property
    def last_in_flight(self) -> bool:
        """Whether the decode step in flight gives this request's last token (at
        max_new_tokens): no step need follow it."""
        return len(self.completion.token_ids) + 1 == self.params.max_new_tokens

    def cancel(self) -> None:
        """Stop generating: a waiting request leaves the queue, a running one frees its row
        at the engine's next turn. Nothing happens to a finished request."""
        self.engine._cancel(self)

    def _put(self, item: object) -> None:
        with self._cond:
            self._events.append(item)
            self._cond.notify_all()
            loop, wake = self._loop, self._wake
        if loop is not None:
            loop.call_soon_threadsafe(wake.set)

    def _take(self) -> object:
        """The next event (under `_cond`, with one there). The last one, the end or an error,
        stays: a request read again ends or raises at once, as a finished `Run` does,
        rather than wait for an event that never comes."""
        item = self._events[0]
        if item is not _END and not isinstance(item, BaseException):
            self._events.popleft()
        return item

    def _item(self, item: object) -> str | None:
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[str]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._events)
                item = self._take()
            if (text := self._item(item)) is None:
                return
            yield text

    async def __aiter__(self) -> AsyncIterator[str]:
        with self._cond:
            self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._cond:
                item = self._take() if self._events else None
                if item is None:
                    self._wake.clear()
            if item is None:
                await self._wake.wait()
                continue
            if (text := self._item(item)) is None:
                return
            yield text


Step = tuple[list[Request], int, Readout]  # a decode call: its requests, its rows n, its readout


class Engine:
    """The scheduler over `backend` (any `runtime.backend.Backend`); see the module docstring.

    `on_token(request, now)` is called from the step thread for each token accepted, before
    `request.first_token_at` and `last_token_at` count it (metrics: the time to the first
    token is `now - request.submitted`, the gap after it `now - request.last_token_at`)."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        max_queue: int = 256,
        on_token: Callable[[Request, float], None] | None = None,
    ):
        if not is_int(max_queue) or max_queue < 0:  # else a TypeError at each submit
            raise ValueError(
                "max_queue is how many requests may wait beyond the free rows, an integer "
                f">= 0, not {max_queue!r}."
            )
        self.backend, self.gen = backend, Generator(backend, tokenizer)
        check_not_served(backend, "the new Engine")
        HOLDERS[backend] = weakref.ref(self)  # a run on it is refused until shutdown
        self.max_queue, self.on_token = max_queue, on_token
        self.pad = tokenizer.pad_id or 0
        self.rows: list[Request | None] = [None] * backend.max_batch
        self.waiting: deque[Request] = deque()
        self.accepting, self._stop = True, False
        self._cond = threading.Condition()
        self._ids = count()
        self._ahead: Step | None = None  # the decode step submitted and not yet collected
        backend.reset(backend.max_batch)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # ---- the caller's side (any thread) ----

    def submit(
        self, prompt: Prompt, params: SamplingParams, chat: bool = False, truncate: bool = False
    ) -> Request:
        """Tokenize and check the prompt (GenerationError), then queue it (QueueFull,
        EngineStopped)."""
        check_params(params)
        ids = self.gen.prompt_ids(prompt, params, chat, truncate)
        with self._cond:
            if not self.accepting:
                raise EngineStopped("the engine is shutting down and takes no new requests.")
            # Free rows take waiting requests at the next turn: only those beyond them wait.
            beyond = len(self.waiting) - sum(row is None for row in self.rows)
            if beyond >= self.max_queue:
                raise QueueFull(
                    f"every sequence slot is taken and {beyond} requests already wait (the "
                    f"queue's bound is {self.max_queue}); retry later."
                )
            request = Request(self, next(self._ids), ids, params)
            self.waiting.append(request)
            self._cond.notify_all()
        return request

    @property
    def running(self) -> bool:
        """Whether the step thread still drives the backend (until `shutdown` returns)."""
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        """Requests holding a cache row."""
        return sum(r is not None for r in self.rows)

    def shutdown(self, timeout: float | None = None) -> None:
        """Take no new requests; let the admitted and waiting ones finish for up to `timeout`
        seconds (None: no limit), cancel what is left (reading it raises EngineStopped), then
        stop the step thread. Calling it again waits for nothing."""
        with self._cond:
            self.accepting = False
            self._cond.wait_for(lambda: not self.waiting and not any(self.rows), timeout)
            for request in [*self.waiting, *(r for r in self.rows if r)]:
                if not request.done:  # its reader is told, not left with a text cut short
                    request.error = EngineStopped(
                        f"the engine shut down before this request finished (after a drain "
                        f"of {timeout} s)."
                    )
                self._cancel_locked(request)
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _cancel(self, request: Request) -> None:
        with self._cond:
            self._cancel_locked(request)

    def _cancel_locked(self, request: Request) -> None:
        if request.done:
            return
        request.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)
            self._finish(request, "cancelled")
        self._cond.notify_all()

    # ---- the step thread ----

    def _loop(self) -> None:
        while True:
            with self._cond:
                for request in self.rows:
                    if request is not None and request.cancelled:
                        self._finish(request, "cancelled")
                self._cond.wait_for(lambda: self._stop or self.waiting or any(self.rows))
                if self._stop and not any(self.rows):
                    break
                self._admit()
            try:
                self._turn()
            except Exception as e:  # a fault outside a backend call: fail what runs, go on
                self._fail([r for r in self.rows if r], e)
        self._land()  # the step in flight of requests that all finished

    def _turn(self) -> None:
        """One prefill chunk of the oldest admitted request, then one decode step."""
        admitted = sorted((r for r in self.rows if r and not r.decoding), key=lambda r: r.id)
        if admitted:
            self._land()  # a call on one row needs none in flight
            self._prefill(admitted[0])
        decoding = [r for r in self.rows if r and r.decoding and not r.done]
        if decoding:
            self._decode(decoding)
        else:
            self._land()

    def _admit(self) -> None:
        for k, request in enumerate(self.rows):
            if request is None and self.waiting:
                self.rows[k] = admitted = self.waiting.popleft()
                admitted.row = k

    def _prefill(self, r: Request) -> None:
        """One chunk of r's prompt, alone on its row; its first token after the last one."""
        start = r.prefilled
        end = call_end(start, len(r.prompt_ids), self.backend.max_prefill, self.backend.rings)
        ids = np.array([r.prompt_ids[start:end]], np.int32)
        positions = np.arange(start, end, dtype=np.int32)[None]
        last = np.array([end - start - 1], np.int32)
        try:
            ends = end == len(r.prompt_ids)  # this call gives r's first token
            draws = self._draws(1, [r], in_engine=ends, row_of=lambda _: 0)
            with self.backend.row(r.row):
                out = self.backend.forward(ids, positions, last, r.readout, draws)
            r.prefilled = end
            if r.decoding and r.readout == ARGMAX:
                token = int(out[NEXT_TOKEN][0])
            elif r.decoding:
                token = self._sample([r], out, [0], self._whole_logits())[0]
        except Exception as e:
            self._fail([r], e)
            return
        if r.decoding:
            r.completion.stats.prefill_ms = (time.perf_counter() - r.submitted) * 1000
            self._accept(r, token)

    def _decode(self, decoding: list[Request]) -> None:
        """One decode step over rows 0..n-1 (the module docstring says what each row feeds)."""
        step = self._step(decoding)
        if self._ahead == step and not all(r.last_in_flight for r in decoding):
            self._chain(step)
            return
        self._land()
        if not (decoding := [r for r in decoding if not r.done]):
            return
        step = decoding, n, readout = self._step(decoding)
        ids = self._feed(n, [(r, r.next_token) for r in decoding])
        draws = self._draws(n, decoding, in_engine=readout == ARGMAX)
        try:  # collected by the next turn's step (or `_land`)
            self.backend.submit(ids, self._positions(n, 0), np.zeros(n, np.int32), readout, draws)
        except Exception as e:
            self._fail(decoding, e)
            return
        self._ahead = step

    def _step(self, decoding: list[Request]) -> Step:
        """The decode call of `decoding`: its requests, its rows n and its readout."""
        return decoding, self._rows(decoding), decode_readout(decoding)

    def _draws(
        self,
        n: int,
        requests: list[Request],
        in_engine: bool,
        row_of: Callable[[Request], int] = lambda r: r.row,
    ) -> Draws:
        """A call of n rows' draws (runtime.readout.sampling_feeds): each request's sampling
        on its row; where the call gives it a token the engine draws (`in_engine`, and its
        readout ARGMAX), the next uniform number of its own generator, as `_sample` takes one
        per token."""
        draws: list = [None] * n
        for r in requests:
            u = (
                r.rng.random()
                if in_engine and r.readout == ARGMAX and not r.params.greedy
                else None
            )
            draws[row_of(r)] = draws_for(r.params, u)
        return draws

    def _feed(self, n: int, tokens: list[tuple[Request, int]]) -> np.ndarray:
        """int32 [n, 1] input ids: each request's token on its row, a pad token elsewhere."""
        ids = np.full((n, 1), self.pad, np.int32)
        for r, token in tokens:
            ids[r.row] = token
        return ids

    def _rows(self, decoding: list[Request]) -> int:
        """The rows 0..n-1 a decode step runs: up to the highest decoding row, rounded up to
        a power of two up to 16 and to a multiple of 16 above (at most max_batch). Each new
        call shape costs the engine once: TensorRT-RTX compiles kernels specialized for it
        and the backend captures its CUDA graph. The H200 serve benches point at a ~75-110
        ms step each (inferred, not yet measured per shape: `tools.bench --new-shapes`):
        the p99 inter-token latency was such a step once more than one stream ran (7 ms
        alone), and the p99 time to first token grew with the rows that came into use (184
        ms at 4 streams, 1 s at 16, 4.3 s at 64; docs/benchmarks.md). 64 rows now make 8
        decode shapes, not 64; the extra rows cost little where rows are cheap (a batch-4
        step took less than a batch-1 step, 2.18 against 2.29 ms) and at most 15 above 16."""
        n = max(r.row for r in decoding) + 1
        n = 1 << (n - 1).bit_length() if n <= ROW_STEP else -(-n // ROW_STEP) * ROW_STEP
        return min(n, self.backend.max_batch)

    def _positions(self, n: int, ahead: int) -> np.ndarray:
        """int32 [n, 1]: the slot each of rows 0..n-1 writes next, `ahead` steps on for the
        decoding rows (a free row: slot 0)."""
        positions = np.zeros((n, 1), np.int32)
        for k, r in enumerate(self.rows[:n]):
            if r is not None:
                positions[k] = r.next_slot + (ahead if r.decoding else 0)
        return positions

    def _chain(self, step: Step) -> None:
        """The next step of the step in flight's rows, submitted before the thread streams
        that step's tokens: one whose tokens the engine picks (greedy or drawn in it) fed
        them on the device, another the tokens drawn on the host (collected first)."""
        requests, n, readout = step
        ids, drawn, draws = None, [], self._draws(n, requests, in_engine=readout == ARGMAX)
        if readout != ARGMAX:
            self._ahead = None
            if not (drawn := self._collect(step)):
                return  # it failed
            ids = self._feed(n, drawn)
        try:
            self.backend.submit(ids, self._positions(n, 1), np.zeros(n, np.int32), readout, draws)
        except Exception as e:
            self._fail(requests, e)
            self._land()
            return
        if ids is None:
            drawn = self._collect(step)
        self._ahead = step
        self._accept_all(drawn)

    def _land(self) -> None:
        """Collect the step in flight, if any, and accept its tokens."""
        if self._ahead is not None:
            step, self._ahead = self._ahead, None
            self._accept_all(self._collect(step))

    def _collect(self, step: Step) -> list[tuple[Request, int]]:
        """The oldest step in flight's tokens, for its requests still on their rows (none if
        it failed: they fail)."""
        requests, _, readout = step
        live = [r for r in requests if not r.done and self.rows[r.row] is r]
        try:
            out = self.backend.collect()
            if readout == ARGMAX:
                tokens = [int(out[NEXT_TOKEN][r.row]) for r in live]
            else:
                tokens = self._sample(live, out, [r.row for r in live], self._whole_logits())
        except Exception as e:
            self._fail(live, e)
            return []
        return list(zip(live, tokens))

    def _whole_logits(self) -> Callable[[], np.ndarray]:
        """The latest call's logits, copied from the backend at most once."""
        kept: list[np.ndarray] = []
        return lambda: kept[0] if kept else kept.append(self.backend.last_logits()) or kept[0]

    def _sample(self, requests: list[Request], out: Outputs, rows: list[int], whole) -> list[int]:
        """Each request's next token from its row of a call's outputs. The requests of one
        sampling setting are drawn together (whole-array operations, runtime.sampling),
        each by a uniform number from its own generator. A log-normalizer belongs to the
        call's top-p requests; the others sample from their best K alone."""
        tokens = [0] * len(requests)
        settings: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            p = r.params
            key = (p.temperature, p.top_k, p.top_p, p.repetition_penalty, r.readout)
            settings.setdefault(key, []).append(i)
        for members in settings.values():
            first, take = requests[members[0]], [rows[i] for i in members]
            own = {
                name: o[take]
                for name, o in out.items()
                if name != LOG_NORMALIZER or name in first.readout.outputs
            }
            params, group = first.params, [requests[i] for i in members]
            u = None if params.greedy else np.array([r.rng.random() for r in group])
            seen = []  # what a repetition penalty reads: the whole sequence so far
            if params.repetition_penalty != 1.0:
                seen = [np.array(r.prompt_ids + r.completion.token_ids) for r in group]
            drawn = next_tokens_from(own, params, u, seen, lambda take=take: whole()[take])
            for i, token in zip(members, drawn.tolist()):
                tokens[i] = token
        return tokens

    def _accept_all(self, drawn: list[tuple[Request, int]]) -> None:
        for r, token in drawn:
            self._accept(r, token)

    def _accept(self, r: Request, token: int) -> None:
        now = time.perf_counter()
        if self.on_token is not None:
            self.on_token(r, now)
        if r.first_token_at is None:
            r.first_token_at = now
        r.last_token_at = now
        if text := r.text.accept(token):
            r._put(text)
        r.next_token = token
        at_length = len(r.completion.token_ids) == r.params.max_new_tokens
        if not r.done and at_length and (tail := r.text.finish("length")):
            r._put(tail)
        if r.done:
            with self._cond:
                self._finish(r)

    def _finish(self, r: Request, reason: str | None = None) -> None:
        """End r (with `reason` unless it has one) and free its row; under the lock."""
        c = r.completion
        if reason is not None and c.finish_reason is None:
            c.finish_reason = reason
        c.stats.completion_tokens = len(c.token_ids)
        if r.first_token_at is not None:
            c.stats.decode_ms = (r.last_token_at - r.first_token_at) * 1000
        if r.row is not None and self.rows[r.row] is r:
            self.rows[r.row] = None
        r._put(r.error if r.error is not None else _END)
        self._cond.notify_all()

    def _fail(self, requests: list[Request], error: Exception) -> None:
        """A backend call failed: it fails the requests it touched, not the engine."""
        with self._cond:
            for r in requests:
                r.error = EngineFault(f"the engine failed on this request: {error}")
                self._finish(r, "error")


def decode_readout(requests: list[Request]) -> Readout:
    """One call's readout for every request in it: the least that decides each (their own
    readouts, runtime.readout; each row's log-normalizer at its own temperature)."""
    readouts = {r.readout for r in requests}
    if readouts == {ARGMAX}:
        return ARGMAX
    if readouts <= {ARGMAX, TOP_K}:
        return TOP_K
    if readouts <= {ARGMAX, TOP_K, TOP_P}:
        return TOP_P
    return ALL_LOGITS
