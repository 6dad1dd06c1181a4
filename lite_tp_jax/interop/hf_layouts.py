"""The layout: parameter name -> expression over Hugging Face tensors.

``hf_layout(config)`` maps each parameter of a ``Transformer`` (as
``export_state`` names it) to where it is in a Hugging Face checkpoint of
``config``'s family (``expressions``): one function per family, the Llama
one shared by Mistral, Qwen2 and Qwen3 (biases and q/k norms as the config
says), Mixtral's and Qwen-MoE's being Llama's attention with a
mixture-of-experts MLP (Qwen-MoE's dense layers: Llama's MLP).
"""

from __future__ import annotations

from collections.abc import Callable

from lite_tp_jax.interop.expressions import Node, Split, Stack, Tensor, Transpose, Window
from lite_tp_jax.interop.hf_config import family_of
from lite_tp_jax.models.config import ModelConfig


def hf_layout(config: ModelConfig, prefix: str | None = None) -> dict[str, Node]:
    """``{parameter name (as export_state names it): expression over HF tensors}``.
    Stacked layers are a ``Stack`` over the layer groups, per block position.
    ``prefix`` replaces the family's ``"transformer."`` or ``"model."``."""
    family = family_of(config)
    if family == "gpt2":
        return _gpt2_layout(config, "transformer." if prefix is None else prefix)
    p = "model." if prefix is None else prefix
    params = _llama_attention_layout(config, p)
    if family == "mixtral":
        params.update(_mixtral_mlp_layout(config, p))
        return params
    params.update(_llama_mlp_layout(config, p))
    if family in ("qwen2_moe", "qwen3_moe"):
        params.update(_qwen_moe_layout(config, p))
    return params


def _linear(name: str, out: int, in_: int) -> Node:
    """An ``nn.Linear`` weight ``[out, in]`` as a Flax kernel ``[in, out]``."""
    return Transpose(Tensor(name, (out, in_)), (1, 0))


def _stacker(config: ModelConfig, params: dict[str, Node]) -> Callable[..., None]:
    """``stacked(ours, make, blocks="all")`` sets the stacked-layers parameter
    ``ours`` of each block position of a layer group to ``Stack(make(i) for its
    layers i)``; ``blocks``: "all", "dense" (the MLP blocks) or "moe" (the last
    of each group of ``moe_every``)."""
    size = config.layers_per_group
    groups = config.num_layers // size

    def stacked(ours: str, make: Callable[[int], Node], blocks: str = "all") -> None:
        for j in range(size):
            moe = bool(config.moe_every) and j == size - 1
            if blocks == "all" or (blocks == "moe") == moe:
                params[f"layers.blocks.{j}.{ours}"] = Stack(tuple(make(g * size + j) for g in range(groups)))

    return stacked


def _gpt2_layout(config: ModelConfig, p: str) -> dict[str, Node]:
    """GPT-2: Conv1D weights are ``[in, out]`` already; ``c_attn`` is q, k and v side by side."""
    h, v, f = config.hidden_size, config.vocab_size, config.ffn_hidden_size
    heads, d = config.num_heads, config.resolved_head_dim
    params: dict[str, Node] = {}
    stacked = _stacker(config, params)
    params["embed.embedding"] = Tensor(f"{p}wte.weight", (v, h))
    params["positions.embedding"] = Tensor(f"{p}wpe.weight", (config.max_positions, h))
    params["final_norm.scale"] = Tensor(f"{p}ln_f.weight", (h,))
    params["final_norm.bias"] = Tensor(f"{p}ln_f.bias", (h,))
    for ours, theirs in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
        stacked(f"{ours}.scale", lambda i, t=theirs: Tensor(f"{p}h.{i}.{t}.weight", (h,)))
        stacked(f"{ours}.bias", lambda i, t=theirs: Tensor(f"{p}h.{i}.{t}.bias", (h,)))
    for k, proj in enumerate(("query", "key", "value")):  # c_attn: Conv1D [in, 3h] = [q | k | v]
        stacked(f"attention.{proj}.kernel", lambda i, k=k: Split(
            Window(Tensor(f"{p}h.{i}.attn.c_attn.weight", (h, 3 * h)), 1, k * h, (k + 1) * h), 1, (heads, d)))
        stacked(f"attention.{proj}.bias", lambda i, k=k: Split(
            Window(Tensor(f"{p}h.{i}.attn.c_attn.bias", (3 * h,)), 0, k * h, (k + 1) * h), 0, (heads, d)))
    stacked("attention.out.kernel", lambda i: Split(Tensor(f"{p}h.{i}.attn.c_proj.weight", (h, h)), 0, (heads, d)))
    stacked("attention.out.bias", lambda i: Tensor(f"{p}h.{i}.attn.c_proj.bias", (h,)))
    stacked("mlp.up.kernel", lambda i: Tensor(f"{p}h.{i}.mlp.c_fc.weight", (h, f)))
    stacked("mlp.up.bias", lambda i: Tensor(f"{p}h.{i}.mlp.c_fc.bias", (f,)))
    stacked("mlp.down.kernel", lambda i: Tensor(f"{p}h.{i}.mlp.c_proj.weight", (f, h)))
    stacked("mlp.down.bias", lambda i: Tensor(f"{p}h.{i}.mlp.c_proj.bias", (h,)))
    if not config.tie_embeddings:
        params["head.embedding"] = Tensor("lm_head.weight", (v, h))
    return params


