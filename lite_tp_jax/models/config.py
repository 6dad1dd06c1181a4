"""The shape of a decoder LM (Llama-style by default; GPT-2, Qwen2, Mixtral
variants) and how it runs: the ``model`` section of a config, with each
field's range and the rules between fields (``check``). No jax here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, get_args

from lite_tp_jax.core.checks import ABOVE_ZERO, NON_NEGATIVE, POSITIVE, check_heads, ranged
from lite_tp_jax.core.errors import FitError
from lite_tp_jax.sharding.table import RuleError, check_overrides

Remat = Literal["none", "full", "selective"]
ComputeDtype = Literal["float32", "bfloat16"]
AttentionKernel = Literal["auto", "xla", "cudnn", "reference"]  # layers.attention.attention_core
Norm = Literal["rms", "layer"]
MLPActivation = Literal["swiglu", "gelu"]
Position = Literal["rope", "learned"]
RopeScalingKind = Literal["none", "linear", "llama3"]
RouterScoring = Literal["softmax", "sigmoid"]
SequenceParallel = Literal["auto", True, False]
ContextStrategy = Literal["all_gather", "ring", "all_to_all"]  # layers.attention.CONTEXT_STRATEGIES, over "context"
CONTEXT_STRATEGIES: tuple[str, ...] = get_args(ContextStrategy)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = ranged(256, POSITIVE)
    hidden_size: int = ranged(64, POSITIVE)
    num_layers: int = ranged(2, POSITIVE)
    num_heads: int = ranged(4, POSITIVE)
    num_kv_heads: int = ranged(2, POSITIVE)
    head_dim: int | None = ranged(None, POSITIVE)  # default: hidden_size // num_heads
    ffn_hidden_size: int = ranged(172, POSITIVE)
    rope_theta: float = ranged(10000.0, ABOVE_ZERO)
    norm_eps: float = ranged(1e-5, ABOVE_ZERO)
    tie_embeddings: bool = False
    # Sequence parallelism (activations between blocks split along the sequence
    # over "tensor"): "auto" turns it on in a training run whenever mesh.tensor
    # > 1 (and the sequence divides by tensor x context; else off, said in one
    # line); a Transformer built directly takes "auto" as off.
    sequence_parallel: SequenceParallel = "auto"
    # Context parallelism (mesh.context > 1, lite_tp_jax/parallel/context.py):
    # how attention meets the other context ranks' tokens: all_gather (K, V
    # all-gathered), ring (K, V passed round with ppermute, online softmax;
    # layers/ring_attention.py), all_to_all (Ulysses: sequence-split to head-split and back); and whether
    # the tokens are permuted so each rank holds chunks r and 2n-1-r (zigzag).
    context_parallel: ContextStrategy = "all_gather"
    context_load_balance: bool = True
    remat: Remat = "none"
    # Efficiency. compute_dtype: matmuls and activation collectives (parameters,
    # optimizer state, softmax, norms and the loss stay float32). attention: the
    # kernel of the attention core: jax.nn.dot_product_attention's "xla" or
    # "cudnn" (flash; GPU, bfloat16), "auto" (cudnn where it applies), or the plain
    # einsum "reference" (the only one whose softmax remat "none" keeps).
    compute_dtype: ComputeDtype = "float32"
    attention: AttentionKernel = "auto"
    # Sliding-window attention (Mistral, Qwen2): a query sees the keys at most
    # sliding_window - 1 positions back (itself included: sliding_window keys);
    # null: the whole causal prefix (lite_tp_jax/layers/masks.py).
    sliding_window: int | None = ranged(None, POSITIVE)
    # Mixture of experts: every moe_every-th layer (0: none) has num_experts
    # SwiGLU experts of ffn_hidden_size, top_k routing, and a capacity of
    # capacity_factor * tokens * top_k / num_experts per expert (null: dropless).
    moe_every: int = ranged(0, NON_NEGATIVE)
    num_experts: int = ranged(8, POSITIVE)
    top_k: int = ranged(2, POSITIVE)
    capacity_factor: float | None = ranged(1.25, ABOVE_ZERO)
    aux_loss_weight: float = ranged(0.01, NON_NEGATIVE)
    # Routers: scores softmax or sigmoid (DeepSeek-V3); norm_topk_prob renormalises
    # the top_k gates to sum to 1 (null: when top_k > 1); router_z_loss_weight
    # times the router z-loss (mean squared logsumexp of the router logits) joins
    # the loss. A shared expert (Qwen2-MoE): a SwiGLU MLP of shared_expert_size
    # (0: none) on every token, times sigmoid(x @ w) with shared_expert_gate.
    moe_ffn_hidden_size: int | None = ranged(None, POSITIVE)  # the experts' hidden size (null: ffn_hidden_size)
    router_scoring: RouterScoring = "softmax"
    norm_topk_prob: bool | None = None
    router_z_loss_weight: float = ranged(0.0, NON_NEGATIVE)
    shared_expert_size: int = ranged(0, NON_NEGATIVE)
    shared_expert_gate: bool = False
    # Auxiliary-loss-free balancing (DeepSeek-V3): > 0 gives every MoE layer a
    # per-expert bias added to the router scores for the choice of experts only,
    # moved after each step by -bias_update_rate * sign(load - mean load).
    bias_update_rate: float = ranged(0.0, NON_NEGATIVE)
    # Pipeline: chunks of layers per pipeline stage (1: GPipe, > 1: circular schedule).
    virtual_stages: int = ranged(1, POSITIVE)
    # Overrides of the partitioning rule table (lite_tp_jax/sharding/table.py), written in
    # YAML as a mapping {role pattern: strategy}, e.g. {attention.key: replicated,
    # attention.value: replicated}; kept as (pattern, strategy) pairs, in order.
    partition_rules: tuple[tuple[str, str], ...] = ()
    # Architecture variants, for the Hugging Face families (lite_tp_jax/interop/hf_config.py);
    # the defaults are the Llama path. GPT-2: norm "layer" (LayerNorm with a bias),
    # activation "gelu" (tanh approximation, up/down MLP), qkv_bias, out_bias and
    # mlp_bias, position "learned" (a table of max_positions vectors added to the
    # token embedding). Qwen2: qkv_bias. rope_scaling stretches RoPE's wavelengths
    # for long contexts: "linear" divides every frequency by rope_scaling_factor;
    # "llama3" divides only the low ones (wavelength > rope_original_max_positions /
    # rope_low_freq_factor), keeps the high ones (< ... / rope_high_freq_factor)
    # and interpolates in between.
    norm: Norm = "rms"
    activation: MLPActivation = "swiglu"
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    out_bias: bool = False
    mlp_bias: bool = False
    position: Position = "rope"
    max_positions: int = ranged(2048, POSITIVE)
    rope_scaling: RopeScalingKind = "none"
    rope_scaling_factor: float = ranged(1.0, ABOVE_ZERO)
    rope_low_freq_factor: float = ranged(1.0, ABOVE_ZERO)
    rope_high_freq_factor: float = ranged(4.0, ABOVE_ZERO)
    rope_original_max_positions: int = ranged(8192, POSITIVE)

    def check(self) -> None:
        """The rules between fields; ``FitError`` naming the fields (the config
        layer shows them as ``'model.num_heads' (6)``)."""
        check_heads(self.num_heads, self.num_kv_heads, self.hidden_size, self.head_dim, rope=self.position == "rope")
        if self.moe_every and self.num_layers % self.moe_every:
            raise FitError(
                "{num_layers} must be a multiple of {moe_every}: every moe_every-th layer is an MoE layer",
                num_layers=self.num_layers, moe_every=self.moe_every,
            )
        if self.moe_every and self.top_k > self.num_experts:
            raise FitError(
                "{top_k} must be at most {num_experts}: each token picks top_k distinct experts",
                top_k=self.top_k, num_experts=self.num_experts,
            )
        if self.shared_expert_gate and not self.shared_expert_size:
            raise FitError(
                "{shared_expert_gate.name} needs a shared expert: set {shared_expert_size.name} > 0",
                shared_expert_gate=self.shared_expert_gate, shared_expert_size=self.shared_expert_size,
            )
        if self.moe_every and self.activation != "swiglu":
            raise FitError(
                "{activation.name} must be 'swiglu' with experts ({moe_every.name} > 0): experts are "
                "SwiGLU MLPs, got {activation.value!r}",
                activation=self.activation, moe_every=self.moe_every,
            )
        try:
            check_overrides(dict(self.partition_rules))
        except RuleError as error:
            raise FitError("{partition_rules.name}: " + str(error).replace("{", "{{").replace("}", "}}"),
                           partition_rules=self.partition_rules) from None

    def with_sequence_parallel(self, sizes: Mapping[str, int], seq_len: int | None = None) -> tuple[ModelConfig, str]:
        """This config with ``sequence_parallel`` a bool for a mesh of ``sizes``
        (and sequences of ``seq_len``), and one line saying what was chosen.
        ``auto``: on when "tensor" > 1 and the sequence divides by tensor x
        context (checked when ``seq_len`` is given), else off."""
        tensor, context = sizes.get("tensor", 1), sizes.get("context", 1)
        if self.sequence_parallel != "auto":
            on = bool(self.sequence_parallel)
            return replace(self, sequence_parallel=on), f"sequence parallelism {'on' if on else 'off'}"
        if tensor == 1:
            return replace(self, sequence_parallel=False), "sequence parallelism off (auto: tensor 1)"
        if seq_len is not None and seq_len % (tensor * context):
            return replace(self, sequence_parallel=False), (
                f"sequence parallelism off (auto: train.seq_len {seq_len} does not divide by "
                f"tensor {tensor} x context {context})"
            )
        return replace(self, sequence_parallel=True), f"sequence parallelism on (auto: tensor {tensor})"

    @property
    def expert_ffn_size(self) -> int:
        """The hidden size of each routed expert."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def layers_per_group(self) -> int:
        """Layers in the unit that is stacked and scanned: ``moe_every`` (the
        last of them an MoE layer), or 1 without experts."""
        return self.moe_every or 1
