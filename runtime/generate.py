"""The generate loop, shared by every backend: prefill, then one decode step per new token.

    gen = Generator(backend, tokenizer)
    run = gen.start(["Hello"], SamplingParams(max_new_tokens=32))   # validates, no work yet
    for delta in run:                                                # streams text deltas
        print(delta.text, end="")
    run.completions[0].stats                                         # current after each step
    run.close()                     # left early: unfinished completions end as "cancelled"

A batch is right-padded into one [B, S] call per prefill chunk (S <= the backend's
max_prefill, ending where a sliding layer's KV ring ends); each sequence's logits come from
its own last prompt token. Cache rows hold the prompts longest first, so a chunk's call
takes only the rows whose prompts go on (rows 0..B'-1): a row's padding never runs past the
chunk its prompt ends in, which a KV ring of window + max_prefill - 1 slots absorbs
(netdef.slots). Decode then feeds one token per sequence per step at position
prompt_len + step; sequences that finished keep their row (fed their own next token,
output ignored) until all are done. Each step's call is submitted before the host streams
the tokens of the step before it, so the GPU need not wait for the host's text work; where
the engine picks the tokens itself (greedy, or drawn in the engine: runtime.readout), a
step's call follows the one before it on the device, fed its next_token.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Generator as Stream
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from netdef.contract import LOGITS, NEXT_TOKEN
from netdef.slots import prompt_chunks
from weights.config import is_int

from .backend import Backend
from .readout import (
    ARGMAX,
    Draws,
    Outputs,
    Readout,
    draws_for,
    engine_draws,
    may_fall_back,
    next_tokens_from,
    readout_for,
)
from .sampling import SamplingParams, uniforms
from .tokenizer import StreamDecoder, Tokenizer

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


class GenerationError(ValueError):
    """A request the engine cannot serve as given, raised before any work; or a run
    iterated after a later run took its backend over."""


WHOLE_CONTEXT = ", the model's whole context"  # said of a max_seq_len that cannot grow


def larger_max_seq_len(max_seq_len: int, model_context: int) -> str | None:
    """The max_seq_len to use for more tokens, bounded by the model's own context; None where
    max_seq_len already reaches it (netdef.options refuses a larger one), so that no error
    suggests a build that would be refused. Worded for every backend: a TensorRT artifact is
    rebuilt for it, the CPU backend takes it from NetworkOptions or --max-seq-len."""
    if max_seq_len >= model_context:
        return None
    return f"a larger max_seq_len (--max-seq-len, up to the model's context, {model_context})"


def prompt_name(i: int | None) -> str:
    """How errors name a prompt: "the prompt" alone, "prompt i" (from 0) of several."""
    return "the prompt" if i is None else f"prompt {i}"


def check_token_ids(ids: Sequence[int], vocab_size: int, i: int | None = None) -> None:
    """GenerationError if token ids (prompt `i` of several, or the prompt) lie outside the
    vocabulary [0, vocab_size): the engine's embedding gather would read past its table."""
    if bad := sorted({t for t in ids if not 0 <= t < vocab_size}):
        raise GenerationError(
            f"token ids {bad[:5]} in {prompt_name(i)} are outside the vocabulary [0, {vocab_size})."
        )


@dataclass
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0

    @property
    def decode_ms_per_token(self) -> float:
        return self.decode_ms / max(self.completion_tokens - 1, 1)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms_per_token if self.decode_ms else 0.0


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    # "stop" (EOS or stop string), "length", "cancelled", or "error" (runtime.serving: an
    # EngineFault, which reading the request raises)
    finish_reason: str | None = None
    stats: Stats = field(default_factory=Stats)


@dataclass(frozen=True)
class Delta:
    index: int  # which prompt of the batch
    text: str


