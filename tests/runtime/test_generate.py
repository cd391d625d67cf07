"""The generate loop on the CPU backend, against transformers' `generate` on the real Gemma-3-270M."""

from __future__ import annotations

import pytest
import torch

from netdef import NetworkOptions, build_network
from runtime.cpu import CpuBackend
from runtime.generate import GenerationError, Generator
from runtime.sampling import SamplingParams
from runtime.tokenizer import Tokenizer
from weights import Checkpoint

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tokenizer(gemma3_270m_dir):
    return Tokenizer.from_dir(gemma3_270m_dir)


@pytest.fixture(scope="module")
def cpu_model(gemma3_270m_dir):
    """float32 network, batch up to 3, prefill chunks of 4 tokens (so prompts take several calls)."""
    options = NetworkOptions(dtype="float32", max_batch=3, max_seq_len=64, max_prefill=4)
    return CpuBackend(build_network(Checkpoint.open(gemma3_270m_dir), options))


@pytest.fixture(scope="module")
def hf_greedy(gemma3_270m_dir, tokenizer):
    """transformers' float32 greedy continuation of each prompt, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma3_270m_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            full = model.generate(
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
            )
        out.append(full[0, ids.shape[1] :].tolist())
    return out


def greedy(max_new_tokens: int = NEW_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kwargs)


def test_greedy_matches_transformers_one_prompt_at_a_time(cpu_model, tokenizer, hf_greedy):
    gen = Generator(cpu_model, tokenizer, eos_ids=[])
    for prompt, expected in zip(PROMPTS, hf_greedy):
        run = gen.start([prompt], greedy())
        text = "".join(d.text for d in run)
        assert run.completions[0].token_ids == expected
        assert text == tokenizer.decode(expected)


def test_greedy_matches_transformers_batched(cpu_model, tokenizer, hf_greedy):
    """Prompts of different lengths in one right-padded batch give the unbatched tokens."""
    run = Generator(cpu_model, tokenizer, eos_ids=[]).start(PROMPTS, greedy())
    deltas = list(run)
    for i, expected in enumerate(hf_greedy):
        assert run.completions[i].token_ids == expected
        assert "".join(d.text for d in deltas if d.index == i) == run.completions[i].text
        assert run.completions[i].finish_reason == "length"
        stats = run.completions[i].stats
        assert (
            stats.completion_tokens == NEW_TOKENS
            and stats.prefill_ms > 0
            and stats.tokens_per_s > 0
        )


class CallOrder:
    """A backend with its submit and collect calls noted ("submit", "chain" where the
    input ids come from the previous call, "collect")."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def submit(self, ids, *args):
        self.calls.append("submit" if ids is not None else "chain")
        self.model.submit(ids, *args)

    def collect(self):
        self.calls.append("collect")
        return self.model.collect()


def test_greedy_decoding_keeps_one_call_ahead(cpu_model, tokenizer, hf_greedy):
    """Each greedy step after the first is submitted fed the previous call's next_token
    before the host collects that call: the host never holds the GPU up."""
    backend = CallOrder(cpu_model)
    run = Generator(backend, tokenizer, eos_ids=[]).start([PROMPTS[0]], greedy(5))
    list(run)
    assert run.completions[0].token_ids == hf_greedy[0][:5]
    assert backend.calls == ["submit", *["chain", "collect"] * 3, "collect"]


def test_a_row_that_ends_early_leaves_the_others_exact(cpu_model, tokenizer, hf_greedy):
    """A finished row keeps running on its own argmax (its outputs ignored); the other rows
    of the batch still give transformers' tokens."""
    eos = next(t for t in hf_greedy[1][2:] if t not in hf_greedy[0] + hf_greedy[2])
    run = Generator(cpu_model, tokenizer, eos_ids=[eos]).start(PROMPTS, greedy())
    list(run)
    ended = hf_greedy[1].index(eos)
    assert [c.token_ids for c in run.completions] == [
        hf_greedy[0],
        hf_greedy[1][:ended],
        hf_greedy[2],
    ]
    assert [c.finish_reason for c in run.completions] == ["length", "stop", "length"]


