"""Hugging Face ``config.json`` <-> ``ModelConfig``.

Families: Llama 2/3, Mistral, Qwen2, Qwen3 (q/k norm), Mixtral, Qwen2-MoE
(gated shared expert), Qwen3-MoE and GPT-2 (``FAMILIES``). A
Mistral-shaped model is written back as "llama" (``family_of``), or as
"mistral" when it has a sliding window (Llama has none).

Sliding windows: Mistral's and Mixtral's ``sliding_window``, and the Qwen
families' with ``use_sliding_window`` (on every layer: ``max_window_layers``
0, or ``layer_types`` all "sliding_attention"), become
``model.sliding_window``: a query attends to the ``sliding_window``
positions ending at itself, as Hugging Face's ``kv_idx > q_idx -
sliding_window``, at any sequence length.

Not supported (a one-line ``HFError``): other ``model_type``s, RoPE scalings
other than "linear" and "llama3", activations other than SiLU (GPT-2: tanh
GeLU), Mixtral with 1 expert per token, Qwen-MoE ``mlp_only_layers``, a
sliding window on some layers only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from lite_tp_jax.interop.errors import HFError
from lite_tp_jax.models.config import ModelConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gpt2")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
}


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and scaling fields from either transformers 5's
    ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    source = params if params.get("rope_type", "default") != "default" else scaling
    kind = source.get("rope_type", source.get("type", "default"))
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return fields
    if kind == "linear":
        return {**fields, "rope_scaling": "linear", "rope_scaling_factor": float(source["factor"])}
    if kind == "llama3":
        return {
            **fields, "rope_scaling": "llama3", "rope_scaling_factor": float(source["factor"]),
            "rope_low_freq_factor": float(source["low_freq_factor"]),
            "rope_high_freq_factor": float(source["high_freq_factor"]),
            "rope_original_max_positions": int(source["original_max_position_embeddings"]),
        }
    raise HFError(f"RoPE scaling {kind!r} is not supported; supported: default, linear, llama3.")


def config_from_hf(hf: dict[str, Any], source: str | os.PathLike = "config.json") -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json`` (as a dict, read from
    ``source``); HFError naming the file and a missing or unsupported field."""
    try:
        return _config_from_hf(hf)
    except KeyError as missing:
        raise HFError(f"{source} (model_type {hf.get('model_type')!r}) lacks the field {missing.args[0]!r}, "
                      f"which this family needs.") from None


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise HFError(f"model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}.")
    if family == "gpt2":
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise HFError(f"GPT-2 activation_function {activation!r} is not supported; supported: gelu_new, gelu_pytorch_tanh.")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise HFError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported.")
        hidden = hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["n_layer"],
            num_heads=hf["n_head"], num_kv_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
            norm="layer", activation="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
            position="learned", max_positions=hf["n_positions"],
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"hidden_act {hf['hidden_act']!r} is not supported for {family}; supported: silu.")
    heads = hf["num_attention_heads"]
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
        ffn_hidden_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_positions=hf.get("max_position_embeddings", 2048), sliding_window=_sliding_window(family, hf), **_rope(hf),
    )
    if family == "llama":
        bias = bool(hf.get("attention_bias", False))
        fields.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if family in ("qwen2", "qwen2_moe"):
        fields.update(qkv_bias=True)
    if family in ("qwen3", "qwen3_moe"):
        fields.update(qkv_bias=bool(hf.get("attention_bias", False)), out_bias=bool(hf.get("attention_bias", False)),
                      qk_norm=True)
    if family in ("qwen2_moe", "qwen3_moe"):
        fields.update(_qwen_moe(family, hf))
    if family == "mixtral":
        top_k = hf.get("num_experts_per_tok", 2)
        if not 2 <= top_k <= hf["num_local_experts"]:
            raise HFError(
                f"Mixtral num_experts_per_tok={top_k} is not supported; supported: 2 to num_local_experts "
                f"({hf['num_local_experts']}) (at 1 Mixtral's gate is 1, not the top probability)."
            )
        fields.update(
            moe_every=1, num_experts=hf["num_local_experts"], top_k=top_k, capacity_factor=None,
            aux_loss_weight=hf.get("router_aux_loss_coef", 0.01),
        )
    return ModelConfig(**fields)