class Generator:
    """Batches of prompts on one backend: `start` checks a batch and returns its `Run`.
    `eos_ids` end a sequence (by default the tokenizer's; [] runs to max_new_tokens).

    The backend holds one batch at a time: a run that starts while another is unfinished
    takes it over, and the other raises if iterated further. A backend that a
    runtime.serving.Engine serves takes no run until the engine shuts down."""

    def __init__(
        self, backend: Backend, tokenizer: Tokenizer, eos_ids: Sequence[int] | None = None
    ):
        if not all(hasattr(backend, name) for name in ("max_seq_len", "reset", "forward")):
            raise GenerationError(
                "backend is a runtime backend: TensorRTBackend.load(artifact) or "
                f"CpuBackend(network), not a {type(backend).__name__}."
            )
        if not isinstance(tokenizer, Tokenizer):  # else an AttributeError, here or at start()
            raise GenerationError(
                "tokenizer is a runtime.tokenizer.Tokenizer: Tokenizer.from_dir(model_dir), "
                f"not a {type(tokenizer).__name__}."
            )
        self.backend = backend
        self.tokenizer = tokenizer
        if eos_ids is not None and not (
            isinstance(eos_ids, Sequence | set) and all(is_int(t) for t in eos_ids)
        ):
            raise GenerationError(f"eos_ids is a list of token ids, not {eos_ids!r:.60}.")
        self.eos_ids = set(tokenizer.eos_ids if eos_ids is None else eos_ids)

    def encode(self, prompt: Prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(is_int(t) for t in prompt):  # not [True, 3]
            return [int(t) for t in prompt]
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt)
        raise GenerationError(
            "a prompt is text, a list of token ids or a list of chat messages ({'role': ..., "
            f"'content': ...}}), not {prompt!r:.60}."
        )

    def start(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        chat: bool = False,
        truncate: bool = False,
    ) -> Run:
        """Tokenize and check every prompt against the engine's limits; nothing runs yet."""
        check_params(params)
        if (
            not isinstance(prompts, Sequence)
            or isinstance(prompts, str)  # a str or a list of ids is a Sequence of 1-token prompts
            or any(is_int(p) for p in prompts)
        ):
            raise GenerationError(
                "prompts is a list of prompts (each text, token ids or chat messages), not "
                f"{prompts!r:.60}; wrap one prompt in a list: start([prompt], params)."
            )
        if not prompts:
            raise GenerationError("no prompts given.")
        if len(prompts) > self.backend.max_batch:
            raise GenerationError(
                f"{len(prompts)} prompts exceed the engine's max batch of {self.backend.max_batch}; "
                "send fewer at once, or use an engine with a larger max_batch (--max-batch)."
            )
        check_not_served(self.backend, "this Generator")
        several = len(prompts) > 1  # then the errors say which one
        encoded = [
            self.prompt_ids(prompt, params, chat, truncate, i if several else None)
            for i, prompt in enumerate(prompts)
        ]
        return Run(self, encoded, params)

    def engine_context(self) -> tuple[str, str | None]:
        """How a too-long error names the engine's max_seq_len, and the larger build to
        suggest (`larger_max_seq_len`; None at the model's whole context)."""
        seq_len = self.backend.max_seq_len
        larger = larger_max_seq_len(seq_len, self.backend.model_context)
        return f"the engine's max_seq_len={seq_len}" + ("" if larger else WHOLE_CONTEXT), larger

    def prompt_ids(
        self,
        prompt: Prompt,
        params: SamplingParams,
        chat: bool,
        truncate: bool,
        i: int | None = None,
    ) -> list[int]:
        """The prompt (number `i` of several) tokenized and checked against max_seq_len (or
        truncated to fit: its most recent tokens, after its BOS where it began with one,
        since a model fed no BOS goes astray), and its ids checked against the vocabulary."""
        seq_len, new = self.backend.max_seq_len, params.max_new_tokens
        limit = seq_len - new
        if limit < 1:  # no prompt fits: shortening or truncating it cannot help
            engine, larger = self.engine_context()
            raise GenerationError(
                f"max_new_tokens={new} leaves no room for a prompt in {engine}: lower "
                f"max_new_tokens below {seq_len}"
                + (f", or use an engine with {larger}." if larger else ".")
            )
        ids = self.encode(prompt, chat)
        name = prompt_name(i)
        if not ids:
            raise GenerationError(f"{name} is empty after tokenization.")
        check_token_ids(ids, self.backend.vocab_size, i)
        if len(ids) > limit:
            if not truncate:
                engine, larger = self.engine_context()
                raise GenerationError(
                    f"{name} has {len(ids)} tokens; with max_new_tokens={new} that exceeds "
                    f"{engine}. Shorten the prompt, lower max_new_tokens, "
                    + (f"use an engine with {larger}, " if larger else "")
                    + "or allow truncation."
                )
            bos = self.tokenizer.bos_id
            keep = [bos] if limit > 1 and bos is not None and ids[0] == bos else []
            ids = keep + ids[len(ids) - (limit - len(keep)) :]
        return ids