def test_leaving_a_greedy_stream_collects_the_call_in_flight(cpu_model, tokenizer):
    backend = CallOrder(cpu_model)
    stream = iter(Generator(backend, tokenizer, eos_ids=[]).start([PROMPTS[0]], greedy()))
    next(stream), next(stream)
    stream.close()
    assert backend.calls.count("collect") == backend.calls.count("submit") + backend.calls.count(
        "chain"
    )
    assert not cpu_model.pending


def test_sampled_steps_go_out_before_their_tokens_are_streamed(cpu_model, tokenizer):
    """Each sampled step's call is submitted, fed the tokens just drawn, while none of them
    has been streamed yet (the numbers: tokens streamed when each call went out); the
    tokens are those of a plain run; leaving the stream midway collects the call in flight.
    Llama 3's top-p without a top-k: drawn on the host (from the best K and log_normalizer)."""
    params = SamplingParams(max_new_tokens=5, temperature=0.6, top_p=0.9, seed=3)

    class Noted(CallOrder):
        def submit(self, ids, *args):
            self.calls.append(len(run.completions[0].token_ids))
            super().submit(ids, *args)

    backend = Noted(cpu_model)
    run = Generator(backend, tokenizer, eos_ids=[]).start([PROMPTS[0]], params)
    list(run)
    assert backend.calls == [
        0,
        "submit",
        *[x for k in (1, 2, 3) for x in ("collect", k, "submit")],
        "collect",
    ]
    plain = Generator(cpu_model, tokenizer, eos_ids=[]).start([PROMPTS[0]], params)
    list(plain)
    assert run.completions[0].token_ids == plain.completions[0].token_ids
    backend = CallOrder(cpu_model)
    stream = iter(Generator(backend, tokenizer, eos_ids=[]).start([PROMPTS[0]], params))
    next(stream), next(stream)
    stream.close()
    assert backend.calls == ["submit", "collect", "submit", "collect"]
    assert not cpu_model.pending


def test_seeded_sampling_is_reproducible(cpu_model, tokenizer):
    gen = Generator(cpu_model, tokenizer, eos_ids=[])
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    first = gen.start(PROMPTS[:2], params)
    list(first)
    second = gen.start(PROMPTS[:2], params)
    list(second)
    assert [c.token_ids for c in first.completions] == [c.token_ids for c in second.completions]
    other = gen.start(PROMPTS[:2], SamplingParams(max_new_tokens=12, temperature=1.0, seed=99))
    list(other)
    assert [c.token_ids for c in other.completions] != [c.token_ids for c in first.completions]


class WholeLogits:
    """The same model as an engine without top_logits/top_ids: sampling reads all logits."""

    sample_top_k = 0
    has_log_normalizer = False

    def __init__(self, model):
        self.model = model
        self.max_batch, self.max_seq_len = model.max_batch, model.max_seq_len
        self.max_prefill, self.rings = model.max_prefill, model.rings
        self.vocab_size = model.vocab_size
        self.reset, self.forward = model.reset, model.forward
        self.submit, self.collect = model.submit, model.collect


def test_sampling_drawn_in_the_engine_draws_what_the_whole_logits_draw(cpu_model, tokenizer):
    """Gemma-3's sampling (top-k 64, top-p 0.95) drawn in the engine (next_token, by the
    uniform numbers staged with each call) picks, for a seed, exactly the tokens the host
    samples from the whole vocabulary's logits, and keeps one call ahead as greedy decoding
    does."""
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=64, top_p=0.95, seed=7)
    backend = CallOrder(cpu_model)
    in_engine = Generator(backend, tokenizer, eos_ids=[]).start(PROMPTS, params)
    assert in_engine.readout.name == "argmax"
    list(in_engine)
    assert backend.calls == ["submit", *["chain", "collect"] * 14, "collect"]
    via_logits = Generator(WholeLogits(cpu_model), tokenizer, eos_ids=[]).start(PROMPTS, params)
    assert via_logits.readout.name == "logits"
    list(via_logits)
    tokens = [c.token_ids for c in in_engine.completions]
    assert tokens == [c.token_ids for c in via_logits.completions]
    assert all(len(t) == 16 for t in tokens)
    argmax = Generator(cpu_model, tokenizer, eos_ids=[]).start(PROMPTS, greedy(16))
    list(argmax)
    assert tokens != [c.token_ids for c in argmax.completions]  # drawn, not the argmax