def _llama_attention_layout(config: ModelConfig, p: str) -> dict[str, Node]:
    """Llama, Mistral, Qwen2 and Mixtral: embedding, head, norms and attention."""
    h, v = config.hidden_size, config.vocab_size
    heads, kv, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    params: dict[str, Node] = {}
    stacked = _stacker(config, params)
    params["embed.embedding"] = Tensor(f"{p}embed_tokens.weight", (v, h))
    params["final_norm.scale"] = Tensor(f"{p}norm.weight", (h,))
    if not config.tie_embeddings:
        params["head.embedding"] = Tensor("lm_head.weight", (v, h))
    layer = lambda i: f"{p}layers.{i}"  # noqa: E731
    stacked("attention_norm.scale", lambda i: Tensor(f"{layer(i)}.input_layernorm.weight", (h,)))
    stacked("mlp_norm.scale", lambda i: Tensor(f"{layer(i)}.post_attention_layernorm.weight", (h,)))
    for proj, hf_name, n in (("query", "q_proj", heads), ("key", "k_proj", kv), ("value", "v_proj", kv)):
        stacked(f"attention.{proj}.kernel", lambda i, t=hf_name, n=n: Split(
            _linear(f"{layer(i)}.self_attn.{t}.weight", n * d, h), 1, (n, d)))
        if config.qkv_bias:
            stacked(f"attention.{proj}.bias", lambda i, t=hf_name, n=n: Split(
                Tensor(f"{layer(i)}.self_attn.{t}.bias", (n * d,)), 0, (n, d)))
    stacked("attention.out.kernel", lambda i: Split(_linear(f"{layer(i)}.self_attn.o_proj.weight", h, heads * d), 0, (heads, d)))
    if config.qk_norm:
        stacked("attention.query_norm.scale", lambda i: Tensor(f"{layer(i)}.self_attn.q_norm.weight", (d,)))
        stacked("attention.key_norm.scale", lambda i: Tensor(f"{layer(i)}.self_attn.k_norm.weight", (d,)))
    if config.out_bias:
        stacked("attention.out.bias", lambda i: Tensor(f"{layer(i)}.self_attn.o_proj.bias", (h,)))
    return params


def _llama_mlp_layout(config: ModelConfig, p: str) -> dict[str, Node]:
    """Llama, Mistral, Qwen2 and Qwen3 (and the dense layers of Qwen-MoE): the
    SwiGLU MLP, biased if ``config.mlp_bias``."""
    h, f = config.hidden_size, config.ffn_hidden_size
    params: dict[str, Node] = {}
    stacked = _stacker(config, params)
    for ours, theirs, out, in_ in (("gate", "gate_proj", f, h), ("up", "up_proj", f, h), ("down", "down_proj", h, f)):
        stacked(f"mlp.{ours}.kernel", lambda i, t=theirs, o=out, n=in_: _linear(f"{p}layers.{i}.mlp.{t}.weight", o, n),
                "dense")
        if config.mlp_bias:
            stacked(f"mlp.{ours}.bias", lambda i, t=theirs, o=out: Tensor(f"{p}layers.{i}.mlp.{t}.bias", (o,)), "dense")
    return params


def _qwen_moe_layout(config: ModelConfig, p: str) -> dict[str, Node]:
    """Qwen2-MoE and Qwen3-MoE: ``mlp.gate`` (the router), ``mlp.experts.e.*_proj``
    and Qwen2-MoE's ``mlp.shared_expert.*_proj`` and ``mlp.shared_expert_gate``."""
    h, f, e = config.hidden_size, config.expert_ffn_size, config.num_experts
    params: dict[str, Node] = {}
    stacked = _stacker(config, params)
    mlp = lambda i: f"{p}layers.{i}.mlp"  # noqa: E731
    stacked("mlp.router.kernel", lambda i: _linear(f"{mlp(i)}.gate.weight", e, h), "moe")
    projections = (("gate", "gate_proj", True), ("up", "up_proj", True), ("down", "down_proj", False))
    for ours, theirs, column in projections:
        shape = (f, h) if column else (h, f)
        stacked(f"mlp.{ours}.kernel", lambda i, t=theirs, s=shape: Stack(
            tuple(_linear(f"{mlp(i)}.experts.{x}.{t}.weight", *s) for x in range(e))), "moe")
    if config.shared_expert_size:
        fs = config.shared_expert_size
        for ours, theirs, column in projections:
            shape = (fs, h) if column else (h, fs)
            stacked(f"mlp.shared.{ours}.kernel", lambda i, t=theirs, s=shape: _linear(f"{mlp(i)}.shared_expert.{t}.weight", *s),
                    "moe")
        stacked("mlp.shared_gate.kernel", lambda i: _linear(f"{mlp(i)}.shared_expert_gate.weight", 1, h), "moe")
    return params


def _mixtral_mlp_layout(config: ModelConfig, p: str) -> dict[str, Node]:
    """Mixtral: the router and each expert's SwiGLU MLP, stacked over experts."""
    h, f = config.hidden_size, config.ffn_hidden_size
    params: dict[str, Node] = {}
    stacked = _stacker(config, params)
    moe = lambda i: f"{p}layers.{i}.block_sparse_moe"  # noqa: E731
    experts = range(config.num_experts)
    stacked("mlp.router.kernel", lambda i: _linear(f"{moe(i)}.gate.weight", config.num_experts, h))
    for ours, theirs, out, in_ in (("gate", "w1", f, h), ("up", "w3", f, h), ("down", "w2", h, f)):
        stacked(f"mlp.{ours}.kernel", lambda i, t=theirs, o=out, n=in_: Stack(
            tuple(_linear(f"{moe(i)}.experts.{e}.{t}.weight", o, n) for e in experts)))
    return params
