"""Continuous batching (runtime/serving.py) on the CPU backend: every request's output equals
the same request run alone through `Generator`, however requests interleave; rows are freed
and reused; cancellation, a full queue, engine faults and shutdown each do one clear thing."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from netdef import NetworkOptions, build_network
from netdef.contract import LOGITS
from netdef.slots import call_end
from runtime.cpu import CpuBackend
from runtime.generate import GenerationError, Generator
from runtime.readout import ALL_LOGITS
from runtime.sampling import SamplingParams
from runtime.serving import Engine, EngineFault, EngineStopped, QueueFull
from runtime.tokenizer import Tokenizer
from tests.fixtures.serving import Recording
from tests.tools.cli import with_tokenizer
from weights import Checkpoint

PREFILL = 4


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def model(request, tiny_dir, tmp_path_factory):
    """(checkpoint, tokenizer) of a tiny model with a word-level tokenizer ("w5 w6 ...")."""
    folder = with_tokenizer(tiny_dir(request.param), tmp_path_factory.mktemp("m") / "model")
    return Checkpoint.open(folder), Tokenizer.from_dir(folder)


def cpu(model, batch: int, seq: int = 64) -> CpuBackend:
    options = NetworkOptions(dtype="float32", max_batch=batch, max_seq_len=seq, max_prefill=PREFILL)
    return CpuBackend(build_network(model[0], options))


def words(first: int, n: int) -> str:
    return " ".join(f"w{first + j}" for j in range(n))


def alone(model, prompt, params: SamplingParams):
    """(token ids, text, finish_reason) of the prompt run by itself, as a batch of one."""
    run = Generator(cpu(model, 1), model[1]).start([prompt], params)
    text = "".join(d.text for d in run)
    c = run.completions[0]
    return c.token_ids, text, c.finish_reason


def served(backend, model, prompts, params) -> tuple[Engine, list, list[str]]:
    """(engine, requests, their texts): every prompt submitted at once to an Engine over
    `backend`, each stream read to its end, then the engine shut down."""
    engine = Engine(backend, model[1])
    requests = [engine.submit(p, q) for p, q in zip(prompts, params)]
    texts = ["".join(r) for r in requests]
    engine.shutdown()
    return engine, requests, texts


def chunks(n: int, backend) -> int:
    """Prefill calls of an n-token prompt alone: max_prefill tokens, cut at ring ends."""
    start, count = 0, 0
    while start < n:
        start, count = call_end(start, n, backend.max_prefill, backend.rings), count + 1
    return count


def test_every_request_equals_itself_alone(model):
    """Six requests on three rows (three wait, then reuse freed rows), prompts of 1..12 tokens
    prefilled in chunks of 4 between decode steps, each with its own sampling: greedy, top-k
    (drawn in the engine, or on the host in a step with the others), top-p and plain sampling
    seeded, a repetition penalty, a stop string."""
    lengths = [3, 9, 1, 6, 12, 5]
    prompts = [words(5 + 7 * i, n) for i, n in enumerate(lengths)]
    params = [
        SamplingParams(max_new_tokens=10),
        SamplingParams(max_new_tokens=8, temperature=0.8, top_k=5, seed=1),
        SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=2),
        SamplingParams(max_new_tokens=7, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=9, temperature=0.7, seed=3),
        SamplingParams(max_new_tokens=6),
    ]
    # A stop string the last request meets: the text of its third token alone.
    ids, _, _ = alone(model, prompts[5], params[5])
    stop = model[1].decode(ids[2:3]).strip()
    params[5] = SamplingParams(max_new_tokens=6, stop=(stop,))
    expected = [alone(model, p, q) for p, q in zip(prompts, params)]
    assert expected[5][2] == "stop"

    backend = Recording(cpu(model, 3))
    engine, requests, texts = served(backend, model, prompts, params)
    for r, text, (ids, want_text, reason) in zip(requests, texts, expected):
        assert r.completion.token_ids == ids
        assert text == want_text == r.completion.text
        assert r.completion.finish_reason == reason
        assert r.completion.stats.completion_tokens == len(ids)
        assert r.row in (0, 1, 2)
    assert engine.active == 0 and engine.queue_depth == 0
    assert {r.row for r in requests} == {0, 1, 2}  # the later three reused freed rows
    # Prefill chunks run alone on their row; decode steps over the first rows; a decode
    # step never waits for more than one prefill chunk.
    prefills = [c for c in backend.calls if c[2] is not None]
    decodes = [c for c in backend.calls if c[2] is None]
    assert all(b == 1 and 1 <= s <= PREFILL for b, s, _ in prefills)
    assert sum(chunks(n, backend) for n in lengths) == len(prefills)
    assert all(s == 1 and 1 <= b <= 3 for b, s, _ in decodes)
    assert max(b for b, _, _ in decodes) == 3
    runs, between = [], 0
    for call in backend.calls:
        if call[2] is None:
            runs.append(between)
            between = 0
        else:
            between += 1
    assert max(runs[1:]) == 1


def test_requests_of_one_sampling_setting_are_drawn_together_each_as_alone(model, monkeypatch):
    """Three rows of one top-k/top-p setting with their own seeds, beside one of another
    temperature, all drawn on the host (a repetition penalty: runtime.readout): decode steps
    draw the three together (one whole-array call) and each request still equals itself
    alone."""
    import runtime.sampling

    rows_drawn = []
    draw_rows = runtime.sampling.sample_best_k

    def spy(values, *args):
        rows_drawn.append(len(values))
        return draw_rows(values, *args)

    prompts = [words(3 + 5 * i, n) for i, n in enumerate([4, 7, 2, 5])]
    setting = {"max_new_tokens": 9, "top_k": 8, "top_p": 0.9, "repetition_penalty": 1.1}
    params = [SamplingParams(temperature=0.9, seed=s, **setting) for s in (1, 2, 3)]
    params.append(SamplingParams(temperature=1.2, seed=1, **setting))
    expected = [alone(model, p, q) for p, q in zip(prompts, params)]
    assert len({tuple(ids) for ids, _, _ in expected}) == 4
    monkeypatch.setattr(runtime.sampling, "sample_best_k", spy)
    _, requests, texts = served(cpu(model, 4), model, prompts, params)
    for r, text, (ids, want_text, _) in zip(requests, texts, expected):
        assert r.completion.token_ids == ids
        assert text == want_text
    assert max(rows_drawn) == 3 and set(rows_drawn) <= {1, 2, 3}


def test_rows_drawn_in_the_engine_with_their_own_settings_chain_each_as_alone(model):
    """Three requests the engine draws for, each with its own temperature, top-k, top-p and
    seed, beside a greedy one: their decode steps run chained (the engine draws each row by
    its own uniform number and filters) and each request equals itself alone."""
    prompts = [words(3 + 5 * i, n) for i, n in enumerate([4, 7, 2, 5])]
    params = [
        SamplingParams(max_new_tokens=9, temperature=0.9, top_k=8, top_p=0.9, seed=1),
        SamplingParams(max_new_tokens=9, temperature=1.5, top_k=20, seed=2),
        SamplingParams(max_new_tokens=9),
        SamplingParams(max_new_tokens=9, temperature=0.6, top_k=64, top_p=0.5, seed=3),
    ]
    expected = [alone(model, p, q) for p, q in zip(prompts, params)]
    backend = Recording(cpu(model, 4))
    _, requests, texts = served(backend, model, prompts, params)
    for r, text, (ids, want_text, _) in zip(requests, texts, expected):
        assert (r.completion.token_ids, text) == (ids, want_text)
    assert all(r.readout.name == "argmax" for r in requests)
    assert len(backend.chained) >= 5


def test_top_p_rows_of_different_temperatures_share_the_best_k(model):
    """Llama 3's top-p alone at two temperatures in one decode step: each row's
    log-normalizer is computed at its own temperature (inv_temperature per row), so the step
    copies back the best K and log-normalizers, not the whole logits, and each request equals
    itself alone."""
    prompts = [words(4, 5), words(11, 3)]
    params = [
        SamplingParams(max_new_tokens=8, temperature=0.6, top_p=0.9, seed=1),
        SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.9, seed=2),
    ]
    expected = [alone(model, p, q) for p, q in zip(prompts, params)]
    backend = Recording(cpu(model, 2))
    readouts = []
    submit = backend.submit

    def noted(ids, positions, last, readout, draws=None):
        readouts.append(readout.name)
        submit(ids, positions, last, readout, draws)

    backend.submit = noted
    _, requests, texts = served(backend, model, prompts, params)
    for r, text, (ids, want_text, _) in zip(requests, texts, expected):
        assert (r.completion.token_ids, text) == (ids, want_text)
    assert set(readouts) == {"top_p"} and len(readouts) > 8


SAMPLED_ON_HOST = {"temperature": 0.9, "top_p": 0.9, "seed": 4}  # top-p alone: best K + lse
DRAWN_IN_ENGINE = {"temperature": 0.9, "top_k": 8, "seed": 4}


@pytest.mark.parametrize(
    "mode", [{}, DRAWN_IN_ENGINE, SAMPLED_ON_HOST], ids=["greedy", "drawn", "host-sampled"]
)
def test_decode_steps_run_one_ahead_of_streaming(model, mode):
    """A request alone: from its second decode step on, each step is submitted before the
    thread streams the tokens of the step before (one whose token the engine picks, greedy
    or drawn, fed it on the device; one sampled on the host the token drawn from it), no
    step follows the one that gives the last token, and the tokens are those it gets from
    `Generator`."""
    params = SamplingParams(max_new_tokens=6, **mode)
    backend = Recording(cpu(model, 2))
    calls_at_token = []  # calls submitted when each token is streamed

    def on_token(request, now):
        calls_at_token.append(len(backend.calls))

    engine = Engine(backend, model[1], on_token=on_token)
    request = engine.submit(words(5, 3), params)
    text = "".join(request)
    engine.shutdown()
    assert (request.completion.token_ids, text) == alone(model, words(5, 3), params)[:2]
    # the prefill, then five decode steps; token k + 1 comes from decode step k
    assert backend.calls == [(1, 3, 0), *[(1, 1, None)] * 5]
    assert backend.chained == ([] if mode is SAMPLED_ON_HOST else [2, 3, 4, 5])
    assert calls_at_token == [1, 3, 4, 5, 6, 6]


def test_greedy_rows_freed_and_reused_while_a_step_is_in_flight(model):
    """Five greedy requests on two rows, of different lengths, one ended by a stop string:
    rows finish while the next step is in flight and serve the next requests, each of
    which still gets its output alone."""
    params = [SamplingParams(max_new_tokens=k) for k in (9, 4, 7, 5, 8)]
    prompts = [words(5 + 9 * i, n) for i, n in enumerate((3, 6, 2, 5, 4))]
    ids, _, _ = alone(model, prompts[2], params[2])
    params[2] = SamplingParams(max_new_tokens=7, stop=(model[1].decode(ids[3:4]).strip(),))
    expected = [alone(model, p, q) for p, q in zip(prompts, params)]
    backend = Recording(cpu(model, 2))
    _, requests, texts = served(backend, model, prompts, params)
    for r, text, (ids, want_text, reason) in zip(requests, texts, expected):
        assert (r.completion.token_ids, text, r.completion.finish_reason) == (
            ids,
            want_text,
            reason,
        )
    assert expected[2][2] == "stop"
    # Some prefill came straight after a chained step: on a row its request left mid-flight.
    calls = backend.calls
    assert any(calls[i + 1][2] is not None for i in backend.chained if i + 1 < len(calls))


def test_decode_steps_run_few_row_counts(model):
    """Three streams on a backend of five rows: decode steps run rows 0..n-1 with n a power
    of two (1, 2, 4; never 3), at most max_batch (5, with five streams), and each request
    still gets its output alone; above 16 rows, n is a multiple of 16."""
    for count, sizes in ((3, {1, 2, 4}), (5, {1, 2, 4, 5})):
        prompts = [words(5 + 9 * i, 2 + i) for i in range(count)]
        params = [
            SamplingParams(max_new_tokens=6 + i, temperature=0.8, seed=i) for i in range(count)
        ]
        expected = [alone(model, p, q) for p, q in zip(prompts, params)]
        backend = Recording(cpu(model, 5))
        _, requests, texts = served(backend, model, prompts, params)
        assert [(r.completion.token_ids, t) for r, t in zip(requests, texts)] == [
            e[:2] for e in expected
        ]
        assert {b for b, s, row in backend.calls if row is None} == sizes
    # Beyond 16 rows, multiples of 16: 64 rows make 8 decode shapes.
    engine = SimpleNamespace(backend=SimpleNamespace(max_batch=64))
    rows = [Engine._rows(engine, [SimpleNamespace(row=k)]) for k in range(64)]
    assert sorted(set(rows)) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert [rows[k - 1] for k in (3, 9, 16, 17, 33, 49)] == [4, 16, 16, 32, 48, 64]


def test_async_streams_interleave(model):
    """Two `async for` consumers on one event loop get their own text, deltas in order."""
    prompts = [words(5, 6), words(40, 2)]
    params = SamplingParams(max_new_tokens=8)
    expected = [alone(model, p, params)[1] for p in prompts]
    engine = Engine(cpu(model, 2), model[1])

    async def consume(prompt):
        return "".join([text async for text in engine.submit(prompt, params)])

    async def both():
        return await asyncio.gather(*(consume(p) for p in prompts))

    assert asyncio.run(both()) == expected
    engine.shutdown()


def wait_until(predicate, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_cancel_frees_the_row_and_a_full_queue_refuses(model):
    engine = Engine(cpu(model, 1, seq=256), model[1], max_queue=1)
    long = SamplingParams(max_new_tokens=200)
    running = engine.submit(words(5, 3), long)
    wait_until(lambda: engine.active == 1)
    waiting = engine.submit(words(6, 3), long)
    with pytest.raises(QueueFull) as e:
        engine.submit(words(7, 3), long)
    assert str(e.value) == (
        "every sequence slot is taken and 1 requests already wait (the queue's bound is 1); "
        "retry later."
    )
    waiting.cancel()  # leaves the queue without running
    assert list(waiting) == [] and waiting.completion.finish_reason == "cancelled"
    assert waiting.completion.token_ids == [] and engine.queue_depth == 0
    it = iter(running)
    next(it)
    running.cancel()
    list(it)  # ends at once
    assert running.completion.finish_reason == "cancelled"
    assert 0 < len(running.completion.token_ids) < 200
    wait_until(lambda: engine.active == 0)
    # The freed row serves the next request as if nothing ran before.
    params = SamplingParams(max_new_tokens=5)
    after = engine.submit(words(9, 5), params)
    assert "".join(after) == alone(model, words(9, 5), params)[1]
    engine.shutdown()


def test_an_engine_fault_fails_only_the_requests_it_touched(model):
    """A call that raises fails the request being prefilled; the running stream and later
    requests go on unharmed."""
    backend = Recording(cpu(model, 2), poison=77)
    engine = Engine(backend, model[1])
    params = SamplingParams(max_new_tokens=12)
    good = engine.submit(words(5, 3), params)
    wait_until(lambda: good.first_token_at is not None)
    bad = engine.submit(words(75, 4), params)  # w77 is in its first prefill chunk
    with pytest.raises(EngineFault) as e:
        list(bad)
    assert str(e.value) == "the engine failed on this request: injected fault"
    assert bad.completion.finish_reason == "error"
    assert "".join(good) == alone(model, words(5, 3), params)[1]
    later = engine.submit(words(20, 3), params)
    assert "".join(later) == alone(model, words(20, 3), params)[1]
    engine.shutdown()
    assert engine.active == 0


def test_a_sampled_step_that_fails_to_go_out_fails_its_request(model):
    """A chained step sampled on the host fed a token the backend refuses: its request fails
    with the tokens streamed before (not the refused one), and the next request runs as
    alone."""
    params = SamplingParams(max_new_tokens=8, **SAMPLED_ON_HOST)
    prompt = words(5, 3)
    ids = alone(model, prompt, params)[0]
    fed = set(model[1].encode(prompt))  # token k is fed to decode step k + 1, chained for k > 0
    k = next(k for k in range(1, len(ids)) if ids[k] not in fed | set(ids[:k]))
    engine = Engine(Recording(cpu(model, 2), poison=ids[k]), model[1])
    bad = engine.submit(prompt, params)
    with pytest.raises(EngineFault) as e:
        list(bad)
    assert str(e.value) == "the engine failed on this request: injected fault"
    assert bad.completion.token_ids == ids[:k] and bad.completion.finish_reason == "error"
    later = engine.submit(words(20, 3), params)
    assert "".join(later) == alone(model, words(20, 3), params)[1]
    engine.shutdown()
    assert engine.active == 0


def test_shutdown_drains_then_cancels(model):
    """Both refusals say "the engine": they said "the server" to a library user, who runs none."""
    engine = Engine(cpu(model, 1, seq=256), model[1])
    params = SamplingParams(max_new_tokens=6)
    finishing = engine.submit(words(5, 3), params)
    engine.shutdown(timeout=None)  # waits for it
    assert finishing.completion.finish_reason == "length"
    assert "".join(finishing) == alone(model, words(5, 3), params)[1]
    with pytest.raises(EngineStopped) as e:
        engine.submit(words(5, 3), params)
    assert str(e.value) == "the engine is shutting down and takes no new requests."

    engine = Engine(cpu(model, 1, seq=256), model[1])
    running = engine.submit(words(5, 3), SamplingParams(max_new_tokens=240))
    queued = engine.submit(words(6, 3), params)
    t = threading.Thread(target=engine.shutdown, kwargs={"timeout": 0.2})
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert running.completion.finish_reason == "cancelled"
    assert queued.completion.finish_reason == "cancelled"
    assert engine.active == 0
    for request in (running, queued):  # a reader learns the text was cut short
        with pytest.raises(EngineStopped) as e:
            "".join(request)
        assert str(e.value) == (
            "the engine shut down before this request finished (after a drain of 0.2 s)."
        )


def test_a_request_read_again_ends_at_once(model):
    """A second `for` or `async for` over a finished request waited forever for events after
    its end; one that failed raises again."""
    engine = Engine(cpu(model, 1), model[1])
    params = SamplingParams(max_new_tokens=4)
    request = engine.submit(words(5, 3), params)
    assert "".join(request) == alone(model, words(5, 3), params)[1]
    result: list = []
    reader = threading.Thread(target=lambda: result.append(list(request)), daemon=True)
    reader.start()
    reader.join(10)
    assert result == [[]]

    async def read_twice():
        request = engine.submit(words(5, 3), params)
        first = [text async for text in request]
        return first, await asyncio.wait_for(anext(aiter(request), None), 10)

    first, again = asyncio.run(read_twice())
    assert "".join(first) == alone(model, words(5, 3), params)[1] and again is None
    cut = engine.submit(words(5, 3), SamplingParams(max_new_tokens=60))
    engine.shutdown(timeout=0)
    for _ in range(2):
        with pytest.raises(EngineStopped):
            list(cut)


def test_a_backend_serves_one_engine_and_no_run_beside_it(model):
    """A Generator's run, or a second Engine, on the backend an Engine serves reset and wrote
    its KV caches under the step thread: every output silently wrong."""
    backend, params = cpu(model, 2), SamplingParams(max_new_tokens=8)
    early = iter(Generator(backend, model[1]).start([words(9, 3)], params))  # not yet run
    engine = Engine(backend, model[1])
    request = engine.submit(words(5, 3), params)
    for make, who in (
        (lambda: Generator(backend, model[1]).start([words(9, 3)], params), "this Generator"),
        (lambda: next(early), "this Generator"),
        (lambda: Engine(backend, model[1]), "the new Engine"),
    ):
        with pytest.raises(GenerationError) as e:
            make()
        assert str(e.value) == (
            "this backend serves a runtime.serving.Engine until its shutdown() returns: "
            f"submit to that engine, or give {who} a backend of its own."
        )
    assert "".join(request) == alone(model, words(5, 3), params)[1]
    engine.shutdown()
    run = Generator(backend, model[1]).start([words(9, 3)], params)
    assert "".join(d.text for d in run) == alone(model, words(9, 3), params)[1]


@pytest.mark.parametrize("max_queue", ["5", -1, 2.0])
def test_a_max_queue_of_another_kind_is_refused_at_once(model, max_queue):
    """max_queue="5" made every submit a TypeError ('>=' not supported between...)."""
    with pytest.raises(ValueError) as e:
        Engine(cpu(model, 1), model[1], max_queue=max_queue)
    assert str(e.value) == (
        "max_queue is how many requests may wait beyond the free rows, an integer >= 0, not "
        f"{max_queue!r}."
    )


def test_params_that_are_not_sampling_params_are_refused(model):
    """A dict got AttributeError: 'dict' object has no attribute 'max_new_tokens'."""
    engine = Engine(cpu(model, 1, seq=16), model[1])
    with pytest.raises(GenerationError) as e:
        engine.submit("hi", {"max_new_tokens": 3})
    assert str(e.value) == (
        "params is a runtime.sampling.SamplingParams, not {'max_new_tokens': 3}."
    )
    assert engine.queue_depth == 0
    engine.shutdown()


def test_a_prompt_too_long_is_refused_before_it_queues(model):
    engine = Engine(cpu(model, 1, seq=16), model[1])
    with pytest.raises(GenerationError) as e:
        engine.submit(words(5, 12), SamplingParams(max_new_tokens=8))
    assert str(e.value) == (
        "the prompt has 12 tokens; with max_new_tokens=8 that exceeds the engine's max_seq_len=16. "
        "Shorten the prompt, lower max_new_tokens, use an engine with a larger max_seq_len "
        "(--max-seq-len, up to the model's context, 256), or allow truncation."
    )
    assert engine.queue_depth == 0
    engine.shutdown()


def test_a_call_on_one_row_leaves_the_others_alone(model):
    """CpuBackend.row(k): a prefill on row 2 gives the logits of the same prefill on a fresh
    batch of one, and rows 0 and 1 keep every byte."""
    backend = cpu(model, 3)
    backend.reset(3)
    rng = np.random.default_rng(0)
    for cache in backend.caches.values():
        cache[...] = rng.standard_normal(cache.shape)
    before = {n: c.copy() for n, c in backend.caches.items()}
    ids = np.array([[5, 9, 11, 40]], np.int32)
    pos = np.arange(4, dtype=np.int32)[None]
    with backend.row(2):
        logits = backend.forward(ids, pos, np.array([3], np.int32), ALL_LOGITS)[LOGITS]
    single = cpu(model, 1)
    single.reset(1)
    alone = single.forward(ids, pos, np.array([3], np.int32), ALL_LOGITS)[LOGITS]
    assert np.array_equal(logits, alone)
    for name, cache in backend.caches.items():
        assert np.array_equal(cache[:2], before[name][:2])
        assert np.array_equal(cache[2, :, :4], single.caches[name][0, :, :4])
    with pytest.raises(ValueError) as e, backend.row(3):
        pass
    assert str(e.value) == "cache row 3 is outside the caches' rows 0..2."


def test_a_fault_outside_a_backend_call_fails_the_running_requests_only(model):
    """An on_token hook that raises once: the requests then running fail with EngineFault,
    the step thread lives on and serves the next request."""
    raised = []

    def hook(request, now):
        if not raised:
            raised.append(request.id)
            raise RuntimeError("hook broke")

    engine = Engine(cpu(model, 2), model[1], on_token=hook)
    params = SamplingParams(max_new_tokens=4)
    first = engine.submit(words(5, 3), params)
    with pytest.raises(EngineFault) as e:
        list(first)
    assert str(e.value) == "the engine failed on this request: hook broke"
    after = engine.submit(words(9, 3), params)
    assert "".join(after) == alone(model, words(9, 3), params)[1]
    engine.shutdown()
    assert engine.active == 0


def test_a_queue_of_zero_admits_a_request_a_free_row_takes(model):
    """Each request passes the waiting queue until the engine's next turn; a bound of 0 made
    every one a QueueFull, even on an idle engine. Only requests beyond the free rows wait."""
    engine = Engine(cpu(model, 1, seq=256), model[1], max_queue=0)
    running = engine.submit(words(5, 3), SamplingParams(max_new_tokens=200))
    with pytest.raises(QueueFull) as e:  # the one row is promised to `running`
        engine.submit(words(6, 3), SamplingParams(max_new_tokens=5))
    assert str(e.value) == (
        "every sequence slot is taken and 0 requests already wait (the queue's bound is 0); "
        "retry later."
    )
    running.cancel()
    wait_until(lambda: engine.active == 0)
    params = SamplingParams(max_new_tokens=5)
    after = engine.submit(words(9, 5), params)  # a free row again
    assert "".join(after) == alone(model, words(9, 5), params)[1]
    engine.shutdown()
