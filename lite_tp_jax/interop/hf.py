"""Hugging Face checkpoints straight onto the mesh, and back.

``from_pretrained(path, mesh=...)`` reads a Hugging Face model directory
(``config.json`` and ``*.safetensors``, sharded with
``model.safetensors.index.json`` or not) of the Llama 2/3, Mistral, Qwen2,
Mixtral or GPT-2 family into a sharded ``Transformer``. ``save_pretrained``
writes one back.

Straight into shards. The model is built abstractly (``nnx.eval_shape``: no
random weights are drawn), then every parameter is assembled device by device
from its sharding metadata (``jax.make_array_from_single_device_arrays``; not
``make_array_from_callback``, which holds every device's block on the host
before placing any): for each device, the block of the checkpoint tensor(s)
its shard covers is read through a memory map of the safetensors file, padded
where the shard runs past an uneven dimension's logical end, and put on the
device. The host holds one tensor's worth of file pages and one block at a
time, never the model.

How a parameter is found in the checkpoint is a small expression per name
(``hf_layout``): an HF tensor (``Tensor``), transposed (``Transpose``: PyTorch
``nn.Linear`` stores ``[out, in]``, Flax ``[in, out]``), a dim split in two
(``Split``: ``[heads * head_dim]`` -> ``[heads, head_dim]``), a window of a
fused tensor (``Window``: GPT-2's ``c_attn`` holds q, k and v side by side),
and a stack of per-layer or per-expert tensors (``Stack``). Reading a block
of an expression reads only the matching block of the file; writing runs the
same expressions backwards (``save_pretrained``).

Why not orbax's v1 safetensors layout (``CheckpointLayout.SAFETENSORS``): it
restores each checkpoint tensor under its own name and shape into a target
sharding, while here a parameter is a transposed, reshaped, padded stack of
several checkpoint tensors (layers, experts, GPT-2's fused q/k/v). And why a
memory map rather than ``safetensors.safe_open``: its numpy backend cannot
represent bfloat16, the dtype of most published checkpoints (``ml_dtypes``
can). The writer is the safetensors package's ``save_file``.

Not supported (a one-line error): other ``model_type``s, RoPE scalings other
than "linear" and "llama3", activations other than SiLU (GPT-2: tanh GeLU),
more than 2 experts per token. Mistral's and Mixtral's ``sliding_window`` is
not applied: attention is causal over the whole sequence, equal to Hugging
Face's for sequences no longer than the window.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.sharding.state import flat_variables, logical_shape, spec_of, to_logical

FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "gpt2")
MAX_SHARD_BYTES = 2 * 1024**3  # save_pretrained's file size before it splits into shards + index

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}


class HFError(BadInput):
    """A Hugging Face checkpoint or config this module cannot use, in one sentence."""


# --------------------------------------------------------------------------
# Reading safetensors files: header, then a memory map per tensor read
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file


def _read_header(file: Path) -> dict[str, _Entry]:
    size = file.stat().st_size
    with file.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= size - 8:
            raise HFError(f"{file} is not a safetensors file (header length {length}, file size {size}).")
        header = json.loads(f.read(length))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise HFError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know.")
        begin, end = info["data_offsets"]
        entry = _Entry(file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin)
        if end - begin != math.prod(entry.shape) * entry.dtype.itemsize or entry.offset + end - begin > size:
            raise HFError(f"{file}: tensor {name!r} has data offsets {info['data_offsets']} that do not fit its shape or the file.")
        entries[name] = entry
    return entries


class Checkpoint:
    """The tensors of a Hugging Face model directory, by name, read in blocks."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise HFError(f"{self.directory} holds no *.safetensors files (pytorch_model.bin is not read: no pickle).")
        self.entries: dict[str, _Entry] = {}
        for name in files:
            if not (self.directory / name).exists():
                raise HFError(f"{index} names {name}, which is not in {self.directory}.")
            self.entries.update(_read_header(self.directory / name))

    def shape(self, name: str) -> tuple[int, ...] | None:
        entry = self.entries.get(name)
        return None if entry is None else entry.shape

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """A copy of ``tensor[index]``; only the file pages it covers are touched."""
        entry = self.entries[name]
        mapped = np.memmap(entry.file, entry.dtype, mode="r", offset=entry.offset, shape=entry.shape)
        block = np.array(mapped[index])
        del mapped
        return block


