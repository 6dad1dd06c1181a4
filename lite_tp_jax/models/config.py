"""The shape of a Llama-style decoder LM and how it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Remat = Literal["none", "full", "selective"]
ComputeDtype = Literal["float32", "bfloat16"]
AttentionKernel = Literal["auto", "xla", "cudnn", "reference"]  # layers.attention.attention_core


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # default: hidden_size // num_heads
    ffn_hidden_size: int = 172
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sequence_parallel: bool = False
    remat: Remat = "none"
    # Efficiency. compute_dtype: matmuls and activation collectives (parameters,
    # optimizer state, softmax, norms and the loss stay float32). attention: the
    # kernel of the attention core: jax.nn.dot_product_attention's "xla" or
    # "cudnn" (flash; GPU, bfloat16), "auto" (cudnn where it applies), or the plain
    # einsum "reference" (the only one whose softmax remat "none" keeps).
    compute_dtype: ComputeDtype = "float32"
    attention: AttentionKernel = "auto"
    # Mixture of experts: every moe_every-th layer (0: none) has num_experts
    # SwiGLU experts of ffn_hidden_size, top_k routing, and a capacity of
    # capacity_factor * tokens * top_k / num_experts per expert (null: dropless).
    moe_every: int = 0
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = 1.25
    aux_loss_weight: float = 0.01
    # Pipeline: chunks of layers per pipeline stage (1: GPipe, > 1: circular schedule).
    virtual_stages: int = 1
    # Overrides of the partitioning rule table (lite_tp_jax/plan/rules.py), written in
    # YAML as a mapping {role pattern: strategy}, e.g. {attention.key: replicated,
    # attention.value: replicated}; kept as (pattern, strategy) pairs, in order.
    partition_rules: tuple[tuple[str, str], ...] = ()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def layers_per_group(self) -> int:
        """Layers in the unit that is stacked and scanned: ``moe_every`` (the
        last of them an MoE layer), or 1 without experts."""
        return self.moe_every or 1
