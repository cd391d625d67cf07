"""Build-time choices for a decoder network: checked on creation, then once against the model config."""

from __future__ import annotations

from dataclasses import dataclass

from weights.config import ModelConfig, is_int

from .contract import (
    DEFAULT_DTYPE,
    GLOBAL_POSITIONS,
    MODEL_DTYPES,
    PROFILE_SETS,
    SAMPLING_INPUTS,
    TOKEN_INPUTS,
    WINDOW_POSITIONS,
    normalize_target,
    past,
)
from .quant import INT4_BLOCKS, MODES, NO_FP8_TARGETS, int4_block
from .slots import attention_window, layer_windows, ring_length

Shape = tuple[int, ...]
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in MODEL_DTYPES.items()}


def kv_slot_bytes(config: ModelConfig, dtype: str) -> int:
    """Bytes one position takes in one layer's KV cache: its key and its value."""
    return 2 * config.num_kv_heads * config.head_dim * DTYPE_BYTES[dtype]


TOPK_MAX = 3840  # the largest k ITopKLayer supports
TOPK_BLOCK = 4096  # logits per block of the passes over the vocabulary; >= TOPK_MAX
# Attention scores [batch, heads, prefill tokens, cache slots] of one prefill call, float32 in
# device memory (netdef.decoder.attend): the default --max-prefill keeps them to 4 GiB. (The
# Llama-3.2-1B shape at batch 16 and 4,096 x 4,096 would need 34 GiB.)
SCORES_DEFAULT = 1 << 30
# The default --max-prefill of models with sliding windows, in windows: a ring of 5 windows
# (2,559 slots for Gemma-3's 512) costs decode nothing (it reads the window) and prefills in
# chunks of 2,048 (85k tokens/s for the Gemma-3-1B shape on an H200, 70k at 512).
RING_PREFILL = 4
# The default global_opt: the global_positions length the profiles are tuned for, and with
# decode_long the longest the decode profile takes (NetworkOptions.profiles). TensorRT-RTX
# picks the global layers' attention kernels for it: on an H100, Gemma-3-1B shape with a
# 32,768-slot cache, tuned for 1,024 a batch-1 step took 2.08 ms after 4,000 cached tokens
# and 3.68 after 30,000; tuned for 4,096, 1.96 and 2.97, the same 1.85 after 128; tuned for
# 32,768, 1.97 and 2.21, but 2.05 after 128.
GLOBAL_OPT = 4096


def default_max_seq_len(config: ModelConfig) -> int:
    """The model's own context: sliding layers' KV rings keep long contexts affordable."""
    return config.max_position_embeddings


def default_max_prefill(config: ModelConfig, max_batch: int, max_seq_len: int) -> int:
    """The longest prompt chunk (a power of two, at most max_seq_len) whose attention scores
    stay within SCORES_DEFAULT and, with sliding layers, at most RING_PREFILL windows: their
    KV rings hold window + max_prefill - 1 slots (netdef.slots.ring_length)."""
    fit = SCORES_DEFAULT // (max_batch * config.num_heads * max_seq_len)
    windows = layer_windows([lc.sliding_window for lc in config.layers], max_seq_len)
    if (window := attention_window(windows)) is not None:
        fit = min(fit, RING_PREFILL * window)
    return min(max_seq_len, 1 << max(fit, 1).bit_length() - 1)