def sample_both_ways(model, tokenizer, params: SamplingParams, wants: str) -> int:
    """Sample PROMPTS through the engine's best K and through the whole logits; the tokens
    must be the same. Returns how many steps fell back to the whole logits."""
    fallbacks = []
    last_logits = model.last_logits
    model.last_logits = lambda: fallbacks.append(1) or last_logits()
    try:
        via_top = Generator(model, tokenizer, eos_ids=[]).start(PROMPTS, params)
        assert via_top.readout.name == wants
        list(via_top)
    finally:
        del model.last_logits
    via_logits = Generator(WholeLogits(model), tokenizer, eos_ids=[]).start(PROMPTS, params)
    assert via_logits.readout.name == "logits"
    list(via_logits)
    tokens = [c.token_ids for c in via_top.completions]
    assert tokens == [c.token_ids for c in via_logits.completions]
    assert all(len(t) == params.max_new_tokens for t in tokens)
    return len(fallbacks)


@pytest.mark.parametrize("temperature", [0.6, 3.0])
def test_top_p_alone_from_the_best_k_draws_what_the_whole_logits_draw(
    cpu_model, tokenizer, temperature
):
    """Llama 3's sampling (top-p 0.9, no top-k) through top_logits/top_ids and log_normalizer.
    At T 0.6 the nucleus always lies in the best 64; at T 3.0 it never does, and each step
    falls back to the latest call's logits."""
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=0.9, seed=3)
    fallbacks = sample_both_ways(cpu_model, tokenizer, params, "top_p")
    assert fallbacks == (0 if temperature < 1 else 11)  # one per decode step


@pytest.mark.parametrize(("penalty", "top_k"), [(1.05, 20), (50.0, 64)])
def test_repetition_penalty_from_the_best_k_draws_what_the_whole_logits_draw(
    cpu_model, tokenizer, penalty, top_k
):
    """Qwen2.5's sampling (T 0.7, top-k 20, top-p 0.8, repetition penalty 1.05) through
    top_logits/top_ids with the penalty applied to them: the best 64 always decide. With a
    top-k of 64 and a penalty of 50, a repeated token among the best 64 falls below the 64th
    logit, so a token beyond them may enter the top 64: those steps use the whole logits."""
    params = SamplingParams(
        max_new_tokens=12,
        temperature=0.7,
        top_k=top_k,
        top_p=0.8,
        repetition_penalty=penalty,
        seed=5,
    )
    fallbacks = sample_both_ways(cpu_model, tokenizer, params, "top_k")
    assert (fallbacks == 0) if top_k < 64 else (fallbacks > 0)


def test_greedy_with_repetition_penalty_from_the_best_k(cpu_model, tokenizer):
    """Greedy decoding under a repetition penalty takes the best penalized logit among the
    best 64: the same tokens as the whole logits (the fallback: tests/runtime/test_sampling.py)."""
    params = SamplingParams(max_new_tokens=12, repetition_penalty=1.3)
    assert sample_both_ways(cpu_model, tokenizer, params, "top_k") == 0


def test_eos_ends_the_stream(cpu_model, tokenizer, hf_greedy):
    """Declaring the 5th greedy token an EOS id stops there, without emitting it."""
    eos = hf_greedy[0][4]
    run = Generator(cpu_model, tokenizer, eos_ids=[eos]).start([PROMPTS[0]], greedy())
    text = "".join(d.text for d in run)
    first_eos = hf_greedy[0].index(eos)
    assert run.completions[0].token_ids == hf_greedy[0][:first_eos]
    assert run.completions[0].finish_reason == "stop"
    assert text == tokenizer.decode(hf_greedy[0][:first_eos])


