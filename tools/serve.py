"""An OpenAI-compatible HTTP server over the continuous-batching engine (runtime/serving.py).

    python -m tools.serve ARTIFACT                                  # TensorRT, port 8000
    python -m tools.serve MODEL_DIR --backend reference --max-batch 4
    python -m tools.serve ARTIFACT --ray-replicas 8                 # Ray Serve, a GPU each

Endpoints: POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events
when `stream` is true), GET /v1/models, GET /health, GET /metrics (Prometheus).

Starlette + uvicorn rather than FastAPI: the OpenAI schema is validated here by hand, field
by field, because every refusal must be an OpenAI-style error body that names the field
(unknown and unsupported fields included, which a pydantic model would drop or answer in
FastAPI's own format); what FastAPI adds over Starlette is that pydantic layer. Ray Serve
takes any ASGI app (`serve.ingress`), so the same app runs there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as prometheus_text
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.generate import GenerationError
from runtime.sampling import SamplingError, SamplingParams
from runtime.serving import Engine, EngineStopped, QueueFull, Request
from runtime.tokenizer import TokenizerError
from tools.cli import add_model_arguments, at_least, flag_named

# Buckets of the latency histograms, in seconds: from GPU decode steps to CPU prefills.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
COMMON_FIELDS |= {"stream_options", "top_k", "repetition_penalty", "user", "n", "logprobs"}
COMMON_FIELDS |= {"frequency_penalty", "presence_penalty", "logit_bias"}
FIELDS = {
    "completion": COMMON_FIELDS | {"prompt", "echo", "best_of"},
    "chat": COMMON_FIELDS
    | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "store"}
    | {"tools", "tool_choice", "parallel_tool_calls"},
}
PENALTIES = "frequency or presence penalties (repetition_penalty is supported)"
# OpenAI fields this server does not implement: the values that leave them off (what clients
# send by default) are accepted, any other is a 400 saying what is not done.
UNSUPPORTED = {
    "n": ((1,), "n > 1 (one choice per request)"),
    "best_of": ((1,), "best_of > 1"),
    "echo": ((False,), "echo"),
    "logprobs": ((False,), "logprobs"),
    "top_logprobs": ((0,), "logprobs"),
    "frequency_penalty": ((0, 0.0), PENALTIES),
    "presence_penalty": ((0, 0.0), PENALTIES),
    "logit_bias": (({},), "logit_bias"),
    "response_format": (
        ({"type": "text"},),
        "structured output (a response_format other than text)",
    ),
    "tools": (([],), "tool calls"),
    "tool_choice": (("none",), "tool calls"),
    "parallel_tool_calls": ((True, False), "tool calls"),
    "store": ((False,), "stored completions"),
}
# Seconds uvicorn waits beyond --drain-timeout, for the answers the engine ended to go out.
DRAIN_GRACE = 5.0
DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI's; chat defaults to the room left
# --max-body-bytes' default: larger bodies get a 413, unread. A whole 128K-token prompt, as
# JSON-escaped CJK text or as a list of token ids, is about 1 MB.
MAX_BODY_BYTES = 8 << 20


class ApiError(Exception):
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}
        error = {
            "message": str(self),
            "type": kind.get(
                self.status, "invalid_request_error" if self.status < 500 else "server_error"
            ),
            "param": self.param,
            "code": self.code,
        }
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass(frozen=True)
class Call:
    """One validated request."""

    kind: str  # "completion" or "chat"
    prompt: str | list[int] | list[dict]
    params: SamplingParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool


def _typed(body: dict, name: str, types: tuple, what: str):
    value = body.get(name)
    if value is not None and (
        not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
    ):
        raise ApiError(
            400, f"'{name}' must be {what}, not {json.dumps(value)}.", name, "invalid_type"
        )
    return value


def _number(body: dict, name: str, default: float) -> float:
    """A float field, `default` only when missing or null: 0 is a value (top_p 0 is refused
    by SamplingParams, not turned into 1)."""
    value = _typed(body, name, (int, float), "a number")
    return default if value is None else float(value)


def parse_call(body: object, kind: str, served: str) -> Call:
    """The request body checked field by field (ApiError naming the first bad one). Token ids
    are checked against the vocabulary when the engine takes the prompt (Generator.prompt_ids)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    if unknown := sorted(body.keys() - FIELDS[kind]):
        raise ApiError(
            400,
            f"unrecognized request argument(s): {', '.join(unknown)}.",
            unknown[0],
            "unknown_field",
        )
    model = _typed(body, "model", (str,), "a string")
    if model is None:
        raise ApiError(
            400, "'model' is required; GET /v1/models lists it.", "model", "missing_field"
        )
    if model != served:
        raise unknown_model(model, served)
    for name in ("n", "best_of"):
        if (count := _typed(body, name, (int,), "an integer")) is not None and count < 1:
            raise ApiError(400, f"'{name}' must be at least 1, not {count}.", name, "invalid_value")
    _typed(body, "user", (str,), "a string")
    for name, (off, what) in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(v) and value == v for v in off):
            raise ApiError(
                400,
                f"'{name}' is not supported: this server does not do {what}.",
                name,
                "unsupported",
            )
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, MESSAGES, "messages", "invalid_type")
        prompt = [chat_message(m) for m in messages]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids_ok = isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not ids_ok:
            raise ApiError(
                400,
                "'prompt' must be a non-empty string or a list of token ids (one prompt).",
                "prompt",
                "invalid_type",
            )
    max_tokens = _typed(body, "max_tokens", (int,), "an integer")
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _typed(body, "max_completion_tokens", (int,), "an integer")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (
        isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
    ):
        raise ApiError(
            400, "'stop' must be a string or a list of non-empty strings.", "stop", "invalid_type"
        )
    stream = _typed(body, "stream", (bool,), "true or false") or False
    options = _typed(body, "stream_options", (dict,), "an object")
    if options is not None and not stream:
        raise ApiError(
            400,
            "'stream_options' is only allowed when 'stream' is true.",
            "stream_options",
            "invalid_value",
        )
    options = options or {}
    if unknown := sorted(options.keys() - {"include_usage"}):
        raise ApiError(
            400,
            f"unrecognized stream_options: {', '.join(unknown)}.",
            "stream_options",
            "unknown_field",
        )
    _typed(options, "include_usage", (bool,), "true or false")
    try:
        params = SamplingParams(
            max_new_tokens=1 if max_tokens is None else max_tokens,
            temperature=_number(body, "temperature", 1.0),
            top_k=_typed(body, "top_k", (int,), "an integer") or 0,
            top_p=_number(body, "top_p", 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),
            seed=_typed(body, "seed", (int,), "an integer"),
            stop=tuple(stop or ()),
        )
    except SamplingError as e:
        name = "max_tokens" if e.field == "max_new_tokens" else e.field
        message = str(e).replace("max_new_tokens", name)
        raise ApiError(400, message, name, "invalid_value") from None
    return Call(
        kind, prompt, params, max_tokens is not None, stream, bool(options.get("include_usage"))
    )