class OptionsError(ValueError):
    """A build option the network cannot honour; raised before any build work. `field`
    names the option where the error is about one alone, so a CLI can name its flag."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def check_quant_target(quant: str, target: str | None) -> None:
    """Refuse fp8 for a GPU target without FP8 matmuls, before any build work."""
    if quant != "fp8" or target is None:
        return
    if normalize_target(target) in NO_FP8_TARGETS:
        raise OptionsError(
            f"fp8 needs FP8 matrix multiplies, which TensorRT-RTX has on compute capability 8.9 "
            f"and newer (sm89, sm120, sm121); target {target} has none. Choose int8-wo or "
            "int4-wo for it."
        )


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) shape of every dynamic input."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]


@dataclass(frozen=True)
class NetworkOptions:
    """A network's build options. What needs no model config is checked on creation (an
    OptionsError, naming its field where it is about one alone); `validate(config)` checks the
    rest against the model, before any build work."""

    dtype: str = DEFAULT_DTYPE
    max_batch: int = 1
    max_seq_len: int = 4096  # KV-cache length: prompt + generated tokens of one sequence
    max_prefill: int | None = None  # longest S in one call; default max_seq_len
    prefill_opt: int | None = None  # S the prefill profile is tuned for; default min(512, max)
    decode_opt: int | None = None  # B the decode profile is tuned for; default 1
    global_opt: int = GLOBAL_OPT  # global_positions the profiles are tuned for
    decode_long: bool = False  # decode takes 1..global_opt global positions, decode-long the rest
    profile_set: str = PROFILE_SETS[0]  # one of PROFILE_SETS
    all_logits: bool = False  # logits for every position (tests), not only last_token_index
    quant: str = "none"  # weight quantization of the linear layers: netdef.quant.MODES
    quant_lm_head: bool = False  # quantize the LM head too (a tied one with the embedding)
    sample_top_k: int = 64  # best logits, ids and log-normalizer also output; 0: none

    @property
    def prefill_len(self) -> int:
        return self.max_seq_len if self.max_prefill is None else self.max_prefill

    def __post_init__(self) -> None:
        """The checks that need no model config: a library's NetworkOptions(max_seq_len="256")
        or dtype="fp16" is refused where it is written, not at build_network."""
        optional = ("max_prefill", "prefill_opt", "decode_opt")
        for name in ("max_batch", "max_seq_len", *optional, "global_opt", "sample_top_k"):
            value = getattr(self, name)
            if not (is_int(value) or (value is None and name in optional)):
                kind = "an integer or None" if name in optional else "an integer"
                # else a TypeError from a comparison, or from TensorRT's shapes for a float
                raise OptionsError(f"{name}={value!r} must be {kind}.", name)
        if not isinstance(self.dtype, str) or self.dtype not in MODEL_DTYPES:  # keys: hashable
            raise OptionsError(
                f"dtype {self.dtype!r} is not supported; choose bfloat16, float16 or float32."
            )
        if self.max_batch < 1:
            raise OptionsError(f"max_batch={self.max_batch} must be at least 1.", "max_batch")
        if self.max_seq_len < 1:
            raise OptionsError(f"max_seq_len={self.max_seq_len} must be at least 1.", "max_seq_len")
        if not 1 <= self.prefill_len <= self.max_seq_len:
            raise OptionsError(
                f"max_prefill={self.max_prefill} must be between 1 and max_seq_len={self.max_seq_len}.",
                "max_prefill",
            )
        if self.prefill_opt is not None and not 1 <= self.prefill_opt <= self.prefill_len:
            raise OptionsError(
                f"prefill_opt={self.prefill_opt} must be between 1 and max_prefill={self.prefill_len}.",
                "prefill_opt",
            )
        if self.decode_opt is not None and not 1 <= self.decode_opt <= self.max_batch:
            raise OptionsError(
                f"decode_opt={self.decode_opt} must be between 1 and max_batch={self.max_batch}.",
                "decode_opt",
            )
        if self.global_opt < 1:
            raise OptionsError(f"global_opt={self.global_opt} must be at least 1.")
        if self.profile_set not in PROFILE_SETS:
            choices = ", ".join(repr(s) for s in PROFILE_SETS[:-1])
            raise OptionsError(
                f"profiles {self.profile_set!r} is not supported; choose {choices} or "
                f"{PROFILE_SETS[-1]!r}."
            )
        if self.quant not in MODES:
            raise OptionsError(
                f"quant {self.quant!r} is not supported; choose none, int8-wo, int4-wo, fp8 or "
                "from-gguf."
            )
        if self.quant_lm_head and self.quant == "from-gguf":
            raise OptionsError(
                "quant_lm_head does not apply to from-gguf, which keeps the GGUF quantization of "
                "the linear layers only (the embedding and LM head stay unquantized)."
            )
        if self.quant_lm_head and self.quant == "none":
            raise OptionsError("quant_lm_head needs a quantization mode (--quant).")

    def validate(self, config: ModelConfig) -> None:
        """The checks against the model's config (the rest ran on creation)."""
        if self.max_seq_len > config.max_position_embeddings:
            raise OptionsError(
                f"max_seq_len={self.max_seq_len} is outside what the model supports "
                f"(1..max_position_embeddings={config.max_position_embeddings}); choose a smaller --max-seq-len."
            )
        if self.decode_long and (problem := self.why_not_decode_long(config)):
            raise OptionsError(problem)
        if not 0 <= self.sample_top_k <= min(TOPK_MAX, config.vocab_size):
            raise OptionsError(
                f"sample_top_k={self.sample_top_k} must be between 0 and "
                f"{min(TOPK_MAX, config.vocab_size)} (TensorRT's TopK takes k <= {TOPK_MAX}).",
                "sample_top_k",
            )
        self._validate_quant(config)

    def caveats(self, config: ModelConfig) -> list[str]:
        """What is valid but likely not meant: the tools say it as a warning, once."""
        if self.dtype == "float16" and config.float16_overflows:
            return ["Gemma-3 activations overflow float16; expect inf/NaN logits. Use bfloat16."]
        return []

    def why_not_decode_long(self, config: ModelConfig) -> str | None:
        """Why decode_long cannot apply to this model with these options (the error a build
        asking for it gets), or None where it can."""
        if None not in self.windows(config):
            return (
                "decode_long applies to global attention layers, and every layer of this model "
                "attends a sliding window; build without --decode-long."
            )
        if self.max_seq_len <= self.global_opt:
            return (
                f"decode_long needs max_seq_len above global_opt={self.global_opt} (decode "
                f"takes up to {self.global_opt} global positions already); build without "
                "--decode-long or with a longer --max-seq-len."
            )
        if "decode" not in self.profile_set.split(","):
            return (
                f"decode_long needs the decode profile, which profiles {self.profile_set!r} "
                "lacks; build without --decode-long or with another --profiles."
            )
        return None

    def _validate_quant(self, config: ModelConfig) -> None:
        tied = config.tie_word_embeddings
        if self.quant_lm_head and tied and self.quant != "int4-wo":
            # Measured: TensorRT folds an INT8/FP8 table that the embedding lookup also reads
            # back into a model-dtype constant, so the engine would only lose accuracy.
            raise OptionsError(
                f"quant_lm_head with {self.quant} needs an untied LM head: this model's head is "
                "its embedding table, which TensorRT keeps in the model dtype for the embedding "
                "lookup. Use int4-wo, or leave the LM head unquantized."
            )
        if self.quant == "int4-wo" and self.int4_block(config) is None:
            name, n = next((k, n) for k, n in self._quantized_inputs(config).items() if n % 32)
            raise OptionsError(
                f"int4-wo quantizes weights in blocks of {', '.join(map(str, INT4_BLOCKS))} "
                f"inputs, but {name} has {n} inputs, a multiple of none of them; choose int8-wo "
                "or fp8."
            )

    def int4_block(self, config: ModelConfig) -> int | None:
        """int4-wo's block size for this model: the largest of INT4_BLOCKS that divides the
        input size of every weight it quantizes (None under other modes, or if none does)."""
        if self.quant != "int4-wo":
            return None
        return int4_block(list(self._quantized_inputs(config).values()))

    def _quantized_inputs(self, config: ModelConfig) -> dict[str, int]:
        """The input size of every weight the mode quantizes, by tensor name."""
        head = "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        return {
            name: shape[1]
            for name, shape in config.tensor_shapes().items()
            if name.endswith("_proj.weight") or (self.quant_lm_head and name == head)
        }

    def windows(self, config: ModelConfig) -> list[int | None]:
        """Each layer's sliding window as the network applies it (netdef.slots.layer_windows)."""
        return layer_windows([lc.sliding_window for lc in config.layers], self.max_seq_len)

    def cache_slots(self, config: ModelConfig) -> list[int]:
        """KV-cache slots of each layer: max_seq_len, or a sliding layer's ring
        (netdef.slots.ring_length)."""
        return [ring_length(w, self.max_seq_len, self.prefill_len) for w in self.windows(config)]

    def kv_bytes(self, config: ModelConfig) -> int:
        """Bytes of one sequence's KV caches (keys and values of every layer)."""
        return kv_slot_bytes(config, self.dtype) * sum(self.cache_slots(config))

    def profiles(self, config: ModelConfig) -> list[Profile]:
        """decode: S = 1, B = 1..max_batch (1..2 at max_batch 1: with one row only, the
        builder kept a second copy of the MLP's [in, out] weights for the decode matmuls,
        `_Decoder.mlp`), tuned for decode_opt sequences; prefill: S = 1..max_prefill; in the
        default set also chunk: exactly one sequence of max_prefill tokens (a long prompt's
        full chunks; none where max_prefill is 1, a decode step). 'dynamic' is one profile
        for every call. window_positions (netdef.slots) ranges up to what such calls read;
        global_positions up to max_seq_len, tuned for global_opt positions. With decode_long,
        decode takes 1..global_opt of them and decode-long, a copy of it, the rest, tuned for
        max_seq_len: one set of global attention kernels was never the fastest for both short
        and long contexts (GLOBAL_OPT). On an H100, Gemma-3-1B shape: 2.22 ms against 2.87
        after 30,000 cached tokens, the same below (docs/benchmarks.md); runtime.build turns
        it on where it applies (`why_not_decode_long`).

        Why the chunk profile: TensorRT-RTX picks its matmul kernels from a profile's shape
        ranges. Where the token count is fixed it took Hopper kernels on an H200 that ran a
        2,048-token prefill's matmuls 1.5x faster than the kernels it takes for a range
        (docs/benchmarks.md). More fixed lengths (128 and 512 tokens, shorter prompts padded
        up to them) ran those prompts up to 1.9x faster on an H100 but slowed the Gemma-3-1B
        shape's batch-16 decode steps from 2.25 to 2.42 ms, so there is one (2026-12-07).
        Decode is tuned for one sequence by default: tuned for 16, an H200 ran a batch-1 step
        of the Gemma-3-1B shape in 2.18 ms instead of 1.98, and after 4,000 cached tokens in
        2.39 instead of 1.99 (its softmax and norms on kernels for 16 rows); batch-16 steps
        took 2.46 against 2.47 ms, and 2.99-3.18 against 3.19."""
        b, s_max, cache_len = self.max_batch, self.prefill_len, self.max_seq_len
        s_opt = self.prefill_opt or min(512, s_max)
        decode = ((1, self.decode_opt or 1, max(b, 2)), (1, 1, 1))
        spans = {  # profile: (batch, tokens) as (min, opt, max)
            "decode": decode,
            "decode-long": decode,
            "prefill": ((1, 1, b), (1, s_opt, s_max)),
            "chunk": ((1, 1, 1), (s_max, s_max, s_max)),
            "dynamic": ((1, 1, b), (1, s_opt, s_max)),
        }
        windows = self.windows(config)
        g_opt = min(cache_len, self.global_opt)
        names = [n for n in self.profile_set.split(",") if n != "chunk" or s_max > 1]
        if self.decode_long:
            names.insert(names.index("decode") + 1, "decode-long")
        ranges = [(n, *spans[n]) for n in names]
        window = attention_window(windows)
        slots = self.cache_slots(config)
        out = []
        for name, batch, seq in ranges:
            tokens = tuple((bb, ss) for bb, ss in zip(batch, seq))
            ids, positions, last = TOKEN_INPUTS
            shapes: dict[str, tuple[Shape, Shape, Shape]] = {
                ids: tokens,
                positions: tokens,
                last: tuple((bb,) for bb in batch),
            }
            if self.sample_top_k and not self.all_logits:
                shapes.update({n: tuple((bb,) for bb in batch) for n in SAMPLING_INPUTS})
            for i, n in enumerate(slots):
                cache = (2 * config.num_kv_heads, n, config.head_dim)
                shapes[past(i)] = tuple((bb, *cache) for bb in batch)
            if window is not None:
                lengths = [min(window + ss - 1, cache_len) for ss in seq]
                lengths[0] = 1
                shapes[WINDOW_POSITIONS] = tuple((bb, n) for bb, n in zip(batch, lengths))
            if name == "decode" and self.decode_long:
                shapes[GLOBAL_POSITIONS] = ((1,), (g_opt,), (g_opt,))
            elif name == "decode-long":
                shapes[GLOBAL_POSITIONS] = ((g_opt + 1,), (cache_len,), (cache_len,))
            elif None in windows:
                shapes[GLOBAL_POSITIONS] = ((1,), (g_opt,), (cache_len,))
            out.append(Profile(name, shapes))
        return out
