"""The shared decoder skeleton: one function builds Gemma-3, Llama, Qwen2 and Qwen3.

Families differ only through `ModelConfig` fields (norm offset, qk-norm, biases, sandwich
norms, activation, embedding scale, per-layer window and RoPE); there is no per-family
branch here beyond reading those fields. Quantization (`options.quant`) happens in
`Graph.linear` and `Graph.weight`; the skeleton only says whether the LM head (with a tied
head, the embedding table) is quantized too.

Engine I/O contract (netdef.contract names the tensors; docs/architecture.md has the table):
  inputs   input_ids        int32 [B, S]   new tokens, right-padded
           position_ids     int32 [B, S]   cache slot of each token; row b is p_b, p_b+1, ...
           last_token_index int32 [B]      which of the S tokens to return logits for
           inv_temperature  float32 [B]    1 / sampling temperature  } with sample_top_k > 0:
           uniform          float32 [B]    next_token's draw, < 0: argmax } next_token's draw
           top_k, top_p     int32, float32 [B]   its filters (1..K, (0, 1]) } (`draw`)
           window_positions int32 [B, Lw]  positions sliding layers read (netdef.slots)
           global_positions int32 [Lg]     positions global layers read (netdef.slots)
           past_kv_<i>      dtype [B, 2 * kv_heads, slots_i, head_dim]: keys then values;
                            slots_i is max_seq_len, or a sliding layer's ring (netdef.slots)
  outputs  logits           float32 [B, vocab]   ([B, S, vocab] with all_logits)
           next_token       int32 [B]            argmax of logits, or drawn (not with all_logits)
           top_logits       float32 [B, K]       the K = sample_top_k best logits, best first
           top_ids          int32 [B, K]         their token ids (both not with all_logits)
           log_normalizer   float32 [B]          log sum exp(logits * inv_temperature), with them
           present_kv_<i>   the same memory as past_kv_<i>, updated in place
Token (b, s) is written to cache slot position_ids[b, s] (mod the ring on sliding layers)
and attends to positions j <= position_ids[b, s] (and j > position_ids[b, s] - window on
sliding layers), so padded tails and stale slots beyond a sequence's end are never read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from weights.config import ModelConfig

from . import contract as io
from .contract import MODEL_DTYPES, SAMPLING_INPUTS, TENSOR_DTYPES, trt_dtype
from .graph import Graph, stacked
from .options import TOPK_BLOCK, NetworkOptions, OptionsError, Profile
from .quant import QuantizedWeight
from .rope import cos_sin_tables
from .slots import attention_window
from .tensorrt_module import load_tensorrt


class WeightSource:
    """What the skeleton reads weights from: `weights.Checkpoint` satisfies it. `release`
    (optional) tells the source that the network holds its own copy of a tensor and does not
    read it again."""

    config: ModelConfig

    def tensor(self, name: str) -> np.ndarray: ...

    def release(self, name: str) -> None: ...


@dataclass
class DecoderNetwork:
    """A built `INetworkDefinition` plus what is needed to build or execute it."""

    trt: ModuleType
    builder: Any
    network: Any
    config: ModelConfig
    options: NetworkOptions
    profiles: list[Profile]
    graph: Graph = field(repr=False)  # holds the weight arrays TensorRT points into

    @property
    def window(self) -> int | None:
        """The sliding window `window_positions` covers (netdef.slots), or None."""
        return attention_window(self.options.windows(self.config))

    @property
    def has_global(self) -> bool:
        """Whether a layer attends to the whole context (and reads `global_positions`)."""
        return None in self.options.windows(self.config)

    @property
    def kv_cache_shapes(self) -> list[tuple[int, int, int]]:
        """[2 * kv_heads, slots, head_dim] of each layer's past/present tensor (after the batch
        dim): slots is max_seq_len, or a sliding layer's ring."""
        cfg = self.config
        return [(2 * cfg.num_kv_heads, n, cfg.head_dim) for n in self.options.cache_slots(cfg)]


def build_network(
    source: WeightSource,
    options: NetworkOptions,
    trt: ModuleType | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    act_amax: Mapping[str, float] | None = None,
    spill: Path | None = None,
) -> DecoderNetwork:
    """Define the whole decoder on a fresh strongly typed network (no engine is built yet).

    `on_layer(done, total)` is called after each decoder layer, for progress bars. fp8 needs
    `act_amax`, each linear layer's input amax from `runtime.calibration.activation_amax`.
    `spill`, a folder on disk, holds the weights the network transposes while the network
    lives (`Graph.transposed`); an engine build passes one to need less memory.
    """
    if not hasattr(source, "tensor"):  # a path, say: else an AttributeError from deep inside
        raise TypeError(
            "build_network reads weights from a weights.Checkpoint: "
            f"build_network(Checkpoint.open(folder), options), not {source!r:.60}."
        )
    if not isinstance(options, NetworkOptions):
        raise TypeError(f"options is a netdef.NetworkOptions, not {options!r:.60}.")
    config = source.config
    options.validate(config)
    if options.quant == "from-gguf" and not hasattr(source, "quantized"):
        raise OptionsError(
            "from-gguf needs the GGUF file's own quantization (weights.gguf_quant.GGUFQuantized), "
            "not a plain checkpoint."
        )
    if options.quant == "fp8" and act_amax is None:
        raise OptionsError(
            "fp8 needs activation ranges from a calibration pass "
            "(runtime.calibration.activation_amax)."
        )
    trt = trt or load_tensorrt()
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    g = Graph(trt, network, options.quant, act_amax, options.int4_block(config), spill)
    _Decoder(g, source, options, on_layer).define()
    return DecoderNetwork(trt, builder, network, config, options, options.profiles(config), g)