def unknown_model(model: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"the model '{model}' does not exist; this server serves '{served}'.",
        "model",
        "model_not_found",
    )


MESSAGES = (
    '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects whose '
    "content is text or a list of text parts."
)


def chat_message(message: object) -> dict[str, str]:
    """A chat message as the template takes it: role and text (`message_text`)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(400, MESSAGES, "messages", "invalid_type")
    return {"role": message["role"], "content": message_text(message)}


def message_text(message: dict) -> str:
    """A chat message's text: its string content, its text parts joined by newlines (as
    vLLM joins them), or "" for an assistant turn whose content is null."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message["role"] == "assistant":
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if other := sorted({str(p.get("type")) for p in content} - {"text"}):
            raise ApiError(
                400,
                f"content parts of type {', '.join(other)} are not supported: this server "
                "reads text parts only.",
                "messages",
                "unsupported",
            )
        if all(isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
    raise ApiError(400, MESSAGES, "messages", "invalid_type")


class Metrics:
    """The Prometheus series of one server (its own registry: several apps may share a process)."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "trtnetdef_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "trtnetdef_prompt_tokens", "prompt tokens of admitted requests", registry=r
        )
        self.completion_tokens = Counter(
            "trtnetdef_completion_tokens", "tokens generated", registry=r
        )
        Gauge("trtnetdef_queue_depth", "requests waiting for a cache row", registry=r).set_function(
            lambda: engine.queue_depth
        )
        Gauge("trtnetdef_active_requests", "requests holding a cache row", registry=r).set_function(
            lambda: engine.active
        )
        self.disconnects = Counter(
            "trtnetdef_disconnects", "requests cancelled because the client went away", registry=r
        )
        self.ttft = Histogram(
            "trtnetdef_time_to_first_token_seconds",
            "from arrival to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "trtnetdef_inter_token_latency_seconds",
            "between consecutive tokens of a request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def on_token(self, request: Request, now: float) -> None:
        self.completion_tokens.inc()
        if request.last_token_at is None:
            self.ttft.observe(now - request.submitted)
        else:
            self.itl.observe(now - request.last_token_at)


class Server:
    """The routes over one engine; `app` is the ASGI application."""

    def __init__(
        self,
        make_engine: Callable[[Callable], Engine],
        model: str,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        self.model, self.max_body_bytes = model, max_body_bytes
        self.metrics: Metrics | None = None
        self.engine = make_engine(lambda r, now: self.metrics.on_token(r, now))
        self.metrics = Metrics(self.engine)
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model_card, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ],
            lifespan=self.lifespan,
            exception_handlers={HTTPException: http_error},
        )
        self.app.router.redirect_slashes = False  # a 307 to another path is no OpenAI answer

    @contextlib.asynccontextmanager
    async def lifespan(self, app) -> AsyncIterator[None]:
        # A second Ctrl-C: uvicorn skips the lifespan's shutdown and asyncio.run cancels it,
        # which Starlette logged as a traceback; the backend is still closed.
        with contextlib.suppress(asyncio.CancelledError):
            yield
        # uvicorn has stopped listening and waited drain_timeout for running requests.
        await asyncio.to_thread(self.engine.shutdown, 0)
        await asyncio.to_thread(self.engine.backend.close)

    def card(self) -> dict:
        return {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "trt-netdef",
        }

    async def models(self, _: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self.card()]})

    async def model_card(self, http: HttpRequest) -> Response:
        model = http.path_params["model"]
        if model != self.model:
            return unknown_model(model, self.model).response()
        return JSONResponse(self.card())

    async def health(self, _: HttpRequest) -> Response:
        e = self.engine
        return JSONResponse(
            {"status": "ok", "active": e.active, "waiting": e.queue_depth, "pid": os.getpid()}
        )

    async def prometheus(self, _: HttpRequest) -> Response:
        return Response(prometheus_text(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, http: HttpRequest) -> Response:
        return await self._serve(http, "completion")

    async def chat(self, http: HttpRequest) -> Response:
        return await self._serve(http, "chat")

    async def _serve(self, http: HttpRequest, kind: str) -> Response:
        endpoint = http.url.path
        try:
            body = await read_body(http, self.max_body_bytes)
            try:
                body = json.loads(body)
            except ValueError as e:
                raise ApiError(
                    400, f"the request body is not valid JSON: {e}.", None, "invalid_json"
                ) from None
            call = parse_call(body, kind, self.model)
            # Off the event loop: tokenizing a long prompt stalled every other stream.
            request = await asyncio.to_thread(self._submit, call)
        except ApiError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            return e.response()
        if call.stream:
            self.metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(
                self._events(http, call, request), media_type="text/event-stream"
            )
        watcher = asyncio.create_task(cancel_on_disconnect(http, request, self.metrics))
        try:
            text = "".join([t async for t in request])
        except Exception as e:  # an engine fault, or the drain ran out: this request fails
            error = failure(e)
            self.metrics.requests.labels(endpoint, str(error.status)).inc()
            return error.response()
        finally:
            watcher.cancel()
            request.cancel()
        # 499: the client closed the request (nginx's code), nobody reads this answer.
        status = "499" if request.completion.finish_reason == "cancelled" else "200"
        self.metrics.requests.labels(endpoint, status).inc()
        choice = {"index": 0, "logprobs": None, "finish_reason": request.completion.finish_reason}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse(
            {**self._head(call, request), "choices": [choice], "usage": usage(request)}
        )

    def _submit(self, call: Call) -> Request:
        """Tokenize, size max_tokens and queue, as ApiErrors."""
        engine = self.engine
        param = "messages" if call.kind == "chat" else "prompt"
        try:
            ids = engine.gen.encode(call.prompt, chat=call.kind == "chat")
            params = call.params
            room = engine.backend.max_seq_len - len(ids)
            if not call.max_tokens_given:
                default = room if call.kind == "chat" else DEFAULT_MAX_TOKENS
                params = SamplingParams(
                    **{**params.__dict__, "max_new_tokens": max(1, min(default, room))}
                )
            if not ids:
                raise ApiError(
                    400, "the prompt is empty after tokenization.", "prompt", "invalid_value"
                )
            if room < params.max_new_tokens:
                context = (
                    f"this engine's context of max_seq_len={engine.backend.max_seq_len} tokens"
                )
                raise ApiError(
                    400,
                    f"the prompt has {len(ids)} tokens and max_tokens is {params.max_new_tokens}, "
                    f"more than {context}; shorten the prompt or lower max_tokens."
                    if call.max_tokens_given
                    else f"the prompt has {len(ids)} tokens, which leave no room for a completion "
                    f"in {context}; shorten the prompt.",
                    param,
                    "context_length_exceeded",
                )
            request = engine.submit(ids, params)  # GenerationError: ids outside the vocabulary
            self.metrics.prompt_tokens.inc(len(ids))
            return request
        except GenerationError as e:
            raise ApiError(400, str(e), param, "invalid_value") from None
        except TokenizerError as e:  # it names the model's folder: the served name instead
            message = str(e).replace(str(engine.gen.tokenizer.source), f"'{self.model}'")
            raise ApiError(400, message, None, "invalid_value") from None
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", None, "queue_full") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), None, "shutting_down") from None

    def _head(self, call: Call, request: Request) -> dict:
        chat = call.kind == "chat"
        return {
            # The process id says which server (or Ray Serve replica) answered.
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{os.getpid()}-{request.id}-{uuid.uuid4().hex[:8]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
        }

    async def _events(self, http: HttpRequest, call: Call, request: Request) -> AsyncIterator[str]:
        """Server-sent events: a chunk per text delta, the finish_reason, usage if asked, [DONE]."""
        head = self._head(call, request)
        chat = call.kind == "chat"
        if chat:
            head["object"] = "chat.completion.chunk"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = (
                    {"role": "assistant", "content": ""}
                    if role
                    else {}
                    if text is None
                    else {"content": text}
                )
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            extra = {"usage": None} if call.include_usage else {}
            return sse({**head, "choices": [choice], **extra})

        watcher = asyncio.create_task(cancel_on_disconnect(http, request, self.metrics))
        try:
            if chat:
                yield chunk(None, role=True)
            try:
                async for text in request:
                    yield chunk(text)
            except Exception as e:  # the openai client raises an APIError on this event
                yield sse(failure(e).body())
                return
            yield chunk(None, request.completion.finish_reason)
            if call.include_usage:
                yield sse({**head, "choices": [], "usage": usage(request)})
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            request.cancel()


async def read_body(http: HttpRequest, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to be over `limit` bytes: by its
    Content-Length before any of it is read, or, sent chunked, once what came exceeds it."""
    too_large = ApiError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes.",
        None,
        "body_too_large",
    )
    if int(http.headers.get("content-length", 0)) > limit:
        raise too_large
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def failure(e: Exception) -> ApiError:
    """A request the engine ended with an exception: the drain's deadline (503), a fault (500)."""
    if isinstance(e, EngineStopped):
        return ApiError(503, str(e), None, "shutting_down")
    return ApiError(500, str(e), None, "engine_error")


