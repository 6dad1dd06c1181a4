"""Model FLOPs of a training step: the one count behind MFU and the planner's roofline.

The convention (model FLOPs, not hardware FLOPs):

* a matmul of an ``[m, k]`` by a ``[k, n]`` operand is ``2 m k n`` FLOPs
  (one multiply, one add);
* training is 3x the forward pass (the backward computes the gradients of
  the activations and of the weights, each as large as the forward), so each
  parameter that does a matmul costs ``6`` FLOPs per token: ``6 N`` per token,
  N counting the projections of attention, the MLPs (for a mixture of experts:
  the router, ``top_k`` experts, not all of them, and the shared expert) and the output head, but
  not the input embedding (a lookup), norms or biases;
* attention adds, per token and layer, the scores ``Q Kᵀ`` and the weighted
  values ``P V``: ``2 x 2 x heads x head_dim x keys`` forward. **Causal
  attention counts half**: a query sees on average ``seq_len / 2`` keys, so
  ``keys = seq_len / 2``, as MaxText counts it since its PR #1988 ("Divide
  FLOPs by two due to causal masks", July 2025) and as Megatron-LM's
  ``num_floating_point_operations`` does (PaLM's appendix B counts the full
  ``seq_len``; an attention kernel that computes the whole square and masks it
  does that full hardware work, which MFU does not credit);
* recomputation under ``model.remat`` is not counted: it is hardware work the
  model does not need.

So per token: ``6 N + 6 x layers x heads x head_dim x seq_len`` (the second
term being ``3 x 2 x 2 x heads x head_dim x seq_len / 2``). MFU is then
``flops_per_step / (step seconds x devices x peak FLOP/s per device)``.
"""

from __future__ import annotations

from lite_tp_jax.models.config import ModelConfig


def matmul_params(model: ModelConfig) -> int:
    """N: parameters that multiply an activation once per token (see the module docstring)."""
    H, F, hd = model.hidden_size, model.ffn_hidden_size, model.resolved_head_dim
    attention = H * hd * (2 * model.num_heads + 2 * model.num_kv_heads)  # q, o; k, v
    mlp = (3 if model.activation == "swiglu" else 2) * H * F
    moe_layers = model.num_layers // model.moe_every if model.moe_every else 0
    moe = model.top_k * 3 * H * model.expert_ffn_size + H * model.num_experts  # top_k experts and the router
    moe += 3 * H * model.shared_expert_size + H * model.shared_expert_gate  # the shared expert and its gate
    blocks = attention * model.num_layers + mlp * (model.num_layers - moe_layers) + moe * moe_layers
    return blocks + H * model.vocab_size  # + the output head


def attention_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of the causal scores and weighted values of one token, all
    layers: ``2 x 2 x heads x head_dim x seq_len / 2`` per layer."""
    return 2 * 2 * model.num_heads * model.resolved_head_dim * (seq_len / 2) * model.num_layers


def training_flops_per_step(model: ModelConfig, global_batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward and backward), all devices together."""
    per_token = 6 * matmul_params(model) + 3 * attention_flops_per_token(model, seq_len)
    return float(per_token) * global_batch * seq_len