def test_stop_string_ends_the_stream_and_is_not_emitted(cpu_model, tokenizer, hf_greedy):
    full = tokenizer.decode(hf_greedy[0])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    run = Generator(cpu_model, tokenizer, eos_ids=[]).start([PROMPTS[0]], greedy(stop=(stop,)))
    text = "".join(d.text for d in run)
    assert text == full[: full.index(stop)]
    assert run.completions[0].finish_reason == "stop"


def test_too_long_prompt_is_refused_before_any_work(cpu_model, tokenizer):
    gen = Generator(cpu_model, tokenizer)
    prompt = "word " * 80
    n = len(tokenizer.encode(prompt))
    with pytest.raises(GenerationError) as err:
        gen.start([prompt], greedy(max_new_tokens=8))
    assert str(err.value) == (
        f"the prompt has {n} tokens; with max_new_tokens=8 that exceeds the engine's max_seq_len=64. "
        "Shorten the prompt, lower max_new_tokens, use an engine with a larger max_seq_len "
        "(--max-seq-len, up to the model's context, 32768), or allow truncation."
    )
    with pytest.raises(GenerationError) as err:  # of several, the error says which one
        gen.start(["Hello", prompt], greedy(max_new_tokens=8))
    assert str(err.value).startswith(f"prompt 1 has {n} tokens; ")
    run = gen.start([prompt], greedy(max_new_tokens=8), truncate=True)
    assert len(run.completions[0].prompt_ids) == 56


@pytest.fixture(scope="module")
def tiny_gen(tiny_dir, tmp_path_factory):
    """A Generator on the tiny llama (BOS 2, "w2"; word-level tokenizer) with 32 slots."""
    from tests.tools.cli import with_tokenizer

    folder = with_tokenizer(tiny_dir("llama"), tmp_path_factory.mktemp("m") / "model")
    options = NetworkOptions(dtype="float32", max_batch=1, max_seq_len=32, max_prefill=8)
    return Generator(
        CpuBackend(build_network(Checkpoint.open(folder), options)), Tokenizer.from_dir(folder)
    )


def test_truncation_keeps_the_bos_and_the_latest_tokens(tiny_gen):
    """--truncate cut ids[-limit:], dropping the BOS a model is trained to see first."""
    assert tiny_gen.tokenizer.bos_id == 2
    words = list(range(10, 60))
    params = greedy(max_new_tokens=8)  # 24 prompt tokens fit
    run = tiny_gen.start([[2, *words]], params, truncate=True)
    assert run.completions[0].prompt_ids == [2, *range(37, 60)]
    assert len(list(run)) > 0 and run.completions[0].stats.prompt_tokens == 24
    run = tiny_gen.start(["w2 " + " ".join(f"w{i}" for i in words)], params, truncate=True)
    assert run.completions[0].prompt_ids == [2, *range(37, 60)]
    # no BOS to keep: the latest tokens alone; a single slot holds the last token
    assert tiny_gen.start([words], params, truncate=True).completions[0].prompt_ids == words[-24:]
    one = greedy(max_new_tokens=31)
    assert tiny_gen.start([[2, *words]], one, truncate=True).completions[0].prompt_ids == [59]


def test_no_room_for_a_prompt_is_said_of_max_new_tokens(tiny_gen):
    """max_new_tokens >= max_seq_len: before, "the prompt has 1 tokens; ... Shorten the
    prompt, ... or allow truncation", also to a run that allowed it. And the larger
    max_seq_len is not told of as a rebuild: this CPU backend's comes from NetworkOptions
    (before: "rebuild with a larger --max-seq-len (up to the model's context, 256)")."""
    for truncate in (False, True):
        with pytest.raises(GenerationError) as err:
            tiny_gen.start(["w5"], greedy(max_new_tokens=32), truncate=truncate)
        assert str(err.value) == (
            "max_new_tokens=32 leaves no room for a prompt in the engine's max_seq_len=32: lower "
            "max_new_tokens below 32, or use an engine with a larger max_seq_len (--max-seq-len, "
            "up to the model's context, 256)."
        )


