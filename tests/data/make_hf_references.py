"""Writes tests/data/hf/<family>/: a tiny random Hugging Face model of each
family (``save_pretrained``) and its float32 logits on a few token ids.

Needs ``transformers`` and ``torch`` (the ``hf`` extra; torch's CPU build is
enough) and is run by hand, not by the tests:

    python tests/data/make_hf_references.py [FAMILY ...]

Each family directory holds ``config.json``, ``model.safetensors`` and
``reference.npz`` with ``tokens [2, 8]`` (int32) and ``logits [2, 8, vocab]``
(float32, computed by transformers' PyTorch implementation on CPU). Weights
are stored in bfloat16 (float32 for GPT-2) to keep the folder small; the
reference logits are computed from exactly those rounded weights, in float32.

Shapes are chosen to be awkward for tensor parallelism: a vocabulary of 101
and 6 query heads (neither divides 4), 2 kv heads (fewer than TP 3 or 4).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

HERE = Path(__file__).resolve().parent / "hf"
VOCAB, HIDDEN, HEADS, LAYERS = 101, 48, 6, 2
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 8)).astype(np.int32)

_DECODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    num_key_value_heads=2, intermediate_size=70, max_position_embeddings=128, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(
        _DECODER, rope_theta=10000.0,  # wavelengths 6, 63, 628, 6283: one high, one blended, two low
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    )),
    "llama2": (transformers.LlamaConfig, dict(
        _DECODER, num_key_value_heads=HEADS, rope_scaling=dict(rope_type="linear", factor=2.0),
        tie_word_embeddings=True,
    )),
    "mistral": (transformers.MistralConfig, dict(_DECODER, num_key_value_heads=3, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(_DECODER, tie_word_embeddings=True, use_sliding_window=False)),
    "mixtral": (transformers.MixtralConfig, dict(
        _DECODER, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
    )),
    "qwen3": (transformers.Qwen3Config, dict(_DECODER, head_dim=12, use_sliding_window=False)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        _DECODER, head_dim=12, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=20, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
    )),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(  # layers 0, 2 dense; 1, 3 experts + gated shared expert
        _DECODER, num_hidden_layers=4, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=20,
        shared_expert_intermediate_size=28, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[], use_sliding_window=False,
    )),
    "gpt2": (transformers.GPT2Config, dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=32,
        n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
    )),
}


def build(family: str):
    config_class, kwargs = FAMILIES[family]
    torch.manual_seed(sum(map(ord, family)))
    config = config_class(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # visible weights: biases and norms are zero / one at init
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    stored = torch.float32 if family == "gpt2" else torch.bfloat16
    return model.to(stored).to(torch.float32), stored


def main(families: list[str]) -> None:
    for family in families:
        model, stored = build(family)
        target = HERE / family
        shutil.rmtree(target, ignore_errors=True)
        model.to(stored).save_pretrained(target)
        # The logits of the model as saved, loaded back in float32: casting a live model also
        # rounds its buffers (RoPE's inverse frequencies), which a loaded model recomputes.
        saved = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = saved(torch.from_numpy(TOKENS).long()).logits.float().numpy()
        np.savez_compressed(target / "reference.npz", tokens=TOKENS, logits=logits.astype(np.float32))
        print(f"{family}: logits {logits.shape}, {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:] or list(FAMILIES))  # e.g. ``python tests/data/make_hf_references.py qwen3``
