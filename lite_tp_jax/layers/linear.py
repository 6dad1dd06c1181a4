"""Column- and row-parallel linear layers (Megatron-LM's names).

Kernels are stored ``[in, out]`` and applied as ``x @ W`` (Flax). The spec's
wording is PyTorch's (``[out, in]``, ``x @ W.T``), so its names are swapped:

    this project / Megatron   what is split        communication      spec's words
    ColumnParallelLinear      output features      none forward       "row partitioning"
    RowParallelLinear         input features       one all-reduce     "column partitioning"
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.collectives import (
    cast_for,
    copy_to_tensor_region,
    gather_from_sequence_region,
    gather_from_tensor_region,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
    scatter_to_tensor_region,
)
from lite_tp_jax.mesh import TENSOR
from lite_tp_jax.sharding import (
    Initializer,
    check_last_dim,
    check_sequence_divisible,
    default_kernel_init,
    enter_tensor_region,
    feature_spec,
    in_tensor_region,
    sequence_spec,
    mask_padding,
    padded_size,
    sharded_param,
    tensor_size,
    zeros_init,
)


class ColumnParallelLinear(nnx.Module):
    """``y = x @ W + b`` with W ``[in, out]`` split on ``out`` over "tensor".

    Each rank holds ``W[:, out_i]`` and ``b[out_i]`` and computes its slice of
    ``y`` from the full input: no communication forward; backward, the input
    gradient's partial sums are all-reduced (``copy_to_tensor_region``). With
    ``gather_output`` the output slices are all-gathered into the full ``y``.

    With ``sequence_parallel`` the input arrives sharded along the sequence
    (dim -2) and is all-gathered first; backward, that becomes a reduce-scatter.
    A block that feeds several column layers from one input (MLP, attention)
    enters the region once itself and builds them without the flag.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        mesh: Mesh,
        use_bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros_init,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.mesh = mesh
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        out_padded = padded_size(out_features, tensor_size(mesh))
        self.kernel = sharded_param(
            kernel_init, rngs.params(), (in_features, out_features), P(None, TENSOR), mesh,
            padded_shape=(in_features, out_padded), dtype=param_dtype,
        )
        self.bias = (
            sharded_param(
                bias_init, rngs.params(), (out_features,), P(TENSOR), mesh,
                padded_shape=(out_padded,), dtype=param_dtype,
            )
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``[..., in]``. Returns ``[..., out]`` (gathered), or this rank's
        ``[..., out_i]`` slice inside a tensor region, or the logical ``[..., out]``
        array sharded over "tensor" when called from ordinary jit code."""
        check_last_dim(x, self.in_features, type(self).__name__)
        if in_tensor_region():
            return self.local(x)
        out_spec = P() if self.gather_output else feature_spec(x.ndim)
        in_spec = P()
        if self.sequence_parallel:
            check_sequence_divisible(x, self.mesh, type(self).__name__)
            in_spec = sequence_spec(x.ndim)
        y = enter_tensor_region(self, type(self).local, x, arg_specs=(in_spec,), out_specs=out_spec)
        return y[..., : self.out_features]

    def local(self, x: jax.Array) -> jax.Array:
        """One rank's math: ``x`` full (replicated over "tensor"), or its sequence
        shard with ``sequence_parallel``."""
        if self.sequence_parallel:
            x = gather_from_sequence_region(x, TENSOR, -2)
        else:
            x = copy_to_tensor_region(x)
        y = x @ cast_for(mask_padding(self.kernel[...], 1, self.out_features), x)  # computes in x's dtype
        if self.bias is not None:
            y = y + cast_for(mask_padding(self.bias[...], 0, self.out_features), x)
        if self.gather_output:
            y = gather_from_tensor_region(y, TENSOR, -1)[..., : self.out_features]
        return y


class RowParallelLinear(nnx.Module):
    """``y = x @ W + b`` with W ``[in, out]`` split on ``in`` over "tensor".

    Each rank multiplies its slice of the input features by ``W[in_i, :]``; the
    partial sums are combined by one all-reduce (``reduce_from_tensor_region``)
    and the replicated bias is added once, after the reduction. With
    ``input_is_parallel=False`` the layer takes the full input and keeps its own
    slice (``scatter_to_tensor_region``).

    With ``sequence_parallel`` a reduce-scatter along the sequence (dim -2)
    replaces the all-reduce: each rank keeps the summed output for its sequence
    shard, and the bias is added to that shard.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        mesh: Mesh,
        use_bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros_init,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.mesh = mesh
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.in_padded = padded_size(in_features, tensor_size(mesh))
        self.kernel = sharded_param(
            kernel_init, rngs.params(), (in_features, out_features), P(TENSOR, None), mesh,
            padded_shape=(self.in_padded, out_features), dtype=param_dtype,
        )
        self.bias = (
            sharded_param(bias_init, rngs.params(), (out_features,), P(), mesh, dtype=param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``[..., in]`` (logical), or this rank's ``[..., in_i]`` slice of the
        padded input inside a tensor region when ``input_is_parallel``."""
        if in_tensor_region():
            return self.local(x)
        check_last_dim(x, self.in_features, type(self).__name__)
        out_spec = P()
        if self.sequence_parallel:
            check_sequence_divisible(x, self.mesh, type(self).__name__)
            out_spec = sequence_spec(x.ndim)
        if not self.input_is_parallel:
            return enter_tensor_region(self, type(self).local, x, arg_specs=(P(),), out_specs=out_spec)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.in_padded - self.in_features)])
        return enter_tensor_region(
            self, type(self).local, x, arg_specs=(feature_spec(x.ndim),), out_specs=out_spec
        )

    def local(self, x: jax.Array) -> jax.Array:
        """One rank's math: ``x`` is this rank's input slice (or the full input)."""
        if not self.input_is_parallel:
            check_last_dim(x, self.in_features, type(self).__name__)
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.in_padded - self.in_features)])
            x = scatter_to_tensor_region(x, TENSOR, -1)
        partial_sums = x @ cast_for(mask_padding(self.kernel[...], 0, self.in_features), x)  # in x's dtype
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(partial_sums, TENSOR, -2)
        else:
            y = reduce_from_tensor_region(partial_sums)
        if self.bias is not None:
            y = y + cast_for(self.bias[...], y)
        return y