async def http_error(http: HttpRequest, e: HTTPException) -> Response:
    """Starlette's own 404 and 405 as OpenAI error bodies."""
    return ApiError(
        e.status_code,
        f"{http.method} {http.url.path} is not an endpoint of this server; it serves POST "
        "/v1/completions, POST /v1/chat/completions and GET /v1/models.",
    ).response()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def usage(request: Request) -> dict:
    prompt, completion = len(request.prompt_ids), len(request.completion.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def cancel_on_disconnect(http: HttpRequest, request: Request, metrics: Metrics) -> None:
    """Cancel `request` (freeing its cache row) as soon as the client goes away."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    if not request.done:
        metrics.disconnects.inc()
    request.cancel()


# ---- the command line ----


@dataclass(frozen=True)
class ServeConfig:
    """What a server process (or each Ray Serve replica) needs to open the model."""

    model: Path
    backend: str
    dtype: str | None
    max_seq_len: int | None
    max_batch: int | None
    max_queue: int
    served_name: str
    drain_timeout: float
    max_body_bytes: int

    def rows(self) -> int:
        """Sequences the engine runs at once: --max-batch, else the artifact's, else 4."""
        from netdef.artifact import METADATA_FILE, Metadata, read_metadata

        if self.max_batch:
            return self.max_batch
        if (self.model / METADATA_FILE).is_file():
            return Metadata.from_dict(read_metadata(self.model)).max_batch
        return 4

    def check(self) -> None:
        """The refusals of server() that need no backend (not an artifact, a damaged one, no
        tokenizer, --dtype for an artifact, a model folder's weights): said before a Ray
        cluster starts, not by each replica in Ray's logs."""
        from tools.generate import artifact_metadata, check_as_built, load_tokenizer
        from weights import Checkpoint

        meta = artifact_metadata(self.model, self.backend)
        load_tokenizer(self.model, meta)
        check_as_built(self.model, meta, self.dtype, self.max_seq_len)
        if meta is None:
            Checkpoint.open(self.model)

    def server(self) -> Server:
        """Open the backend and tokenizer (the errors of tools.generate) and start the engine."""
        from tools.generate import artifact_metadata, load_tokenizer, open_backend

        meta = artifact_metadata(self.model, self.backend)
        tokenizer = load_tokenizer(self.model, meta)
        rows = self.rows()
        backend = open_backend(self.model, meta, self.backend, self.dtype, self.max_seq_len, rows)
        return Server(
            lambda on_token: Engine(backend, tokenizer, self.max_queue, on_token),
            self.served_name,
            self.max_body_bytes,
        )


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ServeConfig]:
    p = argparse.ArgumentParser(prog="python -m tools.serve", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="0.0.0.0 listens beyond loopback (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument(
        "--served-model-name", help="the 'model' clients ask for (default: the folder's name)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        help="concurrent sequences (reference backend; an engine has its own)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait while every sequence's slot is taken; more get 429 (0: "
        "none wait; default: %(default)s)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM or Ctrl-C lets running requests finish (default: %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=MAX_BODY_BYTES,
        help="larger request bodies get 413, unread (default: %(default)s, 8 MiB)",
    )
    p.add_argument(
        "--ray-replicas",
        type=int,
        help="serve through Ray Serve with this many replicas (a GPU each)",
    )
    p.add_argument(
        "--ray-address", help="a running Ray cluster (e.g. auto); default: start a local one"
    )
    args = p.parse_args(argv)
    lows = {
        "--max-batch": 1,
        "--max-queue": 0,
        "--drain-timeout": 0,
        "--max-body-bytes": 1,
        "--ray-replicas": 1,
    }
    at_least(p, args, lows)
    if not 1 <= args.port <= 65535:
        p.error(f"--port {args.port} is not a TCP port; choose one in 1..65535.")
    if args.backend == "tensorrt" and args.max_batch is not None:
        p.error(
            "--max-batch applies to the reference backend; an engine's is fixed when it is built."
        )
    config = ServeConfig(
        model=args.model.resolve(),
        backend=args.backend,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        served_name=args.served_model_name or args.model.resolve().name,
        drain_timeout=args.drain_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    return args, config


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (uvicorn listens on it) before the model loads: a port in
    use or a bad --host is one error (ValueError) at once, not uvicorn's log line and exit 3
    after the load and a "Serving" line."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is already in use; stop what listens there or choose "
                "another --port."
            ) from None
        raise ValueError(
            f"cannot listen on {host}:{port} ({e.strerror}); --host must be an address of this "
            "machine (127.0.0.1, or 0.0.0.0 for all of them) and --port one you may use."
        ) from None
    return sock


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from netdef import OptionsError
    from runtime.cuda_buffers import CudaError
    from runtime.tensorrt_backend import EngineLoadError
    from weights import WeightsError

    args, config = parse_args(argv)
    from tools.generate import no_such_model

    if problem := no_such_model(config.model):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    if args.ray_replicas:
        from tools.serve_ray import run_on_ray

        try:
            config.check()
        except (ValueError, WeightsError) as e:
            print(f"error: {flag_named(e)}", file=sys.stderr)
            return 1
        return run_on_ray(args, config)
    try:
        sock = bind(args.host, args.port)
        server = config.server()
    except (ValueError, WeightsError, OptionsError, EngineLoadError, CudaError) as e:
        print(f"error: {flag_named(e)}", file=sys.stderr)
        return 1
    uvicorn_config = uvicorn.Config(
        server.app,
        log_level="warning",
        timeout_graceful_shutdown=config.drain_timeout + DRAIN_GRACE,
    )
    logging.getLogger("uvicorn.error").addFilter(not_a_cancellation)
    listener = draining(uvicorn.Server, server.engine, config.drain_timeout)(uvicorn_config)
    # uvicorn re-raises the SIGTERM or Ctrl-C it drained on to the handler it found (a
    # KeyboardInterrupt: 'interrupted.' and 130 after a clean drain): let that handler be
    # the drain's own, so a drained server exits 0 either way, and a signal before uvicorn
    # takes over still drains.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, listener.handle_exit)
    print(
        f"Serving {config.served_name} on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    listener.run(sockets=[sock])
    return 0


def not_a_cancellation(record: logging.LogRecord) -> bool:
    """A logging filter: uvicorn logs a request that a second Ctrl-C cut short (uvicorn stops
    without waiting for it, and asyncio.run cancels it) as 'Exception in ASGI application'
    with its CancelledError traceback; the user asked for that stop."""
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def draining(base: type, engine: Engine, timeout: float) -> type:
    """uvicorn's Server whose first SIGTERM or Ctrl-C also starts the engine's drain: no new
    requests from then on, and those still running after `timeout` s end with an error event
    (EngineStopped) rather than a stream that just stops when uvicorn cancels it,
    DRAIN_GRACE s later."""

    class Draining(base):
        def handle_exit(self, sig: int, frame: object) -> None:
            if not self.should_exit:
                threading.Thread(target=engine.shutdown, args=(timeout,), daemon=True).start()
            super().handle_exit(sig, frame)

    return Draining


if __name__ == "__main__":
    from tools.cli import run

    run(main)
