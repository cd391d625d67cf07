"""The real Gemma-3-270M (bundled GGUF, converted once): network parity and an engine build.

The prompt is longer than nothing but shorter than the 512-token sliding window, so every
position is checked; parity past the window is proven on the tiny fixture (window 4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netdef import NetworkOptions, build_engine, build_network, load_backend
from runtime.cpu import CpuModel
from tools.logits import sequence_logits
from weights import Checkpoint

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris. The capital of Germany is"
DECODE_STEPS = 32


@pytest.fixture(scope="module")
def reference(gemma3_270m_dir):
    """Prompt ids, 32 greedy continuation ids and transformers' float32 logits for all of them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_270m_dir)
    model = AutoModelForCausalLM.from_pretrained(gemma3_270m_dir, dtype=torch.float32).eval()
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        full = model.generate(prompt, max_new_tokens=DECODE_STEPS, do_sample=False)
        logits = model(full).logits[0].numpy()
        bf16 = model.to(torch.bfloat16)(full).logits[0].float().numpy()
    return full[0].tolist(), prompt.shape[1], logits, bf16


def test_float32_prefill_and_32_decode_steps(gemma3_270m_dir, reference):
    seq, prompt_len, ref, _ = reference
    ckpt = Checkpoint.open(gemma3_270m_dir)
    options = NetworkOptions(dtype="float32", max_seq_len=len(seq), max_prefill=prompt_len, all_logits=True)
    ours = sequence_logits(CpuModel(build_network(ckpt, options)), [seq], prompt_len)[0]
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= 1e-3 * np.abs(ref).max(), err
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    # The greedy continuation transformers generated is what our logits pick, step by step.
    np.testing.assert_array_equal(ours[prompt_len - 1 : -1].argmax(-1), seq[prompt_len:])


def test_bfloat16_top1_agreement(gemma3_270m_dir, reference):
    seq, prompt_len, _, ref = reference
    ckpt = Checkpoint.open(gemma3_270m_dir)
    options = NetworkOptions(dtype="bfloat16", max_seq_len=len(seq), max_prefill=prompt_len, all_logits=True)
    ours = sequence_logits(CpuModel(build_network(ckpt, options)), [seq], prompt_len)[0]
    agreement = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agreement >= 0.99, agreement
    assert np.abs(ours - ref).max() <= 0.04 * np.abs(ref).max()


def test_bfloat16_engine_builds_with_two_profiles(gemma3_270m_dir, tmp_path):
    trt = load_backend("tensorrt_rtx")
    ckpt = Checkpoint.open(gemma3_270m_dir)
    dn = build_network(ckpt, NetworkOptions(dtype="bfloat16", max_batch=2, max_seq_len=512), trt)
    assert [p.name for p in dn.profiles] == ["decode", "prefill"]
    size = build_engine(dn, tmp_path / "model.engine", target="sm89")
    # 268M parameters in bf16, the embedding stored once.
    assert 500e6 < size < 700e6