# --------------------------------------------------------------------------
# Where a parameter is in the checkpoint: small expressions over HF tensors
# --------------------------------------------------------------------------

Index = tuple[slice, ...]


class Node:
    """An array expression over checkpoint tensors. ``read(checkpoint, index)``
    returns ``self[index]`` reading no more than it needs; ``write(value, out,
    index)`` stores ``value`` as ``self[index]`` into the HF buffers ``out``."""

    shape: tuple[int, ...]

    def leaves(self) -> list[Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Tensor(Node):
    name: str
    shape: tuple[int, ...]

    def leaves(self):
        return [self]

    def read(self, checkpoint: Checkpoint, index: Index) -> np.ndarray:
        return checkpoint.read(self.name, index)

    def write(self, value: np.ndarray, out: dict[str, np.ndarray], index: Index) -> None:
        out[self.name][index] = value


@dataclass(frozen=True)
class Transpose(Node):
    """``base.transpose(perm)``."""

    base: Node
    perm: tuple[int, ...]

    @property
    def shape(self):
        return tuple(self.base.shape[p] for p in self.perm)

    def leaves(self):
        return self.base.leaves()

    def _base_index(self, index: Index) -> Index:
        base = [slice(None)] * len(self.perm)
        for i, p in enumerate(self.perm):
            base[p] = index[i]
        return tuple(base)

    def read(self, checkpoint, index):
        return self.base.read(checkpoint, self._base_index(index)).transpose(self.perm)

    def write(self, value, out, index):
        self.base.write(value.transpose(np.argsort(self.perm)), out, self._base_index(index))


@dataclass(frozen=True)
class Split(Node):
    """``base`` with dim ``dim`` (of size ``a * b``) split into ``(a, b)``."""

    base: Node
    dim: int
    sizes: tuple[int, int]

    @property
    def shape(self):
        shape = self.base.shape
        return (*shape[: self.dim], *self.sizes, *shape[self.dim + 1 :])

    def leaves(self):
        return self.base.leaves()

    def read(self, checkpoint, index):
        outer, inner = index[self.dim], index[self.dim + 1]
        b = self.sizes[1]
        rows = slice(outer.start * b, outer.stop * b)
        block = self.base.read(checkpoint, (*index[: self.dim], rows, *index[self.dim + 2 :]))
        block = block.reshape(*block.shape[: self.dim], outer.stop - outer.start, b, *block.shape[self.dim + 1 :])
        return block[(slice(None),) * (self.dim + 1) + (inner,)]

    def write(self, value, out, index):
        outer, inner = index[self.dim], index[self.dim + 1]
        if (inner.start, inner.stop) != (0, self.sizes[1]):
            raise NotImplementedError("Split.write needs whole inner rows")
        b = self.sizes[1]
        merged = value.reshape(*value.shape[: self.dim], -1, *value.shape[self.dim + 2 :])
        self.base.write(merged, out, (*index[: self.dim], slice(outer.start * b, outer.stop * b), *index[self.dim + 2 :]))


@dataclass(frozen=True)
class Window(Node):
    """``base[..., start:stop, ...]`` along ``dim``."""

    base: Node
    dim: int
    start: int
    stop: int

    @property
    def shape(self):
        shape = list(self.base.shape)
        shape[self.dim] = self.stop - self.start
        return tuple(shape)

    def leaves(self):
        return self.base.leaves()

    def _base_index(self, index):
        s = index[self.dim]
        return (*index[: self.dim], slice(s.start + self.start, s.stop + self.start), *index[self.dim + 1 :])

    def read(self, checkpoint, index):
        return self.base.read(checkpoint, self._base_index(index))

    def write(self, value, out, index):
        self.base.write(value, out, self._base_index(index))


@dataclass(frozen=True)
class Stack(Node):
    """``stack(items)`` along a new leading dim (layers, experts)."""

    items: tuple[Node, ...]

    @property
    def shape(self):
        return (len(self.items), *self.items[0].shape)

    def leaves(self):
        return [leaf for item in self.items for leaf in item.leaves()]

    def read(self, checkpoint, index):
        first, rest = index[0], index[1:]
        return np.stack([self.items[i].read(checkpoint, rest) for i in range(first.start, first.stop)])

    def write(self, value, out, index):
        first, rest = index[0], index[1:]
        for k, i in enumerate(range(first.start, first.stop)):
            self.items[i].write(value[k], out, rest)


def _full(shape: Sequence[int]) -> Index:
    return tuple(slice(0, n) for n in shape)


# --------------------------------------------------------------------------
# Configs: Hugging Face config.json <-> ModelConfig
# --------------------------------------------------------------------------


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


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json`` (as a dict)."""
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
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise HFError("Qwen2 with use_sliding_window: true is not supported.")
    heads = hf["num_attention_heads"]
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
        ffn_hidden_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_positions=hf.get("max_position_embeddings", 2048), **_rope(hf),
    )
    if family == "llama":
        bias = bool(hf.get("attention_bias", False))
        fields.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if family == "qwen2":
        fields.update(qkv_bias=True)
    if family == "mixtral":
        top_k = hf.get("num_experts_per_tok", 2)
        if top_k not in (1, 2):
            raise HFError(f"Mixtral num_experts_per_tok={top_k} is not supported; supported: 1 or 2.")
        fields.update(
            moe_every=1, num_experts=hf["num_local_experts"], top_k=top_k, capacity_factor=None,
            aux_loss_weight=hf.get("router_aux_loss_coef", 0.01),
        )
    return ModelConfig(**fields)


def family_of(config: ModelConfig) -> str:
    """The Hugging Face family that represents ``config`` (Mistral's shape is
    Llama's: it is written as "llama")."""
    gpt2 = (config.norm, config.activation, config.position) == ("layer", "gelu", "learned")
    if gpt2 and config.qkv_bias and config.out_bias and config.mlp_bias and config.num_kv_heads == config.num_heads:
        return "gpt2"
    if config.norm != "rms" or config.activation != "swiglu" or config.position != "rope":
        raise HFError("this model's mix of norm, activation and position type matches no Hugging Face family.")
    if config.moe_every:
        if config.moe_every != 1:
            raise HFError(f"moe_every={config.moe_every} has no Hugging Face family (Mixtral: every layer, moe_every=1).")
        if config.qkv_bias or config.out_bias or config.mlp_bias:
            raise HFError("Mixtral has no biases; this model has some.")
        return "mixtral"
    if config.qkv_bias and not config.out_bias and not config.mlp_bias:
        return "qwen2"
    if config.qkv_bias != config.out_bias:
        raise HFError("Llama biases its q, k, v and output projections together; this model does not.")
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
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}[family]],
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
    if family == "mixtral":
        hf.update(
            num_local_experts=config.num_experts, num_experts_per_tok=config.top_k,
            router_aux_loss_coef=config.aux_loss_weight, sliding_window=None,
        )
    if family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


