"""`python -m tools.serve` against live servers on loopback ports, through the official openai
client (reference backend): outputs equal tools.generate's, a 32-stream load test where each
response equals the same request alone, errors, the body limit (413), disconnects, 429, SIGTERM
and engine faults."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.tools.cli import (
    SEQ,
    LiveServer,
    free_port,
    generate_text,
    get,
    health,
    metric,
    post,
    wait_for,
    with_tokenizer,
)


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory) -> Path:
    return with_tokenizer(tiny_dir("llama"), tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(tiny):
    s = LiveServer(tiny, "--dtype", "float32", "--max-seq-len", str(SEQ), "--max-batch", "4")
    yield s
    assert s.stop() == 0


def test_completions_equal_tools_generate_streamed_or_not(server, tiny, capsys):
    prompt = "w5 w9 w17 w3 w40 w41"
    expected = generate_text(tiny, prompt, 12, capsys)
    done = server.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0
    )
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (6, 12)
    chunks = list(
        server.client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 18
    # A stop string ends the text before it.
    stop = expected.split()[3]
    cut = server.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == expected[: expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert [m.id for m in server.client.models.list().data] == ["tiny"]


def test_errors_are_openai_error_bodies(server):
    c = server.client
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="w5")
    assert e.value.body["message"] == "the model 'gpt-4' does not exist; this server serves 'tiny'."
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=" ".join(["w5"] * 250), max_tokens=10)
    assert e.value.body["message"] == (
        "the prompt has 250 tokens and max_tokens is 10, more than this engine's context of "
        "max_seq_len=256 tokens; shorten the prompt or lower max_tokens."
    )
    assert e.value.body["code"] == "context_length_exceeded"
    cases = [
        ({"n": 2}, "'n' is not supported: this server does not do n > 1 (one choice per request)."),
        ({"logprobs": 2}, "'logprobs' is not supported: this server does not do logprobs."),
        ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]."),
        # 0 is a value, not the default: it was served as 1 (the whole vocabulary).
        ({"top_p": 0}, "top_p=0.0 must be in (0, 1]."),
        ({"repetition_penalty": 0}, "repetition_penalty=0.0 must be > 0."),
        ({"temperature": -1}, "temperature=-1.0 must be >= 0 (0 is greedy)."),
        ({"max_tokens": 0}, "max_tokens=0 must be at least 1."),
        ({"top_k": "five"}, "'top_k' must be an integer, not \"five\"."),
        (
            {"frequency_penalty": 0.5},
            "'frequency_penalty' is not supported: this server does not do frequency or "
            "presence penalties (repetition_penalty is supported).",
        ),
        # logprobs 0 asks for the chosen tokens' logprobs; it was answered with none
        ({"logprobs": 0}, "'logprobs' is not supported: this server does not do logprobs."),
        ({"n": 0}, "'n' must be at least 1, not 0."),  # both said "does not do n > 1"
        ({"n": "2"}, "'n' must be an integer, not \"2\"."),
        ({"user": 123}, "'user' must be a string, not 123."),
        (
            {"stream_options": {"include_usage": True}},
            "'stream_options' is only allowed when 'stream' is true.",
        ),
        (
            {"stream": True, "stream_options": {"include_usage": "no"}},  # it was taken as true
            "'include_usage' must be true or false, not \"no\".",
        ),
        ({"frequenzy_penalty": 0}, "unrecognized request argument(s): frequenzy_penalty."),
    ]
    for fields, message in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="w5", extra_body=fields)
        assert e.value.body["message"] == message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "w5"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert (
        e.value.body["message"] == "'tools' is not supported: this server does not do tool calls."
    )
    # What OpenAI clients send with the features off is served: they were refused as unknown.
    off = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "user": "u1"}
    done = c.completions.create(model="tiny", prompt="w5", max_tokens=2, extra_body=off)
    assert done.usage.completion_tokens == 2
    status, body = post(
        server.port,
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "w5 " * 256}).encode(),
    )  # max_tokens not sent: the message said "max_tokens is 1"
    assert (status, body["error"]["message"]) == (
        400,
        "the prompt has 256 tokens, which leave no room for a completion in this engine's "
        "context of max_seq_len=256 tokens; shorten the prompt.",
    )
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "w5"}], top_p=0
        )
    assert e.value.body["message"] == "top_p=0.0 must be in (0, 1]."
    # Token ids outside the vocabulary: the engine's gather failed on them, a 500.
    for ids, bad in [([99999], [99999]), ([512, 5, -1, 512], [-1, 512])]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt=ids)
        assert e.value.body == {
            "message": f"token ids {bad} in the prompt are outside the vocabulary [0, 512).",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": "invalid_value",
        }
    nulls = b'{"model": "tiny", "prompt": [511], "max_tokens": 1, "top_p": null, '
    status, body = post(server.port, "/v1/completions", nulls + b'"repetition_penalty": null}')
    assert (status, body["usage"]["total_tokens"]) == (200, 2)  # null is the default
    with pytest.raises(openai.BadRequestError) as e:  # the tiny model has no chat template
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}])
    assert e.value.body["message"] == (  # the model's folder on the server is not named
        "The model in 'tiny' has no chat template; send plain text prompts, or add a "
        "chat_template to its tokenizer_config.json."
    )
    status, body = post(server.port, "/v1/completions", b'{"model": "tiny", "prompt": ')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert body["error"]["message"].startswith("the request body is not valid JSON: ")
    status, body = post(server.port, "/v1/completions", b"[1, 2]")
    assert (status, body["error"]["message"]) == (400, "the request body must be a JSON object.")
    assert health(server.port)["active"] == 0


def test_every_route_answers_openai_json(server):
    """client.models.retrieve got a 404 "Not Found" in plain text, as did any other path; a
    wrong method got a plain 405, a trailing slash a 307 redirect."""
    assert server.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        server.client.models.retrieve("gpt-4")
    assert e.value.body["message"] == "the model 'gpt-4' does not exist; this server serves 'tiny'."
    for method, path, status in [
        ("POST", "/v1/embeddings", 404),
        ("POST", "/v1/completions/", 404),
        ("GET", "/v1/chat/completions", 405),
    ]:
        req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert (e.value.code, json.loads(e.value.read())["error"]["message"]) == (
            status,
            f"{method} {path} is not an endpoint of this server; it serves POST /v1/completions, "
            "POST /v1/chat/completions and GET /v1/models.",
        )


def test_prompts_are_tokenized_off_the_event_loop(tiny):
    """A 26 MB prompt was tokenized on the event loop: every other stream and /health waited
    42 s for it in the audit (Gemma-3's tokenizer)."""
    from starlette.testclient import TestClient

    from tools.serve import parse_args

    server = parse_args([str(tiny), "--backend", "reference", "--max-seq-len", str(SEQ)])[
        1
    ].server()
    encode, on_loop = server.engine.gen.encode, []

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no event loop in this thread
            on_loop.append(False)
        return encode(*args, **kwargs)

    server.engine.gen.encode = recording
    with TestClient(server.app) as client:
        answer = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "w5 w6", "max_tokens": 2}
        )
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    assert on_loop and not any(on_loop)  # each call in a worker thread