def test_an_engine_at_the_models_whole_context_is_not_told_to_grow(tiny_gen):
    """max_seq_len == max_position_embeddings, where netdef.options refuses a larger one:
    before, the errors still said to use a larger --max-seq-len."""
    options = NetworkOptions(dtype="float32", max_batch=1, max_seq_len=256, max_prefill=64)
    ckpt = Checkpoint.open(tiny_gen.tokenizer.source)
    whole = Generator(CpuBackend(build_network(ckpt, options)), tiny_gen.tokenizer)
    assert whole.backend.model_context == 256
    with pytest.raises(GenerationError) as err:
        whole.start([list(range(10, 260))], greedy(max_new_tokens=8))
    assert str(err.value) == (
        "the prompt has 250 tokens; with max_new_tokens=8 that exceeds the engine's "
        "max_seq_len=256, the model's whole context. Shorten the prompt, lower max_new_tokens, "
        "or allow truncation."
    )
    with pytest.raises(GenerationError) as err:
        whole.start(["w5"], greedy(max_new_tokens=300))
    assert str(err.value) == (
        "max_new_tokens=300 leaves no room for a prompt in the engine's max_seq_len=256, the "
        "model's whole context: lower max_new_tokens below 256."
    )


def test_too_many_prompts_are_refused(cpu_model, tokenizer):
    with pytest.raises(GenerationError) as err:
        Generator(cpu_model, tokenizer).start([*PROMPTS, "x"], greedy())
    assert str(err.value) == (
        "4 prompts exceed the engine's max batch of 3; send fewer at once, or use an engine with a larger max_batch (--max-batch)."
    )


@pytest.mark.parametrize(
    ("prompts", "shown"), [("Hi", "'Hi'"), ([2, 5, 7], "[2, 5, 7]"), (None, "None")]
)
def test_one_prompt_not_in_a_list_is_refused(prompts, shown, cpu_model, tokenizer):
    """A string or a list of ids is itself a sequence: taken as it was, "Hi" became two
    one-character prompts. None was a TypeError from iterating it."""
    with pytest.raises(GenerationError) as err:
        Generator(cpu_model, tokenizer).start(prompts, greedy())
    assert str(err.value) == (
        f"prompts is a list of prompts (each text, token ids or chat messages), not {shown}; "
        "wrap one prompt in a list: start([prompt], params)."
    )


@pytest.mark.parametrize(
    ("params", "shown"), [(None, "None"), ({"max_new_tokens": 4}, "{'max_new_tokens': 4}")]
)
def test_params_of_another_kind_are_one_clear_error(params, shown, cpu_model, tokenizer):
    """Before, an AttributeError from reading params.max_new_tokens."""
    with pytest.raises(GenerationError) as err:
        Generator(cpu_model, tokenizer).start(["Hi"], params)
    assert str(err.value) == f"params is a runtime.sampling.SamplingParams, not {shown}."


@pytest.mark.parametrize(
    ("prompt", "shown"),
    [(["Hi"], "['Hi']"), ([1.5, 2], "[1.5, 2]"), (None, "None"), ([True, 3], "[True, 3]")],
)
def test_a_prompt_of_another_kind_is_one_clear_error(prompt, shown, cpu_model, tokenizer):
    """Before, a list of strings went to the chat template and None to the tokenizer's
    TypeError."""
    with pytest.raises(GenerationError) as err:
        Generator(cpu_model, tokenizer).start([prompt], greedy())
    assert str(err.value) == (
        "a prompt is text, a list of token ids or a list of chat messages ({'role': ..., "
        f"'content': ...}}), not {shown}."
    )


@pytest.mark.parametrize("eos_ids", [1, "2", [1.5]])
def test_eos_ids_of_another_kind_are_one_clear_error(eos_ids, cpu_model, tokenizer):
    """Before, eos_ids=1 raised "'int' object is not iterable"."""
    with pytest.raises(GenerationError) as err:
        Generator(cpu_model, tokenizer, eos_ids=eos_ids)
    assert str(err.value) == f"eos_ids is a list of token ids, not {eos_ids!r}."
    assert Generator(cpu_model, tokenizer, eos_ids=(1, 2)).eos_ids == {1, 2}


