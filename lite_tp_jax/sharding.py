"""Where parameters live: sharded creation, padding for uneven shards, and the
tensor-parallel region a layer runs in.

Uneven shards. The spec allows shards of unequal size (sum of n_i = n); JAX
shardings need equal ones. A parameter dimension split over "tensor" is stored
padded at its end to the next multiple of the TP degree, so rank i holds
logical indices [i*s, (i+1)*s) and the last ranks hold fewer real ones. Layers
zero the padding (``mask_padding``) before every use, so padding never reaches
a result or a gradient; ``export_state`` slices it away. Users only see
logical shapes.

Tensor-parallel region. A layer's math is written for one rank's shards (its
``local`` method) with explicit collectives over "tensor". Called from ordinary
jit code, the layer enters ``jax.shard_map`` with only the "tensor" axis manual
(``enter_tensor_region``): the other mesh axes stay automatic, so a batch
sharded over "data" stays sharded. Called from inside a region (a model that
entered it once for all its layers), it runs ``local`` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.mesh import TENSOR

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]

default_kernel_init: Initializer = nnx.initializers.lecun_normal()
zeros_init: Initializer = nnx.initializers.zeros_init()
ones_init: Initializer = nnx.initializers.ones_init()
default_embedding_init: Initializer = nnx.initializers.normal(stddev=0.02)


def padded_size(size: int, parts: int) -> int:
    """Smallest multiple of ``parts`` that is >= ``size``."""
    return -(-size // parts) * parts


def tensor_size(mesh: Mesh) -> int:
    return mesh.shape[TENSOR]


def axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    """Number of ranks of ``axes`` taken together."""
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


@partial(jax.jit, static_argnames=("init", "shape", "padded_shape", "dtype", "sharding"))
def _init_padded(key, *, init, shape, padded_shape, dtype, sharding):
    value = init(key, shape, dtype)
    value = jnp.pad(value, [(0, p - s) for s, p in zip(shape, padded_shape)])
    return jax.lax.with_sharding_constraint(value, sharding)


def sharded_param(
    init: Initializer,
    key: jax.Array,
    shape: Sequence[int],
    spec: P,
    mesh: Mesh,
    *,
    padded_shape: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
) -> nnx.Param:
    """An ``nnx.Param`` of logical ``shape``, stored as ``padded_shape`` sharded by ``spec``.

    The values are drawn for the logical shape (so they do not depend on the TP
    degree), padded with zeros, and produced directly in their sharding: each
    device computes only its own shard. The Param carries ``out_sharding``
    (its PartitionSpec), ``mesh`` and ``logical_shape`` as metadata.
    """
    shape = tuple(int(s) for s in shape)
    padded_shape = shape if padded_shape is None else tuple(int(s) for s in padded_shape)
    value = _init_padded(
        key,
        init=init,
        shape=shape,
        padded_shape=padded_shape,
        dtype=jnp.dtype(dtype),
        sharding=NamedSharding(mesh, spec),
    )
    return nnx.Param(
        value,
        out_sharding=tuple(spec),
        mesh=mesh,
        logical_shape=shape,
        eager_sharding=False,
    )


def in_tensor_region() -> bool:
    """True inside a shard_map where the "tensor" axis is manual."""
    return TENSOR in jax.sharding.get_abstract_mesh().manual_axes


def mask_padding(x: jax.Array, dim: int, logical: int, axis: str | tuple[str, ...] = TENSOR) -> jax.Array:
    """Zeroes the entries of this rank's shard that lie past ``logical`` along ``dim``.

    ``x`` is one rank's shard of a dimension padded to ``axis_size * x.shape[dim]``.
    A no-op (traced away) when the dimension divides evenly.
    """
    local = x.shape[dim]
    if local * jax.lax.axis_size(axis) == logical:
        return x
    index = jax.lax.axis_index(axis) * local + jnp.arange(local)
    shape = [1] * x.ndim
    shape[dim] = local
    return jnp.where((index < logical).reshape(shape), x, jnp.zeros((), x.dtype))


def spec_for_region(spec: Sequence[Any] | None, axes: frozenset[str] = frozenset({TENSOR})) -> P:
    """The part of a PartitionSpec that names manual ``axes``; other entries become None."""

    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(name for name in names if name in axes)
        return kept[0] if len(kept) == 1 else (kept or None)

    return P(*(keep(entry) for entry in (spec or ())))


def param_specs(state: nnx.State, axes: frozenset[str] = frozenset({TENSOR})) -> Any:
    """PartitionSpecs of every variable in ``state``, restricted to ``axes``."""

    def spec_of(variable):
        return spec_for_region(variable.get_metadata().get("out_sharding"), axes)

    return jax.tree.map(spec_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def enter_tensor_region(
    module: nnx.Module,
    method: Callable[..., Any],
    *args: Any,
    arg_specs: Sequence[P],
    out_specs: Any,
    axes: frozenset[str] = frozenset({TENSOR}),
) -> Any:
    """Runs ``method(module, *args)`` in a shard_map of ``module.mesh`` where
    ``axes`` (by default only "tensor") are manual and the others automatic.

    Parameters enter as their shards along ``axes`` (per their ``out_sharding``
    metadata), ``args`` per ``arg_specs``.
    """
    graphdef, state = nnx.split(module)

    def body(state, *args):
        return method(nnx.merge(graphdef, state), *args)

    return jax.shard_map(
        body,
        mesh=module.mesh,
        in_specs=(param_specs(state, axes), *arg_specs),
        out_specs=out_specs,
        axis_names=set(axes),
    )(state, *args)


def call_local(module: nnx.Module, x: jax.Array) -> Any:
    """``module.local(x)`` for an activation ``x [..., seq, features]`` that is
    replicated over "tensor", or split along ``seq`` when
    ``module.sequence_parallel``: directly inside a region, else in one
    entered for it (the output is laid out like the input)."""
    if in_tensor_region():
        return module.local(x)
    spec = P()
    if module.sequence_parallel:
        check_sequence_divisible(x, module.mesh, type(module).__name__)
        spec = sequence_spec(x.ndim)
    return enter_tensor_region(module, type(module).local, x, arg_specs=(spec,), out_specs=spec)


def feature_spec(ndim: int, last: str | None = TENSOR) -> P:
    """PartitionSpec of an activation with ``ndim`` dims whose last one is split over ``last``."""
    return P(*([None] * (ndim - 1)), last)


def sequence_spec(ndim: int) -> P:
    """PartitionSpec of a ``[..., seq, features]`` activation sharded along the sequence."""
    return P(*([None] * (ndim - 2)), TENSOR, None)


def check_sequence_divisible(x: jax.Array, mesh: Mesh, name: str) -> None:
    if x.ndim < 2 or x.shape[-2] % tensor_size(mesh):
        raise ValueError(
            f"{name} with sequence_parallel needs a sequence length (dim -2) divisible by "
            f"the tensor-parallel degree {tensor_size(mesh)}, got shape {tuple(x.shape)}."
        )


def check_last_dim(x: jax.Array, expected: int, name: str) -> None:
    if x.ndim < 1 or x.shape[-1] != expected:
        raise ValueError(
            f"{name} expects inputs whose last dimension is {expected}, got shape {tuple(x.shape)}."
        )