def test_32_concurrent_streams_each_equal_the_request_alone(server):
    """Greedy and seeded sampled streams, 32 at once over 4 rows: every text equals the same
    request sent alone afterwards; /health answers throughout; no row is left taken."""
    requests = [
        dict(
            prompt=" ".join(f"w{5 + (7 * i + j) % 500}" for j in range(1 + i % 9)),
            max_tokens=4 + i % 5,
            temperature=0 if i % 2 else 0.9,
            seed=i,
            top_k=0 if i % 3 else 20,
        )
        for i in range(32)
    ]

    async def one(client, r):
        extra = {"top_k": r["top_k"]}
        fields = {k: v for k, v in r.items() if k != "top_k"}
        stream = await client.completions.create(
            model="tiny", stream=True, extra_body=extra, **fields
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    healthy, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            healthy.append(get(server.port, "/health")[0] == 200)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()

    async def load():
        client = openai.AsyncOpenAI(base_url=server.client.base_url, api_key="-", max_retries=0)
        together = await asyncio.wait_for(asyncio.gather(*(one(client, r) for r in requests)), 120)
        stop.set()
        return together, [await one(client, r) for r in requests]

    try:
        together, alone = asyncio.run(load())
    finally:
        stop.set()
        poller.join()
    assert together == alone
    assert all(healthy) and len(healthy) >= 2
    h = health(server.port)
    assert (h["active"], h["waiting"]) == (0, 0)


def test_a_client_that_disconnects_frees_its_row(server):
    before = metric(server.port, "trtnetdef_disconnects_total")
    finished = metric(server.port, "trtnetdef_completion_tokens_total")
    stream = server.client.completions.create(
        model="tiny", prompt="w5 w6", max_tokens=240, temperature=0, stream=True
    )
    next(iter(stream))
    wait_for(lambda: health(server.port)["active"] == 1, 10)
    stream.close()
    wait_for(lambda: health(server.port)["active"] == 0, 10)
    # A non-streaming request whose client gives up.
    impatient = server.client.with_options(timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="tiny", prompt="w7 w8", max_tokens=240, temperature=0)
    wait_for(lambda: health(server.port)["active"] == 0, 10)
    assert metric(server.port, "trtnetdef_disconnects_total") == before + 2
    # Both stopped early: together they generated fewer tokens than one would have.
    assert metric(server.port, "trtnetdef_completion_tokens_total") - finished < 240
    assert (
        metric(server.port, 'trtnetdef_requests_total{endpoint="/v1/completions",status="499"}')
        == 1
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch", "0"], "--max-batch must be at least 1."),
        (["--max-queue", "-1"], "--max-queue must be at least 0."),
        (["--drain-timeout", "-5"], "--drain-timeout must be at least 0."),
        (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1."),
        (["--port", "70000"], "--port 70000 is not a TCP port; choose one in 1..65535."),
    ],
)
def test_bad_arguments_are_refused_before_serving(args, message, tiny, capsys):
    """Each was taken before: --max-batch 0 served as the default batch, --port 70000
    announced a URL no client can reach and served on."""
    from tools.serve import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args([str(tiny), "--backend", "reference", *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m tools.serve: error: {message}"
    )


def test_a_port_in_use_or_a_foreign_host_is_one_error_before_loading(tiny, capsys):
    """Was: "Serving ..." printed, then uvicorn's own log line and exit 3 after the load."""
    from tools.serve import main

    args = [str(tiny), "--backend", "reference"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([*args, "--port", str(port)]) == 1
    assert capsys.readouterr().err == (
        f"error: port {port} on 127.0.0.1 is already in use; stop what listens there or "
        "choose another --port.\n"
    )
    assert main([*args, "--host", "192.0.2.1"]) == 1  # TEST-NET-1: no address of this machine
    assert capsys.readouterr().err == (
        "error: cannot listen on 192.0.2.1:8000 (Cannot assign requested address); --host must "
        "be an address of this machine (127.0.0.1, or 0.0.0.0 for all of them) and --port one "
        "you may use.\n"
    )


def test_a_body_over_max_body_bytes_is_refused_before_it_is_read(tiny):
    """A body of any size was read and parsed whole. Over --max-body-bytes it is a 413: by its
    Content-Length before any of it arrives, or sent chunked, once what came exceeds it."""
    server = LiveServer(tiny, "--max-seq-len", str(SEQ), "--max-body-bytes", "1024")
    try:
        error = {
            "message": "the request body is larger than this server's limit of 1024 bytes.",
            "type": "invalid_request_error",
            "param": None,
            "code": "body_too_large",
        }
        fits = json.dumps({"model": "tiny", "prompt": "w5", "max_tokens": 1}).encode()
        fits += b" " * (1024 - len(fits))  # JSON may end in whitespace
        assert post(server.port, "/v1/completions", fits)[0] == 200
        assert post(server.port, "/v1/completions", fits + b" ") == (413, {"error": error})
        with pytest.raises(openai.APIStatusError) as e:
            server.client.completions.create(model="tiny", prompt="w5 " * 400)
        assert (e.value.status_code, e.value.body) == (413, error)
        # The headers alone: answered without waiting for the body.
        assert raw_post(server.port, b"Content-Length: 100000000\r\n", b"") == (
            413,
            {"error": error},
        )
        chunked = b"Transfer-Encoding: chunked\r\n"
        whole = chunk(fits[:500]) + chunk(fits[500:]) + chunk(b"")
        assert raw_post(server.port, chunked, whole)[0] == 200
        # Over the limit and not yet ended: answered without waiting for the rest.
        assert raw_post(server.port, chunked, chunk(fits) + chunk(b" ")) == (413, {"error": error})
        assert health(server.port)["active"] == 0
    finally:
        assert server.stop() == 0


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked HTTP/1.1 body (the empty one ends it)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def raw_post(port: int, headers: bytes, body: bytes) -> tuple[int, dict]:
    """POST /v1/completions with these headers and `body`, which may stop short of what the
    headers announce; the answer as soon as it comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n" + body
        )
        answer = http.client.HTTPResponse(s)
        answer.begin()
        return answer.status, json.loads(answer.read())


def test_a_full_queue_answers_429_and_sigterm_drains(tiny):
    """One row, one waiting place: a third request gets 429. SIGTERM then refuses new
    connections, lets both running requests finish, and exits 0."""
    server = LiveServer(
        tiny,
        "--max-seq-len",
        str(SEQ),
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--dtype",
        "float32",
    )
    try:
        first = server.client.completions.create(
            model="tiny", prompt="w5", max_tokens=200, temperature=0, stream=True
        )
        chunks = iter(first)
        next(chunks)
        queued = server.client.completions.create(
            model="tiny", prompt="w6", max_tokens=3, temperature=0, stream=True
        )
        wait_for(lambda: health(server.port)["waiting"] == 1, 10)
        with pytest.raises(openai.RateLimitError) as e:
            server.client.completions.create(model="tiny", prompt="w7", max_tokens=3)
        assert e.value.body["message"] == (
            "the server is busy: every sequence slot is taken and 1 requests already wait (the "
            "queue's bound is 1); retry later."
        )
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not can_connect(server.port), 10)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert len("".join(c.choices[0].text for c in rest).split()) == 199
        assert [c.choices[0].finish_reason for c in queued][-1] == "length"
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_ctrl_c_drains_as_sigterm_does_and_exits_0(tiny):
    """Ctrl-C (SIGINT) drained as SIGTERM does, but uvicorn then re-raised it to the
    KeyboardInterrupt handler: the server said 'interrupted.' and exited 130 after finishing
    every request, where README says it exits 0."""
    server = LiveServer(tiny, "--max-seq-len", str(SEQ), "--dtype", "float32")
    try:
        stream = server.client.completions.create(
            model="tiny", prompt="w5", max_tokens=100, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        server.proc.send_signal(signal.SIGINT)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert len("".join(c.choices[0].text for c in rest).split()) == 99
        assert server.proc.wait(60) == 0
        assert "interrupted." not in server.proc.stdout.read()
    finally:
        server.stop()


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tiny):
    """A second Ctrl-C makes uvicorn skip the lifespan's shutdown, and asyncio.run then
    cancelled it: Starlette logged that CancelledError as an ERROR traceback."""
    server = LiveServer(tiny, "--max-seq-len", str(SEQ), "--dtype", "float32")
    try:
        stream = server.client.completions.create(
            model="tiny", prompt="w5", max_tokens=240, temperature=0, stream=True
        )
        next(iter(stream))  # the drain waits for it: the second Ctrl-C comes meanwhile
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(60) == 0
        assert server.proc.stdout.read() == f"Serving tiny on http://127.0.0.1:{server.port}/v1\n"
    finally:
        server.stop()


def test_a_stream_the_drain_cuts_ends_with_an_error_event(tiny):
    """A stream still running when --drain-timeout ran out just stopped (uvicorn cancelled
    it): the client could not tell the text was cut short. Now it ends with an error event,
    which the openai client raises, and the server still exits 0."""
    server = LiveServer(
        tiny, "--max-seq-len", str(SEQ), "--dtype", "float32", "--drain-timeout", "0"
    )
    try:
        stream = server.client.completions.create(
            model="tiny", prompt="w5", max_tokens=240, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError) as e:
            list(chunks)
        assert e.value.body == {
            "message": "the engine shut down before this request finished (after a drain of "
            "0.0 s).",
            "type": "service_unavailable",
            "param": None,
            "code": "shutting_down",
        }
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def can_connect(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_engine_fault_fails_its_request_not_the_server(tiny):
    """In-process: a backend whose calls fail on token w77 behind the real app and uvicorn."""
    import uvicorn

    from netdef import NetworkOptions, build_network
    from runtime.cpu import CpuBackend
    from runtime.serving import Engine
    from runtime.tokenizer import Tokenizer
    from tests.fixtures.serving import Recording
    from tools.serve import Server
    from weights import Checkpoint

    options = NetworkOptions(dtype="float32", max_batch=2, max_seq_len=64, max_prefill=8)
    backend = Recording(CpuBackend(build_network(Checkpoint.open(tiny), options)), poison=77)
    tokenizer = Tokenizer.from_dir(tiny)
    app = Server(lambda on_token: Engine(backend, tokenizer, 8, on_token), "tiny").app
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run)
    thread.start()
    try:
        wait_for(lambda: health(port), 30)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="w76 w77", max_tokens=4)
        assert e.value.body["message"] == "the engine failed on this request: injected fault"
        with pytest.raises(openai.APIError) as e:  # mid-stream: an error event ends the stream
            list(client.completions.create(model="tiny", prompt="w77", max_tokens=4, stream=True))
        assert e.value.message == "the engine failed on this request: injected fault"
        ok = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=4, temperature=0)
        assert ok.choices[0].finish_reason == "length" and len(ok.choices[0].text.split()) == 4
        assert health(port)["active"] == 0
    finally:
        uv.should_exit = True
        thread.join(30)


@pytest.mark.slow
def test_gemma3_270m_chat_equals_tools_generate(gemma3_270m_dir, tmp_path, capsys):
    """The bundled model, given Gemma-3's chat template (its GGUF carries none)."""
    from tests.fixtures.templates import GEMMA3_TEMPLATE

    model = tmp_path / "gemma-270m"
    model.mkdir()
    for f in gemma3_270m_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (model / f.name).symlink_to(f)
    config = json.loads((gemma3_270m_dir / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": GEMMA3_TEMPLATE})
    )
    question = "Name a primary color."
    expected_chat = generate_text(model, question, 8, capsys, "--chat")
    assert expected_chat
    server = LiveServer(model, "--dtype", "float32", "--max-seq-len", str(SEQ), "--max-batch", "2")
    try:
        name = model.name
        stream = server.client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": question}],
            max_completion_tokens=8,
            temperature=0,
            stream=True,
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_chat
    finally:
        assert server.stop() == 0


def test_the_serving_benchmark_reports_each_level(server, tmp_path, capsys):
    """Sampled requests (top-k 8, top-p 0.9, seeded), three streams at once."""
    from tools.bench import serve as bench

    out = tmp_path / "serve.json"
    args = ["--url", f"http://127.0.0.1:{server.port}/v1", "--streams", "1,3", "--rounds", "2"]
    args += ["--temperature", "0.8", "--top-k", "8", "--top-p", "0.9"]
    assert bench.main([*args, "--prompt-tokens", "5", "--max-tokens", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sampling"] == {"temperature": 0.8, "top_k": 8, "top_p": 0.9}
    assert [lv["streams"] for lv in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["requests"] == 2 * level["streams"]
        assert 0 < level["completion_tokens"] <= 4 * level["requests"]
        assert level["tokens_per_s"] == pytest.approx(level["completion_tokens"] / level["wall_s"])
        assert 0 < level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"]
    assert "3 streams:" in capsys.readouterr().out