# --------------------------------------------------------------------------
# The layout: parameter name -> expression over HF tensors
# --------------------------------------------------------------------------


def _linear(name: str, out: int, in_: int) -> Node:
    """An ``nn.Linear`` weight ``[out, in]`` as a Flax kernel ``[in, out]``."""
    return Transpose(Tensor(name, (out, in_)), (1, 0))


def hf_layout(config: ModelConfig, prefix: str | None = None) -> dict[str, Node]:
    """``{parameter name (as export_state names it): expression over HF tensors}``.
    Stacked layers are a ``Stack`` over the layer index (groups of one layer)."""
    family = family_of(config)
    h, v, f = config.hidden_size, config.vocab_size, config.ffn_hidden_size
    heads, kv, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    layers = range(config.num_layers)
    params: dict[str, Node] = {}

    def stacked(ours: str, make) -> None:
        params[f"layers.blocks.0.{ours}"] = Stack(tuple(make(i) for i in layers))

    if family == "gpt2":
        p = "transformer." if prefix is None else prefix
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

    p = "model." if prefix is None else prefix
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
    if config.out_bias:
        stacked("attention.out.bias", lambda i: Tensor(f"{layer(i)}.self_attn.o_proj.bias", (h,)))
    if family == "mixtral":
        moe = lambda i: f"{layer(i)}.block_sparse_moe"  # noqa: E731
        experts = range(config.num_experts)
        stacked("mlp.router.kernel", lambda i: _linear(f"{moe(i)}.gate.weight", config.num_experts, h))
        for ours, theirs, out, in_ in (("gate", "w1", f, h), ("up", "w3", f, h), ("down", "w2", h, f)):
            stacked(f"mlp.{ours}.kernel", lambda i, t=theirs, o=out, n=in_: Stack(
                tuple(_linear(f"{moe(i)}.experts.{e}.{t}.weight", o, n) for e in experts)))
        return params
    for ours, theirs, out, in_ in (("gate", "gate_proj", f, h), ("up", "up_proj", f, h), ("down", "down_proj", h, f)):
        stacked(f"mlp.{ours}.kernel", lambda i, t=theirs, o=out, n=in_: _linear(f"{layer(i)}.mlp.{t}.weight", o, n))
        if config.mlp_bias:
            stacked(f"mlp.{ours}.bias", lambda i, t=theirs, o=out: Tensor(f"{layer(i)}.mlp.{t}.bias", (o,)))
    return params