# What each backend's KV caches belong to: the run whose batch they hold (a backend holds
# one batch, so a run iterated after another run of any Generator reset it has lost its
# rows), or a runtime.serving.Engine (its rows until it shuts down). Weak both ways: a
# holder refers to its backend, so a strong one kept every backend that ever ran a batch
# (weights, caches) alive for good.
HOLDERS: weakref.WeakKeyDictionary[Backend, weakref.ref] = weakref.WeakKeyDictionary()


def check_not_served(backend: Backend, who: str) -> None:
    """GenerationError while a runtime.serving.Engine serves `backend`: its step thread owns
    the KV caches until its `shutdown` returns, and `who` (a run, another engine) beside it
    would overwrite them, every output silently wrong."""
    from .serving import Engine  # runtime.serving imports this module

    holder = HOLDERS.get(backend)
    if isinstance(engine := holder and holder(), Engine) and engine.running:
        raise GenerationError(
            "this backend serves a runtime.serving.Engine until its shutdown() returns: "
            f"submit to that engine, or give {who} a backend of its own."
        )


def check_params(params: object) -> None:
    """A GenerationError unless `params` is SamplingParams (a dict got an AttributeError)."""
    if not isinstance(params, SamplingParams):
        raise GenerationError(f"params is a runtime.sampling.SamplingParams, not {params!r:.60}.")


