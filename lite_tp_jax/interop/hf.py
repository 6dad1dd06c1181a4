"""Hugging Face checkpoints straight onto the mesh, and back.

``from_pretrained(path, mesh=...)`` reads a Hugging Face model directory
(``config.json`` and ``*.safetensors``, sharded with
``model.safetensors.index.json`` or not) of the Llama 2/3, Mistral, Qwen2,
Mixtral or GPT-2 family (``hf_config``) into a sharded ``Transformer``;
``load_model`` does the same with a given config. ``save_pretrained`` writes
one back.

What shards where. The model is built abstractly (``nnx.eval_shape``: no
random weights are drawn), and each parameter takes the sharding its metadata
gives it (``spec_of``) on ``mesh``. Then every parameter is assembled device
by device: for each addressable device, the block its shard covers is read
from the checkpoint (``hf_layouts`` says where the parameter is;
``safetensors_files`` reads only that block of the file), padded with zeros
where the shard runs past an uneven dimension's logical end, and put on the
device before the next block is read; devices holding the same block (a
replicated dim) copy it from the first. The placed blocks are joined with
``jax.make_array_from_single_device_arrays``, not with
``jax.make_array_from_callback``, which holds every device's block on the
host before placing any. The host holds one block at a time, never the model.

``save_pretrained`` gathers one parameter at a time to the host and writes it
into whole Hugging Face tensors by running the same layout backwards; the
writer is the safetensors package's ``save_file``, shards past
``MAX_SHARD_BYTES`` with an index.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lite_tp_jax.interop.errors import HFError
from lite_tp_jax.interop.expressions import Node, full_index
from lite_tp_jax.interop.hf_config import config_from_hf, config_to_hf, family_of, read_hf_config
from lite_tp_jax.interop.hf_layouts import hf_layout
from lite_tp_jax.interop.safetensors_files import Checkpoint
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.sharding.state import flat_variables, logical_shape, spec_of, to_logical

MAX_SHARD_BYTES = 2 * 1024**3  # save_pretrained's file size before it splits into shards + index


# --------------------------------------------------------------------------
# from_pretrained
# --------------------------------------------------------------------------


def _prefix(config: ModelConfig, checkpoint: Checkpoint) -> str | None:
    """GPT-2 checkpoints come with and without the ``transformer.`` prefix."""
    if family_of(config) == "gpt2" and checkpoint.shape("transformer.wte.weight") is None and checkpoint.shape("wte.weight"):
        return ""
    return None


_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$|^lm_head\.weight$")
"""Tensors a Hugging Face file may hold that are no parameters: RoPE's and GPT-2's
buffers, and a tied head saved anyway (checked only where the model ties it)."""


def _check_present(layout: dict[str, Node], checkpoint: Checkpoint) -> None:
    """HFError naming the first tensor the config needs that the files lack or
    shape otherwise, or the tensors they hold that the config does not use (a
    third layer in a two-layer config: silently dropping it would be a different model)."""
    used = {leaf.name for node in layout.values() for leaf in node.leaves()}
    unused = sorted(name for name in set(checkpoint.entries) - used if not _BUFFERS.search(name))
    if unused:
        shown = ", ".join(repr(n) for n in unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        raise HFError(f"{checkpoint.directory} holds tensors its config.json does not use ({shown}); "
                      f"check num_hidden_layers and the other sizes in config.json.")
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
    return load_model(path, config_from_hf(read_hf_config(path), Path(path) / "config.json"), mesh=mesh, dtype=dtype)


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


def check_new_model_dir(path: str | os.PathLike) -> None:
    """HFError unless ``path`` is free for a new model directory: absent, or an empty directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HFError(f"{path} is an existing file; give a new directory for the Hugging Face model.")
    if path.is_dir() and any(path.iterdir()):
        raise HFError(f"{path} exists and is not empty; give a new directory (nothing is overwritten).")


def save_pretrained(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes ``model`` as a Hugging Face model directory: ``config.json`` and
    ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` files and
    ``model.safetensors.index.json`` past ``max_shard_bytes``). Gathers one
    parameter at a time to the host. ``path`` must not exist or be empty; the
    directory appears complete or not at all."""
    path = Path(path)
    check_new_model_dir(path)
    config = model.config
    layout = hf_layout(config)
    variables = flat_variables(model)
    dtype = next(iter(variables.values())).dtype
    buffers = {leaf.name: np.zeros(leaf.shape, dtype) for node in layout.values() for leaf in node.leaves()}
    for name, node in layout.items():
        node.write(np.asarray(jax.device_get(to_logical(variables[name]))), buffers, full_index(node.shape))

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