# --------------------------------------------------------------------------
# from_pretrained
# --------------------------------------------------------------------------


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.exists():
        raise HFError(f"{path} is not a Hugging Face model directory: it has no config.json.")
    return json.loads(file.read_text())


def _prefix(config: ModelConfig, checkpoint: Checkpoint) -> str | None:
    """GPT-2 checkpoints come with and without the ``transformer.`` prefix."""
    if family_of(config) == "gpt2" and checkpoint.shape("transformer.wte.weight") is None and checkpoint.shape("wte.weight"):
        return ""
    return None


def _check_present(layout: dict[str, Node], checkpoint: Checkpoint) -> None:
    for node in layout.values():
        for leaf in node.leaves():
            found = checkpoint.shape(leaf.name)
            if found is None:
                raise HFError(f"{checkpoint.directory} lacks tensor {leaf.name!r} (expected shape {list(leaf.shape)}).")
            if tuple(found) != leaf.shape:
                raise HFError(
                    f"{checkpoint.directory}: tensor {leaf.name!r} has shape {list(found)}, config.json implies {list(leaf.shape)}."
                )


def _read_block(node: Node, checkpoint: Checkpoint, variable: nnx.Variable, index: tuple[slice, ...], dtype) -> np.ndarray:
    """The block ``index`` of the parameter's stored (stacked, padded) array,
    read from the checkpoint; zeros where it runs past a logical dim."""
    stored = tuple(variable.shape)
    trailing = tuple(variable.get_metadata().get("logical_shape", stored))
    stacking = stored[: len(stored) - len(trailing)]
    block = np.zeros([s.stop - s.start for s in index], dtype)
    inner = tuple(slice(min(s.start, n), min(s.stop, n)) for s, n in zip(index[len(stacking):], trailing))
    if any(s.stop <= s.start for s in inner):
        return block
    where = (Ellipsis, *(slice(0, s.stop - s.start) for s in inner))
    if not stacking:
        block[where] = node.read(checkpoint, inner)
        return block
    layer_ids = np.arange(math.prod(stacking)).reshape(stacking)[index[: len(stacking)]]
    for position in np.ndindex(layer_ids.shape):
        layer = int(layer_ids[position])
        block[position][where] = node.read(checkpoint, (slice(layer, layer + 1), *inner))[0]
    return block