class Run:
    """One batch in flight: iterate it for text deltas; `completions` fill in as it goes.
    It is one stream: iterating it again goes on where it stopped."""

    def __init__(self, gen: Generator, prompts: list[list[int]], params: SamplingParams):
        self.gen, self.params = gen, params
        self.completions = [Completion(prompt_ids=p) for p in prompts]
        # Cache row r holds prompt order[r]: the longest prompts first (module docstring).
        self.order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for c in self.completions:
            c.stats.prompt_tokens = len(c.prompt_ids)
        self.texts = [TextStream(gen, c, params.stop) for c in self.completions]
        # What leaves the engine at each decode step (runtime.readout says why).
        backend = gen.backend
        self.readout = readout_for(params, backend.sample_top_k, backend.has_log_normalizer)
        self.stream: Stream[Delta, None, None] | None = None

    def __iter__(self) -> Iterator[Delta]:
        if self.stream is None:
            self.stream = self._generate()
        return self.stream

    @property
    def owns_backend(self) -> bool:
        """False once a later run, of any Generator on the same backend, has reset the
        backend's caches (and dropped this run's calls in flight)."""
        holder = HOLDERS.get(self.gen.backend)
        return holder is not None and holder() is self

    def _generate(self) -> Stream[Delta, None, None]:
        backend, params = self.gen.backend, self.params
        batch = len(self.completions)
        rows = [self.completions[i] for i in self.order]
        lengths = np.array([len(c.prompt_ids) for c in rows])
        check_not_served(backend, "this Generator")  # an engine may have started since
        HOLDERS[backend] = weakref.ref(self)
        backend.reset(batch)

        t0 = time.perf_counter()
        # A prompt may end in any prefill chunk, so a fallback to the latest call's logits
        # would not find its logits there: prefill returns them beside the readout's outputs
        # (sampling the whole logits of 16 rows took ~6 ms on the host; the best K decide
        # most rows).
        readout = self.readout
        if may_fall_back(readout, params):
            readout = Readout(readout.name, (*readout.outputs, LOGITS))
        rng = np.random.default_rng(params.seed)  # one uniform number per row and step
        out = self._prefill(lengths, readout, self._draws(rng, batch))
        t1 = time.perf_counter()
        for c in self.completions:
            c.stats.prefill_ms = (t1 - t0) * 1000
        steps = (
            self._chained(out, lengths, rng)
            if self.readout == ARGMAX
            else self._sampled(out, lengths, rng)
        )
        try:
            for tokens in steps:
                yield from self._accept(tokens, t1)
                if not self.owns_backend:
                    raise GenerationError(
                        "this run was interrupted: a later run on its backend took over the "
                        "backend, which holds one batch at a time. Finish iterating a run "
                        "before iterating the next, or send the prompts in one start()."
                    )
                if all(c.finish_reason for c in self.completions):
                    break
        except GeneratorExit:  # `close()` before the end: the unfinished rows are cancelled
            for i, c in enumerate(self.completions):
                if not c.finish_reason:
                    self.texts[i].finish("cancelled")
            raise
        finally:
            steps.close()  # a greedy step still in flight is collected
            self._count(t1)
        for i, c in enumerate(self.completions):
            if not c.finish_reason and (tail := self.texts[i].finish()):
                yield Delta(i, tail)

    def close(self) -> None:
        """End the run where it stands (a caller that stopped iterating early): its
        unfinished completions get finish_reason "cancelled", their stats what was generated."""
        if self.stream is not None:
            self.stream.close()

    def _count(self, t1: float) -> None:
        """Each completion's token count, and the decoding time since `t1`, as of now."""
        decode_ms = (time.perf_counter() - t1) * 1000
        for c in self.completions:
            c.stats.decode_ms, c.stats.completion_tokens = decode_ms, len(c.token_ids)

    def _draws(self, rng: np.random.Generator, batch: int) -> Draws:
        """A call's draws: where the engine draws the tokens (runtime.readout.engine_draws),
        each row's next uniform number (the ones host sampling would take, `uniforms`)."""
        backend, params = self.gen.backend, self.params
        if not engine_draws(params, backend.sample_top_k):
            return [draws_for(params, None)] * batch
        return [draws_for(params, float(u)) for u in uniforms(params, rng, batch)]

    def _sampled(
        self, out: Outputs, lengths: np.ndarray, rng: np.random.Generator
    ) -> Iterator[np.ndarray]:
        """Each decode step's tokens, drawn on the host from the call before. The call they
        feed is submitted before the host streams them (detokenizing, stop strings, the
        caller's work on each delta), so the GPU runs meanwhile. Sequences that finished
        are fed their own token; their outputs are ignored."""
        backend, params = self.gen.backend, self.params
        rows = [self.completions[i] for i in self.order]
        last = np.zeros(len(rows), np.int32)
        draws = self._draws(rng, len(rows))  # the rows' temperatures: none drawn in the engine
        inflight = False

        def whole_logits() -> np.ndarray:  # the prefill's (`__iter__`), else the latest call's
            return out[LOGITS] if LOGITS in out else backend.last_logits()

        try:
            for step in range(params.max_new_tokens):
                if step:
                    out, inflight = backend.collect(), False
                seen = (
                    [np.array(c.prompt_ids + c.token_ids) for c in rows]
                    if params.repetition_penalty != 1.0
                    else []
                )
                u = uniforms(params, rng, len(rows))
                tokens = next_tokens_from(out, params, u, seen, whole_logits)
                if step + 1 < params.max_new_tokens:
                    positions = (lengths + step)[:, None].astype(np.int32)
                    ids = tokens[:, None].astype(np.int32)
                    backend.submit(ids, positions, last, self.readout, draws)
                    inflight = True
                yield tokens
        finally:
            if inflight and self.owns_backend:
                backend.collect()

    def _chained(
        self, out: Outputs, lengths: np.ndarray, rng: np.random.Generator
    ) -> Iterator[np.ndarray]:
        """Decoding one call ahead of the host, where the engine picks each token (its argmax,
        or drawn by the uniform numbers staged with the call): step k + 1's call is
        submitted, fed step k's next_token on the device (`Backend.submit` with input_ids
        None), before the host waits for step k's tokens, so the GPU need not idle while the
        host streams text. Sequences that finished are fed their own token; their outputs
        are ignored."""
        backend, n = self.gen.backend, self.params.max_new_tokens
        last = np.zeros(len(lengths), np.int32)
        tokens, inflight = out[NEXT_TOKEN], 0
        try:
            for step in range(n):
                if step + 1 < n:  # the call at positions lengths + step gives step + 1
                    positions = (lengths + step)[:, None].astype(np.int32)
                    ids = None if step else tokens[:, None]
                    backend.submit(ids, positions, last, ARGMAX, self._draws(rng, len(last)))
                    inflight += 1
                if step:
                    tokens, inflight = backend.collect()[NEXT_TOKEN], inflight - 1
                yield tokens
        finally:
            for _ in range(inflight if self.owns_backend else 0):
                backend.collect()

    def _prefill(self, lengths: np.ndarray, readout: Readout, draws: Draws) -> Outputs:
        """Run the prompts in chunks of at most max_prefill that do not cross a KV ring's end
        (netdef.slots.prompt_chunks); the output for each prompt's last token (each chunk
        takes the first rows of `draws`: a prompt's first token is drawn where it ends)."""
        backend = self.gen.backend
        batch, total = len(lengths), int(lengths[0])  # rows are longest first
        ids = np.zeros((batch, total), np.int32)
        for b, i in enumerate(self.order):
            ids[b, : len(self.completions[i].prompt_ids)] = self.completions[i].prompt_ids
        result: Outputs = {}
        for start, end in prompt_chunks(total, backend.max_prefill, backend.rings):
            going = int((lengths > start).sum())  # rows 0..going-1 still have prompt tokens
            positions = np.broadcast_to(np.arange(start, end, dtype=np.int32), (going, end - start))
            last = np.clip(lengths[:going] - 1 - start, 0, end - start - 1).astype(np.int32)
            out = backend.forward(
                ids[:going, start:end], positions, last, readout, draws and draws[:going]
            )
            if not result:  # the first chunk has every row
                result = {name: np.array(o) for name, o in out.items()}
            ends_here = lengths[:going] - 1 < end
            for name, o in out.items():
                result[name][:going][ends_here] = o[ends_here]
        return result

    def _accept(self, tokens: np.ndarray, t1: float) -> list[Delta]:
        """The text deltas a step's tokens release, every row's token taken and counted
        before any is yielded: a run paused between deltas shows all it has generated."""
        deltas = [
            Delta(i, text)
            for i, token in zip(self.order, tokens.tolist())
            if not self.completions[i].finish_reason and (text := self.texts[i].accept(token))
        ]
        self._count(t1)
        return deltas


