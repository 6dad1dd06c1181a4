"""The shape of a decoder LM (Llama-style by default; GPT-2, Qwen2, Mixtral variants) and how it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Remat = Literal["none", "full", "selective"]
ComputeDtype = Literal["float32", "bfloat16"]
AttentionKernel = Literal["auto", "xla", "cudnn", "reference"]  # layers.attention.attention_core
Norm = Literal["rms", "layer"]
Activation = Literal["swiglu", "gelu"]
Position = Literal["rope", "learned"]
RopeScalingKind = Literal["none", "linear", "llama3"]


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
    # Architecture variants, for the Hugging Face families (lite_tp_jax/interop/hf.py);
    # the defaults are the Llama path. GPT-2: norm "layer" (LayerNorm with a bias),
    # activation "gelu" (tanh approximation, up/down MLP), qkv_bias, out_bias and
    # mlp_bias, position "learned" (a table of max_positions vectors added to the
    # token embedding). Qwen2: qkv_bias. rope_scaling stretches RoPE's wavelengths
    # for long contexts: "linear" divides every frequency by rope_scaling_factor;
    # "llama3" divides only the low ones (wavelength > rope_original_max_positions /
    # rope_low_freq_factor), keeps the high ones (< ... / rope_high_freq_factor)
    # and interpolates in between.
    norm: Norm = "rms"
    activation: Activation = "swiglu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    position: Position = "rope"
    max_positions: int = 2048
    rope_scaling: RopeScalingKind = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def layers_per_group(self) -> int:
        """Layers in the unit that is stacked and scanned: ``moe_every`` (the
        last of them an MoE layer), or 1 without experts."""
        return self.moe_every or 1