def test_a_generator_of_other_arguments_is_one_clear_error(tiny_gen):
    """A network for the backend, the two arguments swapped or a folder for the tokenizer:
    before, an AttributeError ('DecoderNetwork' object has no attribute 'max_batch' at
    start(); 'CpuBackend' or 'str' object has no attribute 'eos_ids')."""
    backend, tokenizer = tiny_gen.backend, tiny_gen.tokenizer
    for args, shown in [
        (
            (backend.dn, tokenizer),
            "backend is a runtime backend: TensorRTBackend.load(artifact) "
            "or CpuBackend(network), not a DecoderNetwork.",
        ),
        (
            (tokenizer, backend),
            "backend is a runtime backend: TensorRTBackend.load(artifact) "
            "or CpuBackend(network), not a Tokenizer.",
        ),
        (
            (backend, tokenizer.source),
            "tokenizer is a runtime.tokenizer.Tokenizer: Tokenizer.from_dir(model_dir), not a str.",
        ),
    ]:
        with pytest.raises(GenerationError) as err:
            Generator(*args)
        assert str(err.value) == shown


def test_token_id_prompts_pass_through(cpu_model, tokenizer):
    assert Generator(cpu_model, tokenizer).encode([2, 5, 7], chat=False) == [2, 5, 7]


def test_token_ids_outside_the_vocabulary_are_refused_before_any_work(cpu_model, tokenizer):
    """Token-id prompts are checked against the engine's vocabulary: on TensorRT an id past
    it is an out-of-range gather (garbage or a crash). The error names the first 5 bad ids."""
    gen = Generator(cpu_model, tokenizer)
    vocab = cpu_model.vocab_size
    with pytest.raises(GenerationError) as err:
        gen.start([[2, vocab, 5]], greedy())
    assert str(err.value) == (
        f"token ids [{vocab}] in the prompt are outside the vocabulary [0, {vocab})."
    )
    bad = [vocab + 9, -1, 7, vocab, -1, vocab + 1, vocab + 2, vocab + 3, -8]
    with pytest.raises(GenerationError) as err:  # of several, the error says which one
        gen.start(["Hello", [2, 5], bad], greedy())
    assert str(err.value) == (
        f"token ids [-8, -1, {vocab}, {vocab + 1}, {vocab + 2}] in prompt 2 are outside the "
        f"vocabulary [0, {vocab})."
    )
    run = gen.start([[2, vocab - 1]], greedy(1))  # the last id is in
    assert run.completions[0].prompt_ids == [2, vocab - 1]


def test_a_run_is_one_stream(cpu_model, tokenizer, hf_greedy):
    """Iterating a run again goes on where it stopped: before, each iteration reset the
    caches and ran the batch anew into the same completions (a token twice)."""
    run = Generator(cpu_model, tokenizer, eos_ids=[]).start([PROMPTS[0]], greedy(4))
    assert iter(run) is iter(run)
    first = next(iter(run))
    rest = list(run)
    assert run.completions[0].token_ids == hf_greedy[0][:4]
    assert first.text + "".join(d.text for d in rest) == run.completions[0].text
    assert list(run) == []