class TextStream:
    """One sequence's text as its tokens arrive: detokenized without splitting a character,
    ended by EOS or cut before the first stop string (`completion.finish_reason` "stop"); an
    ending that could still grow into a stop string is held back until it cannot."""

    def __init__(self, gen: Generator, completion: Completion, stops: Sequence[str]):
        self.completion, self.stops, self.eos_ids = completion, stops, gen.eos_ids
        self.decoder = StreamDecoder(gen.tokenizer)
        self.pending = ""  # decoded text not yet released

    def accept(self, token: int) -> str:
        """The text `token` releases (it joins `completion`)."""
        c = self.completion
        if token in self.eos_ids:
            c.finish_reason = "stop"
            text = self.pending + self.decoder.flush()
        else:
            c.token_ids.append(token)
            text = self.pending + self.decoder.push(token)
            hit = min((text.find(s) for s in self.stops if s in text), default=-1)
            if hit >= 0:
                c.finish_reason = "stop"
                text = text[:hit]
            else:
                keep = max(
                    (k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                    default=0,
                )
                text, self.pending = text[: len(text) - keep], text[len(text) - keep :]
        c.text += text
        return text

    def finish(self, reason: str = "length") -> str:
        """The held-back text, at the end of a sequence that met no stop."""
        self.completion.finish_reason = reason
        text, self.pending = self.pending + self.decoder.flush(), ""
        self.completion.text += text
        return text