def _qwen_moe(family: str, hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-MoE / Qwen3-MoE: experts of moe_intermediate_size in every
    decoder_sparse_step-th layer (the last of each group, as ``moe_every``),
    softmax routing, norm_topk_prob; Qwen2-MoE's gated shared expert."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if experts is None:
        raise KeyError("num_experts")
    if hf.get("mlp_only_layers"):
        raise HFError(
            f"{family} mlp_only_layers={hf['mlp_only_layers']} is not supported; supported: [] (dense layers only "
            "as every decoder_sparse_step-th pattern)."
        )
    step = hf.get("decoder_sparse_step", 1)
    if step < 1 or hf["num_hidden_layers"] % step:
        raise HFError(f"{family} decoder_sparse_step={step} must divide num_hidden_layers ({hf['num_hidden_layers']}).")
    top_k = hf["num_experts_per_tok"]
    if not 1 <= top_k <= experts:
        raise HFError(f"{family} num_experts_per_tok={top_k} must be between 1 and num_experts ({experts}).")
    fields = dict(
        moe_every=step, num_experts=experts, top_k=top_k, capacity_factor=None,
        moe_ffn_hidden_size=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        aux_loss_weight=hf.get("router_aux_loss_coef", 0.001),
    )
    if family == "qwen2_moe" and hf.get("shared_expert_intermediate_size", 0):
        fields.update(shared_expert_size=hf["shared_expert_intermediate_size"], shared_expert_gate=True)
    return fields


def _sliding_window(family: str, hf: dict[str, Any]) -> int | None:
    """The window every layer applies, or None; HFError for one on some layers only."""
    window = hf.get("sliding_window")
    if family.startswith("qwen") and not hf.get("use_sliding_window"):
        return None
    if window is None or family not in ("mistral", "mixtral") and not family.startswith("qwen"):
        return None
    if not isinstance(window, int) or window < 1:
        raise HFError(f"sliding_window must be a positive integer or null, got {window!r}.")
    layers = hf["num_hidden_layers"]
    kinds = hf.get("layer_types")
    if family.startswith("qwen") and kinds is None:  # transformers: layer i slides when i >= max_window_layers
        first = hf.get("max_window_layers", layers)
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if kinds is not None and len(set(kinds)) > 1:
        sliding = sum(kind == "sliding_attention" for kind in kinds)
        raise HFError(
            f"a sliding window on {sliding} of {len(kinds)} layers is not supported (layer_types / max_window_layers); "
            f"only on every layer or none."
        )
    if kinds is not None and kinds and kinds[0] != "sliding_attention":
        return None
    return window


def family_of(config: ModelConfig) -> str:
    """The Hugging Face family that represents ``config`` (Mistral's shape is
    Llama's: it is written as "llama")."""
    gpt2 = (config.norm, config.activation, config.position) == ("layer", "gelu", "learned")
    if gpt2 and config.qkv_bias and config.out_bias and config.mlp_bias and config.num_kv_heads == config.num_heads:
        return "gpt2"
    if config.norm != "rms" or config.activation != "swiglu" or config.position != "rope":
        raise HFError("this model's mix of norm, activation and position type matches no Hugging Face family.")
    if config.router_scoring != "softmax" or config.router_z_loss_weight or config.bias_update_rate:
        raise HFError("sigmoid router scores, the router z-loss and expert biases have no Hugging Face family here.")
    if config.moe_every:
        if config.mlp_bias or config.out_bias:
            raise HFError("the Hugging Face MoE families have no MLP or output biases; this model has some.")
        if config.shared_expert_size:
            if config.qk_norm or not config.qkv_bias or not config.shared_expert_gate:
                raise HFError("a shared expert is Qwen2-MoE's: gated, with q/k/v biases and no q/k norm.")
            return "qwen2_moe"
        if config.qk_norm:
            return "qwen3_moe"
        if config.qkv_bias:
            return "qwen2_moe"
        if config.moe_every != 1 or config.norm_topk_prob is False or config.moe_ffn_hidden_size not in (
            None, config.ffn_hidden_size
        ):
            raise HFError(
                f"moe_every={config.moe_every}, norm_topk_prob={config.norm_topk_prob} and a separate expert size "
                "are Qwen-MoE's (with q/k norm or q/k/v biases); Mixtral has experts in every layer, renormalised."
            )
        return "mixtral"
    if config.qk_norm:
        if config.mlp_bias or config.qkv_bias != config.out_bias:
            raise HFError("Qwen3 biases its q, k, v and output projections together and has no MLP bias.")
        return "qwen3"
    if config.qkv_bias and not config.out_bias and not config.mlp_bias:
        return "qwen2"
    if config.qkv_bias != config.out_bias:
        raise HFError("Llama biases its q, k, v and output projections together; this model does not.")
    if config.sliding_window is not None:
        if config.qkv_bias or config.mlp_bias:
            raise HFError("Mistral (Llama's shape with a sliding window) has no biases; this model has some.")
        return "mistral"
    return "llama"


def config_to_hf(config: ModelConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The Hugging Face ``config.json`` (as a dict) for ``config``."""
    family = family_of(config)
    dtype_name = jnp.dtype(dtype).name
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_embd": config.hidden_size, "n_layer": config.num_layers, "n_head": config.num_heads,
            "n_inner": config.ffn_hidden_size, "n_positions": config.max_positions,
            "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
            "tie_word_embeddings": config.tie_embeddings, "dtype": dtype_name,
        }
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.resolved_head_dim,
        "intermediate_size": config.ffn_hidden_size, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": config.max_positions, "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta, "dtype": dtype_name,
    }
    if config.rope_scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": config.rope_scaling_factor}
    elif config.rope_scaling == "llama3":
        hf["rope_scaling"] = {
            "rope_type": "llama3", "factor": config.rope_scaling_factor,
            "low_freq_factor": config.rope_low_freq_factor, "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_positions,
        }
    if family == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if family in ("mistral", "mixtral"):
        hf.update(sliding_window=config.sliding_window)
    if family == "mixtral":
        hf.update(
            num_local_experts=config.num_experts, num_experts_per_tok=config.top_k,
            router_aux_loss_coef=config.aux_loss_weight,
        )
    if family.startswith("qwen"):
        sliding = config.sliding_window is not None
        hf.update(use_sliding_window=sliding, sliding_window=config.sliding_window,
                  max_window_layers=0 if sliding else config.num_layers)
    if family == "qwen3" or family == "qwen3_moe":
        hf.update(attention_bias=config.qkv_bias)
    if family in ("qwen2_moe", "qwen3_moe"):
        hf.update(
            num_experts=config.num_experts, num_experts_per_tok=config.top_k, decoder_sparse_step=config.moe_every,
            mlp_only_layers=[], moe_intermediate_size=config.expert_ffn_size,
            norm_topk_prob=bool(config.top_k > 1 if config.norm_topk_prob is None else config.norm_topk_prob),
            router_aux_loss_coef=config.aux_loss_weight,
        )
    if family == "qwen2_moe":
        hf.update(shared_expert_intermediate_size=config.shared_expert_size)
    return hf


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model directory as a dict; HFError if it is missing or not a JSON object."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise HFError(f"{path} is not a Hugging Face model directory: it has no config.json.")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise HFError(f"{file} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise HFError(f"{file} must hold a JSON object, got {type(config).__name__}.")
    return config