@pytest.mark.parametrize(
    "params", [greedy(4), SamplingParams(max_new_tokens=4, temperature=0.6, top_p=0.9, seed=3)]
)
@pytest.mark.parametrize("generators", ["one generator", "two generators on one backend"])
def test_a_later_run_takes_the_backend_over(cpu_model, tokenizer, hf_greedy, params, generators):
    """A run left mid-stream while a later run on its backend goes: the later run gives
    its own tokens, whether the earlier one is then closed (before, its cleanup collected
    the later run's call in flight) or iterated (before, an IndexError from the backend;
    with a second Generator, before, the later run's tokens)."""
    gen = Generator(cpu_model, tokenizer, eos_ids=[])
    other = gen if generators == "one generator" else Generator(cpu_model, tokenizer, eos_ids=[])
    alone = gen.start([PROMPTS[1]], params)
    list(alone)
    left = iter(gen.start([PROMPTS[0]], params))
    next(left)
    later = iter(other.start([PROMPTS[1]], params))
    deltas = [next(later)]
    left.close()
    deltas += list(later)
    assert "".join(d.text for d in deltas) == alone.completions[0].text
    left = iter(gen.start([PROMPTS[0]], params))
    next(left)
    list(other.start([PROMPTS[1]], params))
    with pytest.raises(GenerationError) as err:
        next(left)
    assert str(err.value) == (
        "this run was interrupted: a later run on its backend took over the backend, which "
        "holds one batch at a time. Finish iterating a run before iterating the next, or send "
        "the prompts in one start()."
    )
    assert not cpu_model.pending


def test_a_cpu_backend_of_a_checkpoint_is_one_clear_error(gemma3_270m_dir):
    """Before: TensorRTModuleError "unknown backend 'weights'" from the executor."""
    with pytest.raises(TypeError) as err:
        CpuBackend(Checkpoint.open(gemma3_270m_dir))
    assert str(err.value) == (
        "CpuBackend runs a network: CpuBackend(netdef.build_network(checkpoint, options)), "
        "not a Checkpoint."
    )


def test_both_backends_have_every_method_of_the_protocol(tiny_gen):
    """`with backend:`, written for the GPU, was an AttributeError on the CPU backend."""
    from runtime.backend import Backend
    from runtime.tensorrt_backend import TensorRTBackend

    methods = {n for n, v in vars(Backend).items() if callable(v) and n not in vars(object)}
    assert {"__enter__", "__exit__", "close", "forward"} <= methods
    for cls in (CpuBackend, TensorRTBackend):
        assert [m for m in sorted(methods) if not hasattr(cls, m)] == [], cls.__name__
    with tiny_gen.backend as backend:
        assert backend is tiny_gen.backend
        run = tiny_gen.start(["w5 w6"], greedy(max_new_tokens=3))
        assert len(list(run)) > 0 and run.completions[0].stats.completion_tokens == 3


def test_a_backend_is_freed_once_its_runs_are_dropped(tiny_gen):
    """The registry of which run holds a backend kept the run, which refers to its backend,
    so every backend that ever ran a batch (its weights and caches) lived on for good."""
    import gc
    import weakref

    backend = CpuBackend(tiny_gen.backend.dn)
    run = Generator(backend, tiny_gen.tokenizer).start(["w5 w6"], greedy(max_new_tokens=3))
    left = iter(Generator(backend, tiny_gen.tokenizer).start(["w7"], greedy(max_new_tokens=3)))
    assert len(list(run)) > 0 and next(left)
    freed = weakref.ref(backend)
    del backend, run, left
    gc.collect()
    assert freed() is None


def test_a_run_left_early_shows_what_it_generated(tiny_gen):
    """After `break`, stats read zeros and finish_reason None; a closed run said nothing
    either. Now the stats follow each step, and `close()` ends the run as "cancelled"."""
    run = tiny_gen.start(["w5 w6"], greedy(max_new_tokens=10), truncate=False)
    c = run.completions[0]
    for i, _ in enumerate(run):
        if i == 2:
            break
    assert c.finish_reason is None and len(c.token_ids) == 3
    assert c.stats.completion_tokens == 3 and c.stats.prefill_ms > 0 and c.stats.decode_ms > 0
    run.close()
    assert c.finish_reason == "cancelled" and c.stats.completion_tokens == 3
    assert list(run) == []  # closed: nothing more
    whole = tiny_gen.start(["w5 w6"], greedy(max_new_tokens=10))
    text = "".join(d.text for d in whole)
    assert whole.completions[0].token_ids[:3] == c.token_ids and text.startswith(c.text)
    assert whole.completions[0].finish_reason == "length"