class _Decoder:
    def __init__(self, g: Graph, source: WeightSource, options: NetworkOptions, on_layer=None):
        self.g, self.w, self.opt, self.cfg = g, source.tensor, options, source.config
        self.source = source
        self.on_layer = on_layer
        self.dtype = MODEL_DTYPES[options.dtype]
        self.rope_tables: dict[Any, tuple[Any, Any]] = {}

    def weight(self, name: str) -> np.ndarray:
        """A checkpoint tensor in the network dtype (zero-copy when it already is)."""
        return np.asarray(self.w(name)).astype(self.dtype, copy=False)

    def linear(
        self,
        x: Any,
        names: list[str],
        bias: np.ndarray | None,
        name: str,
        quantize: bool = True,
        in_out: bool = False,
    ) -> Any:
        """x through the linear layer of checkpoint weights `names` ([out, in] each; several
        are fused along out into one matmul). The network reads unquantized weights of the
        network dtype in place (fused ones too where they lie back to back: `stacked`)
        unless `in_out` stores them transposed (`Graph.linear`); every other one it holds
        as its own copy (fused, transposed, converted or quantized), so the source may drop
        those pages now (`Checkpoint.release`) instead of keeping them resident through the
        engine build."""
        parts = [self.weight(n) for n in names]
        weight = parts[0] if len(parts) == 1 else stacked(parts)
        kept = self.kept(names) if quantize else None
        y = self.g.linear(x, weight, bias, name, quantize, kept=kept, in_out=in_out)
        stored = self.g.constants[f"{self.g.scope}{name}.weight"]
        release = getattr(self.source, "release", None)
        for n in names if release else ():
            if not np.may_share_memory(stored, self.w(n)):
                release(n)
        return y

    def kept(self, names: list[str]) -> QuantizedWeight | None:
        """Under from-gguf, the file's own INT8 blocks of the fused weight `names` (the source's
        `quantized`), if every part has them at one block size; else None (unquantized)."""
        if self.opt.quant != "from-gguf":
            return None
        parts = [self.source.quantized(name) for name in names]
        if any(p is None for p in parts) or len({s.shape[1] for _, s in parts}) != 1:
            return None  # same input size, so the same number of scales means the same block
        return QuantizedWeight(
            np.concatenate([v for v, _ in parts]), np.concatenate([s for _, s in parts])
        )

    def define(self) -> None:
        g, cfg, trt = self.g, self.cfg, self.g.trt
        net = g.network
        self.input_ids = net.add_input(io.INPUT_IDS, trt.int32, (-1, -1))
        self.positions = net.add_input(io.POSITION_IDS, trt.int32, (-1, -1))
        last_index = net.add_input(io.LAST_TOKEN_INDEX, trt.int32, (-1,))
        # Write index of each sequence = position of its first new token.
        first = g.constant(np.array([0], dtype=np.int32), "write_index.col")
        first_pos = g.named(
            net.add_gather(self.positions, first, 1), "write_index.gather"
        ).get_output(0)
        self.write_index = g.shuffle(first_pos, "write_index", reshape=(-1,))
        self.positions64 = g.cast(self.positions, np.dtype(np.int64), "position_ids.int64")
        self.call_rows()
        self.windows = self.opt.windows(cfg)
        self.cache_slots = self.opt.cache_slots(cfg)
        self.slots: dict[int | None, tuple[Any, Any]] = {}  # window -> (slots, masks)
        self.ring_index: dict[int, Any] = {}  # ring length -> write index mod it
        if attention_window(self.windows) is not None:
            self.window_positions = net.add_input(io.WINDOW_POSITIONS, trt.int32, (-1, -1))
        if None in self.windows:
            self.global_positions = net.add_input(io.GLOBAL_POSITIONS, trt.int32, (-1,))

        # A tied LM head reads this table too, so it is quantized with the head.
        quantize_table = cfg.tie_word_embeddings and self.opt.quant_lm_head
        embed = g.weight(self.weight("embed_tokens.weight"), "embed_tokens", quantize_table)
        h = g.named(net.add_gather(embed, self.input_ids, 0), "embed_tokens").get_output(0)
        if cfg.embedding_scale is not None:
            h = g.mul(
                h, g.scalar(cfg.embedding_scale, self.dtype, 3, "embed_scale.value"), "embed_scale"
            )

        for i in range(cfg.num_layers):
            g.scope = f"layers.{i}."
            h = self.layer(i, h)
            if self.on_layer:
                self.on_layer(i + 1, cfg.num_layers)
        g.scope = ""

        if not self.opt.all_logits:  # only the requested token per sequence reaches the head
            gather = net.add_gather(h, last_index, 1)
            gather.num_elementwise_dims = 1
            h = g.named(gather, "last_token").get_output(0)
        h = self.rms_norm(h, self.w("norm.weight"), "norm")
        if cfg.tie_word_embeddings:
            head = embed  # the same constant: the engine stores the table once
            logits = self.head_matmul(h, head)
        else:
            logits = self.linear(h, ["lm_head.weight"], None, "lm_head", self.opt.quant_lm_head)
        head_logits = logits  # in the network's dtype
        logits = g.cast(logits, np.dtype(np.float32), "logits.float32")
        if cfg.final_logit_softcap:
            cap = float(cfg.final_logit_softcap)
            rank = len(logits.shape)
            logits = g.mul(
                logits, g.scalar(1.0 / cap, np.float32, rank, "softcap.inv"), "softcap.div"
            )
            logits = g.activation(logits, "TANH", "softcap.tanh")
            logits = g.mul(logits, g.scalar(cap, np.float32, rank, "softcap.cap"), "softcap.mul")
        logits.name = io.LOGITS
        net.mark_output(logits)
        if self.opt.all_logits:
            return
        # Decoding copies one id per sequence, not the vocabulary: the argmax, or a token drawn
        # in the engine (`draw`); host-side sampling copies the best K logits and ids.
        if self.opt.sample_top_k:
            # The argmax is the first of the best K: no second pass over the vocabulary.
            lines = self.vocab_blocks(head_logits, logits)
            values, ids = self.best_k(lines, self.opt.sample_top_k)
            first = g.constant(np.zeros(1, np.int32), "next_token.first")
            best = g.named(net.add_gather(values, first, 1), "next_token.best").get_output(0)
            argmax = g.named(net.add_gather(ids, first, 1), "next_token.first_id").get_output(0)
            next_token = g.shuffle(argmax, "next_token.argmax", reshape=(-1,))
            for t, name in ((values, io.TOP_LOGITS), (ids, io.TOP_IDS)):
                t.name = name
                net.mark_output(t)
            inputs = {
                n: net.add_input(n, trt_dtype(trt, TENSOR_DTYPES[d]), (-1,))
                for n, d in SAMPLING_INPUTS.items()
            }
            cols = {n: g.shuffle(t, f"{n}.col", reshape=(-1, 1)) for n, t in inputs.items()}
            peak = self.log_normalizer(lines, best, cols[io.INV_TEMPERATURE])
            drawn = self.draw(values, ids, peak, cols)
            greedy = g.elementwise(
                inputs[io.UNIFORM],
                g.scalar(0.0, np.float32, 1, "draw.greedy.zero"),
                "LESS",
                "draw.greedy",
            )
            next_token = g.named(net.add_select(greedy, next_token, drawn), "draw.select")
            next_token = next_token.get_output(0)
        else:
            top = g.named(net.add_topk(logits, trt.TopKOperation.MAX, 1, 1 << 1), "next_token.topk")
            next_token = g.shuffle(top.get_output(1), "next_token.argmax", reshape=(-1,))
        next_token.name = io.NEXT_TOKEN
        net.mark_output(next_token)

    def vocab_blocks(self, head: Any, logits: Any) -> Any:
        """float32 logits [B, blocks, TOPK_BLOCK] from the head's output `head` [B, vocab] (the
        network dtype), padded with -inf; the float32 `logits` the engine returns where one
        block holds the vocabulary (as they are) or a soft-cap changed them after the head.
        The passes over the vocabulary (`best_k`, `log_normalizer`) then spread over the row
        blocks, not one line per sequence: the log-normalizer of 16 rows of 262,144 took
        119 us as lines, 15 us in blocks (H100, TensorRT-RTX 1.7). Cast after the reshape:
        cast before it, the builder fused the cast into the head's matmul (a runtime fusion)
        and every decode step took 0.15 ms longer for the same kernels."""
        g, blocks = self.g, -(-self.cfg.vocab_size // TOPK_BLOCK)
        if blocks == 1:
            return logits
        x = logits if self.cfg.final_logit_softcap else head
        if blocks * TOPK_BLOCK > self.cfg.vocab_size:
            x = g.pad_last(x, blocks * TOPK_BLOCK, float("-inf"), "sample.pad")
        x = g.shuffle(x, "sample.blocks", reshape=(0, blocks, TOPK_BLOCK))
        return g.cast(x, np.dtype(np.float32), "sample.float32")

    def best_k(self, lines: Any, k: int) -> tuple[Any, Any]:
        """The k largest logits [B, k] (best first) and their int32 ids from `vocab_blocks`, in
        two stages: the best k of each block, then the best k of those. One TopK over a
        262,144-wide line took 818 us on an H200 (TensorRT-RTX 1.7), the two stages 25 us;
        the result is the same, since every one of the best k is among its block's best k."""
        g, trt = self.g, self.g.trt
        if len(lines.shape) == 2:
            top = g.named(
                g.network.add_topk(lines, trt.TopKOperation.MAX, k, 1 << 1), "sample.topk"
            )
            return top.get_output(0), top.get_output(1)
        blocks = lines.shape[1]
        first = g.named(
            g.network.add_topk(lines, trt.TopKOperation.MAX, k, 1 << 2), "sample.topk_blocks"
        )
        offsets = g.constant(
            (np.arange(blocks, dtype=np.int32) * TOPK_BLOCK).reshape(1, blocks, 1), "sample.offsets"
        )
        ids = g.shuffle(
            g.add(first.get_output(1), offsets, "sample.block_ids"), "sample.ids", reshape=(0, -1)
        )
        values = g.shuffle(first.get_output(0), "sample.values", reshape=(0, -1))
        second = g.named(
            g.network.add_topk(values, trt.TopKOperation.MAX, k, 1 << 1), "sample.topk"
        )
        pick = g.network.add_gather(ids, second.get_output(1), 1)
        pick.num_elementwise_dims = 1
        return second.get_output(0), g.named(pick, "sample.top_ids").get_output(0)

    def log_normalizer(self, lines: Any, best: Any, inv_t: Any) -> Any:
        """log_normalizer[b] = log sum_v exp(logits[b, v] * inv_temperature[b]) over
        `vocab_blocks`: with it, top-p sampling without a top-k can also use the best K
        whenever they hold top_p of the mass. Shifted by the best logit `best` [B, 1] (times
        inv_temperature > 0, the same float as the largest product), not by another pass over
        the vocabulary; summed per block, then over the blocks. Returns that shift, the
        largest scaled logit [B, 1], which `draw` shares."""
        g, net = self.g, self.g.network
        peak = g.mul(best, inv_t, "lse.max")
        blocked = len(lines.shape) == 3
        shift = peak
        if blocked:  # [B, 1] -> [B, 1, 1] against the blocks
            inv_t = g.shuffle(inv_t, "lse.inv_t.blocks", reshape=(0, 1, 1))
            shift = g.shuffle(peak, "lse.max.blocks", reshape=(0, 1, 1))
        x = g.mul(lines, inv_t, "lse.scale")
        total = g.reduce_last(
            g.unary(g.elementwise(x, shift, "SUB", "lse.shift"), "EXP", "lse.exp"), "SUM", "lse.sum"
        )
        if blocked:
            total = g.reduce_last(
                g.shuffle(total, "lse.block_sums", reshape=(0, -1)), "SUM", "lse.sum_blocks"
            )
        total = g.unary(total, "LOG", "lse.log")
        out = g.shuffle(g.add(total, peak, "lse.add_max"), "lse.flat", reshape=(-1,))
        out.name = io.LOG_NORMALIZER
        net.mark_output(out)
        return peak

    def draw(self, values: Any, ids: Any, peak: Any, cols: dict[str, Any]) -> Any:
        """int32 [B]: the token each row's uniform number draws from its best K logits `values`
        [B, K] (best first) and `ids`, by runtime.sampling.sample_best_k's rule: logits times
        inv_temperature (`peak` [B, 1] is the largest, from `log_normalizer`); top-k keeps
        those >= the k-th (ties stay); top-p keeps, among those, the ones above its floor
        whose mass before them is under top_p (none dropped when top_p is 1); the survivors
        are drawn from in token-id order by inverse CDF. In float32 (the host sums in
        float64), so a uniform number within rounding of a step of the CDF may draw the token
        beside the host's. Its running sums are selects and row sums, not
        matmuls, which the builder's default TF32 would round to 10-bit inputs on the GPU.
        Drawn here, a sampled step needs nothing from the host and can follow the one before
        it on the device (runtime.backend.submit)."""
        g, net, k = self.g, self.g.network, self.opt.sample_top_k

        def op(a: Any, b: Any, kind: str, name: str) -> Any:
            return g.elementwise(a, b, kind, f"draw.{name}")

        def at_least(a: Any, b: Any, name: str) -> Any:
            return g.unary(op(a, b, "LESS", f"{name}.below"), "NOT", f"draw.{name}")

        def where(cond: Any, a: Any, b: Any, name: str) -> Any:
            return g.named(net.add_select(cond, a, b), f"draw.{name}").get_output(0)

        def const(value: float, name: str, dtype: type = np.float32, rank: int = 2) -> Any:
            return g.scalar(value, np.dtype(dtype), rank, f"draw.{name}")

        def sum_where(cond: Any, x: Any, name: str) -> Any:
            """[B, K]: row j sums x[b, i] (x [B, K]) over the i where cond[b, j, i]."""
            row = g.shuffle(x, f"draw.{name}.row", reshape=(0, 1, -1))
            terms = where(cond, row, const(0.0, f"{name}.zero", rank=3), f"{name}.terms")
            total = g.reduce_last(terms, "SUM", f"draw.{name}")
            return g.shuffle(total, f"draw.{name}.flat", reshape=(0, -1))

        zero, p = const(0.0, "zero"), cols[io.FILTER_TOP_P]
        x = op(values, cols[io.INV_TEMPERATURE], "PROD", "scale")
        weights = g.unary(op(x, peak, "SUB", "below"), "EXP", "draw.w")
        # top-k (k clamped to 1..K): x >= the k-th
        kk = op(
            op(cols[io.FILTER_TOP_K], const(1, "k.min", np.int32), "MAX", "k.low"),
            const(k, "k.max", np.int32),
            "MIN",
            "k.high",
        )
        index = g.shuffle(
            op(kk, const(1, "k.one", np.int32), "SUB", "k.index"), "draw.k.flat", reshape=(-1,)
        )
        kth = g.named(net.add_gather(x, index, 1), "draw.kth")
        kth.num_elementwise_dims = 1
        keep = at_least(x, g.shuffle(kth.get_output(0), "draw.kth.col", reshape=(-1, 1)), "top_k")
        # top-p among those: `candidates`' floor (half of 1 - top_p spread over them), then
        # the best-first mass before each (the sum over a strictly lower triangle)
        e = where(keep, weights, zero, "top_k.w")
        total = g.reduce_last(e, "SUM", "draw.top_k.total")
        count = g.reduce_last(
            g.cast(keep, np.dtype(np.float32), "draw.top_k.f"), "SUM", "draw.top_k.n"
        )
        rest = op(
            op(const(1.0, "one"), p, "SUB", "top_p.rest"), const(0.5, "half"), "PROD", "top_p.half"
        )
        floor = op(op(rest, total, "PROD", "top_p.share"), count, "DIV", "top_p.floor")
        near = at_least(e, floor, "top_p.near")
        probs = where(near, op(weights, total, "DIV", "top_p.p"), zero, "top_p.probs")
        earlier = g.constant(np.tril(np.ones((1, k, k), bool), -1), "draw.earlier")
        under = op(sum_where(earlier, probs, "top_p.before"), p, "LESS", "top_p.under")
        nucleus = op(
            op(near, under, "AND", "top_p.nucleus"),
            at_least(p, const(1.0, "p.one"), "top_p.off"),
            "OR",
            "top_p.keep",
        )
        kept = op(keep, nucleus, "AND", "kept")
        # inverse CDF in token-id order: cdf[b, j] = the kept weights of ids <= id_j; the token
        # is the first kept id whose cdf passes u * their sum (the last one if u rounds up)
        w = where(kept, weights, zero, "kept.w")
        no_later = at_least(
            g.shuffle(ids, "draw.ids.col", reshape=(0, -1, 1)),
            g.shuffle(ids, "draw.ids.row", reshape=(0, 1, -1)),
            "id_order",
        )
        cdf = sum_where(no_later, w, "cdf")
        target = op(cols[io.UNIFORM], g.reduce_last(w, "SUM", "draw.sum"), "PROD", "target")
        past = op(kept, op(cdf, target, "GREATER", "cdf.past"), "AND", "past")
        none = const(np.iinfo(np.int32).max, "none", np.int32)
        first = g.reduce_last(where(past, ids, none, "past.ids"), "MIN", "draw.first")
        last = g.reduce_last(
            where(kept, ids, const(-1, "no_id", np.int32), "kept.ids"), "MAX", "draw.last"
        )
        return g.shuffle(op(first, last, "MIN", "token"), "draw.flat", reshape=(-1,))

    def head_matmul(self, h: Any, table: Any) -> Any:
        """h @ embed.T reusing the embedding constant [vocab, hidden] (tied LM head)."""
        g = self.g
        rank = len(h.shape)
        t = g.shuffle(table, "lm_head.table", reshape=(1,) * (rank - 2) + tuple(table.shape))
        none, transpose = g.trt.MatrixOperation.NONE, g.trt.MatrixOperation.TRANSPOSE
        return g.named(g.network.add_matrix_multiply(h, none, t, transpose), "lm_head").get_output(
            0
        )

    # Blocks ---------------------------------------------------------------------------------
    def layer(self, i: int, h: Any) -> Any:
        cfg, g = self.cfg, self.g
        p = f"layers.{i}."
        a = self.attention(i, self.rms_norm(h, self.w(p + "input_layernorm.weight"), "input_norm"))
        if cfg.sandwich_norms:
            a = self.rms_norm(a, self.w(p + "post_attention_layernorm.weight"), "post_attn_norm")
        h = g.add(h, a, "attn_residual")
        mlp_norm = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
        m = self.mlp(i, self.rms_norm(h, self.w(p + mlp_norm + ".weight"), "mlp_norm"))
        if cfg.sandwich_norms:
            m = self.rms_norm(m, self.w(p + "post_feedforward_layernorm.weight"), "post_mlp_norm")
        return g.add(h, m, "mlp_residual")

    def rms_norm(self, x: Any, weight: np.ndarray, name: str) -> Any:
        """RMSNorm over the last dim computed in float32; the scale (`weight` broadcast over
        the leading dims) is applied the way the family's HF code does."""
        g, cfg = self.g, self.cfg
        rank = len(x.shape)
        f32 = np.dtype(np.float32)
        xf = g.cast(x, f32, f"{name}.to_float")
        mean_sq = g.reduce_last(g.mul(xf, xf, f"{name}.square"), "AVG", f"{name}.mean")
        eps = g.scalar(cfg.rms_norm_eps, f32, rank, f"{name}.eps")
        inv_rms = g.unary(
            g.unary(g.add(mean_sq, eps, f"{name}.add_eps"), "SQRT", f"{name}.sqrt"),
            "RECIP",
            f"{name}.rsqrt",
        )
        normed = g.mul(xf, inv_rms, f"{name}.normalize")
        weight = np.asarray(weight).astype(np.float32) + np.float32(cfg.norm_offset)
        shape = (1,) * (rank - weight.ndim) + weight.shape
        if cfg.norm_weight_in_float32:  # Gemma: (x * (1 + w)) in float32, then cast
            scaled = g.mul(
                normed, g.constant(weight.reshape(shape), f"{name}.weight"), f"{name}.scale"
            )
            return g.cast(scaled, self.dtype, f"{name}.to_dtype")
        normed = g.cast(normed, self.dtype, f"{name}.to_dtype")  # Llama/Qwen: cast, then w * x
        return g.mul(
            normed,
            g.constant(weight.astype(self.dtype).reshape(shape), f"{name}.weight"),
            f"{name}.scale",
        )

    def attention(self, i: int, x: Any) -> Any:
        cfg, g = self.cfg, self.g
        p = f"layers.{i}.self_attn."
        names = ("q_proj", "k_proj", "v_proj")
        qkv_b = (
            np.concatenate([self.weight(p + n + ".bias") for n in names]) if cfg.qkv_bias else None
        )
        qkv = self.linear(x, [p + n + ".weight" for n in names], qkv_b, "qkv_proj")
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cfg.qk_norm:  # the query and key heads in one normalization (one reduction kernel)
            qk, v = g.split_groups(qkv, [heads + kv_heads, kv_heads], d, "qkv_split")
            scales = [(p + "q_norm.weight", heads), (p + "k_norm.weight", kv_heads)]
            weight = np.concatenate([np.broadcast_to(self.w(n), (c, d)) for n, c in scales])
            qk = g.shuffle(self.rms_norm(qk, weight, "qk_norm"), "qk_flat", reshape=(0, 0, -1))
            q, k = g.split_groups(qk, [heads, kv_heads], d, "qk_split")
        else:
            q, k, v = g.split_groups(qkv, [heads, kv_heads, kv_heads], d, "qkv_split")
        bhsd = (0, 2, 1, 3)
        q, k, v = (g.shuffle(t, f"{n}.bhsd", transpose=bhsd) for n, t in zip("qkv", (q, k, v)))
        layer_cfg = cfg.layers[i]
        q, k = self.rotary(q, layer_cfg.rope, "q_rope"), self.rotary(k, layer_cfg.rope, "k_rope")
        # TensorRT's attention applies no scale of its own.
        q = g.mul(q, g.scalar(cfg.attention_scale, self.dtype, 4, "q_scale.value"), "q_scale")

        cache = self.kv_cache(i, g.concat([k, v], 1, "kv"))
        out = self.attend(q, cache, self.windows[i], self.cache_slots[i])
        o_bias = self.weight(p + "o_proj.bias") if cfg.o_bias else None
        out = self.linear(out, [p + "o_proj.weight"], o_bias, "o_proj")
        return out

    def attend(self, q: Any, cache: Any, window: int | None, ring: int) -> Any:
        """softmax(q · kᵀ masked) · v over the positions this call reads, from the layer's
        cache of keys and values; returns [B, S, heads * head_dim].

        Sliding layers read the positions `window_positions` names from their ring of `ring`
        slots (at most the window per decode step), global layers slots 0 .. L - 1, the
        positions `global_positions` names (O(n) after n cached tokens). The network holds
        two forms and routes each call's query rows to one of them (`call_rows`): a decode
        step's row attends as float32 matmuls, a prefill's rows with TensorRT's fused
        attention; the other form gets no rows. IIfConditional would say this directly, but
        TensorRT-RTX 1.7's Myelin cannot build an IAttention inside one.

        Why two forms, measured on an H200 (TensorRT-RTX 1.7 through the gpu-rig, Gemma-3-1B
        shape, docs/benchmarks.md): the fused decode kernel walks the keys in one block per
        KV head, 22.5 us per layer over a 512-position window (270-320 us over 4,096), where
        the matmuls take 10-15 us; for prefills the fused kernel is the faster one. Against
        fused attention on sliding layers and matmuls on global ones for every call, decode
        went from 2.27 / 2.36 / 2.63 to 2.13 / 2.32 / 2.52 ms at batch 1 / 4 / 16 and a
        2,048-token prefill from 19.1 to 16.5 ms, while 128- and 512-token prefills went
        from 5.7 / 7.4 to 6.3 / 8.1 ms."""
        slots, (step_mask, prompt_mask) = self.visible_slots(window, ring)
        g, kv_heads = self.g, self.cfg.num_kv_heads
        if window is None:  # slots 0 .. L - 1, global_positions' values
            read = self.slot_prefix(cache, g.dim(slots, 0, "attn.kv.length"), "attn.kv")
        else:
            read = self.gather_slots(cache, slots, "attn.kv")  # [B, 2 * kv_heads, L, D]
        k, v = (
            self.heads_of(read, first, kv_heads, n)
            for first, n in ((0, "keys"), (kv_heads, "values"))
        )
        first = g.constant(np.array([0], np.int32), "attn.first_token")
        step_q = g.rewired(
            lambda t: g.network.add_gather(t, first, 2), q, (1,) * 4, self.dtype, "attn.step_query"
        ).get_output(0)
        step = self.matmul_attention(step_q, step_mask, k, v)  # [B, heads, 1, D]
        step = g.span(step, 2, 0, self.step_rows, "attn.step_rows")  # kept in a step only
        prompt_q = g.span(q, 2, self.step_rows, self.prompt_rows, "attn.prompt_query")
        prompt = self.fused_attention(prompt_q, k, v, prompt_mask)
        out = g.concat([step, prompt], 2, "attn.rows")  # [B, heads, S, D]
        out = g.shuffle(out, "attn.bshd", transpose=(0, 2, 1, 3))
        return g.shuffle(out, "attn.merge", reshape=(0, 0, self.cfg.q_size))

    def fused_attention(self, q: Any, k: Any, v: Any, mask: Any) -> Any:
        """TensorRT's attention (GQA native, no scale of its own: q is scaled) under a
        [B, 1, S, L] additive mask (`visible_slots`); [B, heads, S, D]."""
        g, trt = self.g, self.g.trt
        attn = g.network.add_attention_v2(
            q, k, v, trt.AttentionNormalizationOp.SOFTMAX, trt.CausalMaskKind.NONE
        )
        attn.mask = mask
        attn.decomposable = True
        attn.name = g.scope + "attention"
        return attn.get_output(0)

    def matmul_attention(self, q: Any, mask: Any, k: Any, v: Any) -> Any:
        """One query token per row (q [B, heads, 1, D], mask [B, 1, 1, L]) attended as two
        matmuls and a softmax. Scores and softmax are float32 (scores rounded to bfloat16
        lost top-1 agreement in the quantization tests); the probabilities times V run in the
        model dtype, as transformers' eager attention does (`softmax(..., dtype=float32)
        .to(query.dtype) @ value`): a half-precision GEMM, not a float32 fusion over V cast
        to float32 (H100: steps 2% faster after 128 cached tokens, 5% after 4,000). The G query
        heads of a KV head are the columns of one matmul (GQA without repeating K/V),
        batched over B * kv_heads with static reshapes, and the scores are K · qᵀ
        ([B * kv, L, G]): K is read as stored, not transposed. In the builder's log that
        takes a sliding layer's decode attention from 9 kernels and aux-stream events (q · Kᵀ
        over [B, kv, G, D]) to 4: one gather of K and V (one cache) with its cast, the
        scores, one softmax kernel, the context matmul. On the H200 against the 3-D q · Kᵀ
        form (8 kernels): decode steps at batch 1 / 4 / 16 1.7% / 2.7% / 0.8% faster,
        128-token prefills 3% (two rounds, docs/benchmarks.md). Scores transposed to
        [B * kv, G, L] so that the softmax reduces the last axis: the same at batch 1, 2%
        slower at batch 16 (H100)."""
        g, cfg, trt = self.g, self.cfg, self.g.trt
        group, kv_heads, d = cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads, cfg.head_dim
        f32 = np.dtype(np.float32)

        def merged(t: Any, xy: tuple[int, int], name: str) -> Any:
            """[B, kv, X, Y] -> [B * kv, X, Y]; xy is (X, Y) with the dynamic one -1."""
            t = g.shuffle(t, f"{name}.merged", reshape=(-1, 1, 0, 0))  # [B * kv, 1, X, Y]
            return g.shuffle(t, name, reshape=(0, *xy))

        k = merged(g.cast(k, f32, "attn.keys_float32"), (-1, d), "attn.keys3")
        v = merged(v, (-1, d), "attn.values3")
        rows = g.shuffle(q, "attn.query_rows", reshape=(-1, group, d))  # [B * kv, G, D]
        rows = g.cast(rows, f32, "attn.rows_float32")
        if kv_heads > 1:
            every_head = g.constant(np.ones((1, kv_heads, 1, 1), np.bool_), "attn.every_head")
            mask = g.elementwise(mask, every_head, "AND", "attn.head_mask")  # [B, kv, 1, L]
        mask = merged(mask, (-1, 1), "attn.mask3")  # [B * kv, L, 1], as the scores
        none, transpose = trt.MatrixOperation.NONE, trt.MatrixOperation.TRANSPOSE
        scores = g.named(g.network.add_matrix_multiply(k, none, rows, transpose), "attn.scores")
        # [B * kv, L, G]: the softmax runs over L and the context is its transpose times V.
        hidden = g.scalar(float("-inf"), np.float32, 3, "attn.hidden")
        masked = g.named(g.network.add_select(mask, scores.get_output(0), hidden), "attn.mask")
        softmax = g.rewired(
            g.network.add_softmax, masked.get_output(0), (1,) * 3, f32, "attn.softmax"
        )
        softmax.axes = 1 << 1  # over L
        probs = g.cast(softmax.get_output(0), self.dtype, "attn.probs_dtype")
        out = g.named(g.network.add_matrix_multiply(probs, transpose, v, none), "attn.context")
        out = out.get_output(0)  # [B * kv, G, D]
        return g.shuffle(out, "attn.heads", reshape=(-1, cfg.num_heads, 1, d))

    def heads_of(self, kv: Any, first: int, count: int, name: str) -> Any:
        """kv [B, 2 * kv_heads, L, D] at heads first .. first + count - 1: the keys or values,
        by a gather (Myelin fuses it with the slots' gather or slice and the cast); a slice
        (`Graph.span`) decoded no faster and prefilled 1-4% slower (H100, 2026-12-06)."""
        g = self.g
        heads = g.constant(np.arange(first, first + count, dtype=np.int32), f"attn.{name}.heads")
        gather = g.rewired(
            lambda t: g.network.add_gather(t, heads, 1), kv, (1,) * 4, self.dtype, f"attn.{name}"
        )
        return gather.get_output(0)

    def gather_slots(self, cache: Any, slots: Any, name: str) -> Any:
        """cache [B, 2 * kv_heads, slots, D] at each row's slots [B, L]."""
        gather = self.g.rewired(
            lambda t: self.g.network.add_gather(t, slots, 2), cache, (1,) * 4, self.dtype, name
        )
        gather.num_elementwise_dims = 1
        return gather.get_output(0)

    def slot_prefix(self, cache: Any, length: Any, name: str) -> Any:
        """cache [B, 2 * kv_heads, slots, D] at slots 0 .. length - 1 (int64 [1]). As a
        slice the Llama-3.2-1B shape's batch-16 step reads its caches in 250 us, as a gather
        of the same slots in 295 (H100, docs/benchmarks.md). The sizes come from the input
        ids' batch, not the cache's shape, which `Graph.rewired` says not to ask for."""
        g, cfg = self.g, self.cfg

        def fixed(value: int, part: str) -> Any:
            return g.constant(np.array([value], np.int64), f"{name}.{part}")

        batch = g.dim(self.input_ids, 0, f"{name}.batch")
        sizes = [batch, fixed(2 * cfg.num_kv_heads, "heads"), length, fixed(cfg.head_dim, "d")]
        layer = g.rewired(
            lambda t: g.network.add_slice(t, (0,) * 4, (1,) * 4, (1,) * 4),
            cache,
            (1,) * 4,
            self.dtype,
            name,
        )
        layer.set_input(2, g.concat(sizes, 0, f"{name}.sizes"))
        return layer.get_output(0)

    def visible_slots(self, window: int | None, ring: int) -> tuple[Any, tuple[Any, Any]]:
        """(slots to gather, (step mask, prompt mask)) for global layers (window None) or the
        sliding layers of `window` and `ring` slots. The bool mask [B, 1, S, L] says position
        j is visible to token (b, s) iff j <= position and, in a window, j > position - window
        and j >= 0; it is read from slot j mod ring. The step mask is its first row (the
        matmul form's [B, 1, 1, L]), the prompt mask its `prompt_rows` rows as an additive
        bias in the model dtype (0 or -inf; the fused attention's). Built once per window and
        shared by layers, in the layout attention uses (transposing the mask made
        TensorRT-RTX 1.7's Myelin fail at max_batch 1: "Graph contains more than one op named
        ..._iota").

        Why a bias: from it Myelin builds the map of the mask's empty tiles, which the fused
        kernel skips, in every profile; from a bool mask only where the token count is
        dynamic, not in the chunk profile (the builder's layer information, CPU). Without
        the map the chunk profile's sliding layers took 165 us each on the H200 against 62 us
        (docs/benchmarks.md)."""
        if window in self.slots:
            return self.slots[window]
        g = self.g
        saved, g.scope = g.scope, ""
        tag = f"slots.{window or 'global'}"
        pos = g.shuffle(self.positions, f"{tag}.positions", reshape=(0, 1, -1, 1))  # [B,1,S,1]
        if window is None:  # the positions global_positions names, in their own slots
            slots = self.global_positions
            line = g.shuffle(slots, f"{tag}.line", reshape=(1, 1, 1, -1))  # [1, 1, 1, L]
        else:
            raw = self.window_positions  # [B, L], negative before position 0
            zero = g.constant(np.zeros((1, 1), np.int32), f"{tag}.zero")
            slots = self.modulo(g.elementwise(raw, zero, "MAX", f"{tag}.clamped"), ring, tag)
            line = g.shuffle(raw, f"{tag}.line", reshape=(0, 1, 1, -1))  # [B, 1, 1, L]
        visible = g.unary(
            g.elementwise(line, pos, "GREATER", f"{tag}.future"), "NOT", f"{tag}.causal"
        )
        if window is not None:
            start = g.elementwise(
                pos, g.scalar(window, np.int32, 4, f"{tag}.window"), "SUB", f"{tag}.start"
            )
            recent = g.elementwise(line, start, "GREATER", f"{tag}.recent")
            visible = g.elementwise(visible, recent, "AND", f"{tag}.in_window")
            none = g.scalar(-1, np.int32, 4, f"{tag}.none")
            written = g.elementwise(line, none, "GREATER", f"{tag}.written")
            visible = g.elementwise(visible, written, "AND", f"{tag}.visible")
        first = g.constant(np.array([0], np.int32), f"{tag}.first_token")
        step_mask = g.named(g.network.add_gather(visible, first, 2), f"{tag}.step").get_output(0)
        prompt_rows = g.span(visible, 2, self.step_rows, self.prompt_rows, f"{tag}.prompt")
        zero = g.scalar(0.0, self.dtype, 4, f"{tag}.bias_zero")
        hidden = g.scalar(float("-inf"), self.dtype, 4, f"{tag}.bias_hidden")
        prompt_mask = g.named(
            g.network.add_select(prompt_rows, zero, hidden), f"{tag}.prompt_bias"
        ).get_output(0)
        g.scope = saved
        self.slots[window] = (slots, (step_mask, prompt_mask))
        return self.slots[window]

    def call_rows(self) -> None:
        """int64 [1] shape tensors that route a call's query rows between the two attention
        forms (`attend`): `step_rows` is 1 in a decode step (S == 1) and 0 otherwise,
        `prompt_rows` is S - step_rows. TensorRT knows them from the input's shape before
        the call runs, and a form given no rows does no work."""
        g = self.g
        tokens = g.dim(self.input_ids, 1, "rows.tokens")
        two = g.constant(np.array([2], np.int64), "rows.two")
        at_most_two = g.elementwise(tokens, two, "MIN", "rows.at_most_two")
        self.step_rows = g.elementwise(two, at_most_two, "SUB", "rows.step")  # 2 - min(S, 2)
        self.prompt_rows = g.elementwise(tokens, self.step_rows, "SUB", "rows.prompt")

    def rotary(self, x: Any, rope: Any, name: str) -> Any:
        g = self.g
        if rope not in self.rope_tables:
            cos, sin = cos_sin_tables(rope, self.cfg.head_dim, self.opt.max_seq_len)
            saved, g.scope = g.scope, ""
            tag = f"rope.{len(self.rope_tables)}"
            self.rope_tables[rope] = (
                g.constant(cos.astype(self.dtype), f"{tag}.cos"),
                g.constant(sin.astype(self.dtype), f"{tag}.sin"),
            )
            g.scope = saved
        cos, sin = self.rope_tables[rope]
        layer = g.network.add_rotary_embedding(x, cos, sin, False, 0)
        layer.set_input(3, self.positions64)
        return g.named(layer, name).get_output(0)

    def modulo(self, x: Any, n: int, tag: str) -> Any:
        """x mod n for non-negative int32 x (x unchanged when n is the whole cache)."""
        if n == self.opt.max_seq_len:
            return x
        g = self.g
        rank = len(x.shape)
        size = g.scalar(n, np.int32, rank, f"{tag}.ring")
        whole = g.mul(g.elementwise(x, size, "FLOOR_DIV", f"{tag}.laps"), size, f"{tag}.lapped")
        return g.elementwise(x, whole, "SUB", f"{tag}.in_ring")

    def kv_cache(self, i: int, update: Any) -> Any:
        """Write this step's keys and values (`update`, [B, 2 * kv_heads, S, D]) into the
        layer's cache (a ring on sliding layers) in place; return the whole cache."""
        g, trt, n = self.g, self.g.trt, self.cache_slots[i]
        if n not in self.ring_index:
            saved, g.scope = g.scope, ""
            self.ring_index[n] = self.modulo(self.write_index, n, f"write_index.{n}")
            g.scope = saved
        shape = (-1, 2 * self.cfg.num_kv_heads, n, self.cfg.head_dim)
        past = g.network.add_input(io.past(i), trt_dtype(trt, self.dtype), shape)
        layer = g.rewired(
            lambda t: g.network.add_kv_cache_update(
                past, t, self.ring_index[n], trt.KVCacheMode.LINEAR
            ),
            update,
            (1, shape[1], 1, shape[3]),
            self.dtype,
            "kv_cache_update",
            index=1,
        )
        present = layer.get_output(0)
        present.name = io.present(i)
        g.network.mark_output(present)
        return present

    def mlp(self, i: int, x: Any) -> Any:
        """The gated MLP. Its unquantized weights are stored [in, out] (`in_out`, copies the
        checkpoint pages make way for): a batch-1 decode step then runs them on tensor-core
        tiles instead of an FFMA GEMV, 8% faster for a --max-batch 16 engine on an H100 (2.12
        against 2.32 ms, Gemma-3-1B shape) and 7-16% for the default max_batch 1 one on an
        H200, for an engine of the same size; the attention projections and the LM head
        stored so gained nothing (docs/benchmarks.md, 2026-12-06). For them the decode
        profile admits two rows even at max_batch 1 (`NetworkOptions.profiles`)."""
        cfg, g = self.cfg, self.g
        p = f"layers.{i}.mlp."
        size = cfg.intermediate_size
        gate_up = [p + "gate_proj.weight", p + "up_proj.weight"]
        fused = self.linear(x, gate_up, None, "gate_up_proj", in_out=True)
        gate, up = g.split_groups(fused, [1, 1], size, "gate_up_split")  # [B, S, 1, size] each
        if cfg.activation == "gelu_tanh":
            act = g.activation(gate, "GELU_TANH", "gelu")
        else:  # silu(x) = x * sigmoid(x)
            act = g.mul(gate, g.activation(gate, "SIGMOID", "sigmoid"), "silu")
        gated = g.shuffle(g.mul(act, up, "gated"), "gated.flat", reshape=(0, 0, size))
        return self.linear(gated, [p + "down_proj.weight"], None, "down_proj", in_out=True)