def _load_parameter(node: Node, checkpoint: Checkpoint, variable: nnx.Variable, sharding: NamedSharding, dtype) -> jax.Array:
    """The parameter as a sharded array, built device by device: each device's
    block is read from the checkpoint and put on it before the next is read,
    so the host holds one block at a time. Devices holding the same block (a
    replicated dim) copy it from the first one."""
    shape = tuple(variable.shape)
    placed: dict[tuple, jax.Array] = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        key = tuple((s.start, s.stop) for s in index)
        if key in placed:
            arrays.append(jax.device_put(placed[key], device))
        else:
            placed[key] = jax.device_put(_read_block(node, checkpoint, variable, index, dtype), device)
            arrays.append(placed[key])
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def from_pretrained(path: str | os.PathLike, *, mesh: Mesh, dtype: Any = jnp.float32) -> Transformer:
    """A ``Transformer`` on ``mesh`` holding the weights of the Hugging Face model
    directory ``path``; calling it on ``[batch, seq]`` ids gives ``[batch, seq, vocab]``
    logits. Each device reads only its shards from the safetensors files."""
    return load_model(path, config_from_hf(read_hf_config(path)), mesh=mesh, dtype=dtype)


def load_model(path: str | os.PathLike, config: ModelConfig, *, mesh: Mesh, dtype: Any = jnp.float32) -> Transformer:
    """``from_pretrained`` with a given ``config``: the one ``config.json``
    implies, changed only in how it runs (``sequence_parallel``, ``remat``, ...)."""
    checkpoint = Checkpoint(path)
    layout = hf_layout(config, _prefix(config, checkpoint))
    _check_present(layout, checkpoint)
    abstract = nnx.eval_shape(lambda: Transformer(config, mesh=mesh, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = flat_variables(state)
    if set(variables) != set(layout):
        raise HFError(f"internal: layout and model disagree on {sorted(set(variables) ^ set(layout))}.")
    for name, variable in variables.items():
        node = layout[name]
        if logical_shape(variable) != node.shape:
            raise HFError(f"internal: {name} is {logical_shape(variable)} in the model, {node.shape} in the layout.")
        sharding = NamedSharding(mesh, spec_of(variable))
        variable.set_value(_load_parameter(node, checkpoint, variable, sharding, jnp.dtype(dtype)))
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------
# save_pretrained
# --------------------------------------------------------------------------


def save_pretrained(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes ``model`` as a Hugging Face model directory: ``config.json`` and
    ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` files and
    ``model.safetensors.index.json`` past ``max_shard_bytes``). Gathers one
    parameter at a time to the host. ``path`` must not exist or be empty; the
    directory appears complete or not at all."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise HFError(f"{path} exists and is not empty; save_pretrained does not overwrite.")
    config = model.config
    layout = hf_layout(config)
    variables = flat_variables(model)
    dtype = next(iter(variables.values())).dtype
    buffers = {leaf.name: np.zeros(leaf.shape, dtype) for node in layout.values() for leaf in node.leaves()}
    for name, node in layout.items():
        node.write(np.asarray(jax.device_get(to_logical(variables[name]))), buffers, _full(node.shape))

    files: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in buffers.items():
        if files[-1] and size + value.nbytes > max_shard_bytes:
            files.append({})
            size = 0
        files[-1][name] = value
        size += value.nbytes
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        names = (
            ["model.safetensors"] if len(files) == 1
            else [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
        )
        for file_name, tensors in zip(names, files):
            save_file(tensors, staging / file_name, metadata={"format": "pt"})
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(v.nbytes for v in buffers.values())},
                "weight_map": {name: file_name for file_name, tensors in zip(names, files) for name in tensors},
            }
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2))
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
