"""Column- and row-parallel linear layers (Megatron-LM's names).

Kernels are stored ``[in, out]`` and applied as ``x @ W`` (Flax). The spec's
wording is PyTorch's (``[out, in]``, ``x @ W.T``), so its names are swapped:

    this project / Megatron   what is split        communication      spec's words
    ColumnParallelLinear      output features      none forward       "row partitioning"
    RowParallelLinear         input features       one all-reduce     "column partitioning"
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from lite_tp_jax.core.collectives import (
    cast_for,
    copy_to_tensor_region,
    enter_tensor_parallel,
    exit_tensor_parallel,
    gather_from_tensor_region,
    scatter_to_tensor_region,
)
from lite_tp_jax.core.axes import TENSOR
from lite_tp_jax.sharding.padding import mask_padding
from lite_tp_jax.parallel.region import (
    REPLICATED,
    Layout,
    ParallelLayer,
    features,
    in_region,
    sequence_or_replicated,
)
from lite_tp_jax.sharding.rules import MEGATRON, Initializer, PartitionRules
from lite_tp_jax.core.checks import check_last_dim, check_positive_int

default_kernel_init: Initializer = nnx.initializers.lecun_normal()
zeros_init: Initializer = nnx.initializers.zeros_init()


class ColumnParallelLinear(ParallelLayer):
    """``y = x @ W + b`` with W ``[in, out]`` split on ``out`` over "tensor".

    Each rank holds ``W[:, out_i]`` and ``b[out_i]`` and computes its slice of
    ``y`` from the full input: no communication forward; backward, the input
    gradient's partial sums are all-reduced (``enter_tensor_parallel``). With
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
        role: str = "column",
        rules: PartitionRules = MEGATRON,
        rngs: nnx.Rngs,
    ):
        check_positive_int("ColumnParallelLinear", in_features=in_features, out_features=out_features)
        self.mesh = mesh
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        param = partial(rules.param, role, mesh=mesh, dtype=param_dtype, supports=("column",))
        self.kernel = param(kernel_init, rngs.params(), (in_features, out_features), ("in", "out"))
        self.bias = param(bias_init, rngs.params(), (out_features,), ("out",)) if use_bias else None

    def layout(self, x: jax.Array) -> Layout:
        """Input replicated (or sequence-sharded); output split over "tensor" (or gathered)."""
        output = REPLICATED if self.gather_output else features(self.out_features)
        return Layout((sequence_or_replicated(self.sequence_parallel),), output.of(x.ndim))

    def check(self, x: jax.Array) -> None:
        check_last_dim(x, self.in_features, type(self).__name__)

    def local(self, x: jax.Array) -> jax.Array:
        """One rank's math: ``x`` full (replicated over "tensor"), or its sequence
        shard with ``sequence_parallel``. Returns this rank's ``[..., out_i]`` slice
        of the padded output (or the full output with ``gather_output``)."""
        x = enter_tensor_parallel(x, self.sequence_parallel)
        y = x @ cast_for(mask_padding(self.kernel[...], 1, self.out_features), x)  # computes in x's dtype
        if self.bias is not None:
            y = y + cast_for(mask_padding(self.bias[...], 0, self.out_features), x)
        if self.gather_output:
            y = gather_from_tensor_region(y, TENSOR, -1)[..., : self.out_features]
        return y


class RowParallelLinear(ParallelLayer):
    """``y = x @ W + b`` with W ``[in, out]`` split on ``in`` over "tensor".

    Each rank multiplies its slice of the input features by ``W[in_i, :]``; the
    partial sums are combined by one all-reduce (``exit_tensor_parallel``) and
    the replicated bias is added once, after the reduction. With
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
        role: str = "row",
        rules: PartitionRules = MEGATRON,
        rngs: nnx.Rngs,
    ):
        check_positive_int("RowParallelLinear", in_features=in_features, out_features=out_features)
        self.mesh = mesh
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        param = partial(rules.param, role, mesh=mesh, dtype=param_dtype, supports=("row",))
        self.kernel = param(kernel_init, rngs.params(), (in_features, out_features), ("in", "out"))
        self.in_padded = self.kernel.shape[0]
        self.bias = param(bias_init, rngs.params(), (out_features,), ("out",)) if use_bias else None

    def layout(self, x: jax.Array) -> Layout:
        """Input split over "tensor" on its features (or whole); output replicated (or sequence-sharded)."""
        inputs = features(self.in_features) if self.input_is_parallel else REPLICATED
        return Layout((inputs,), sequence_or_replicated(self.sequence_parallel).of(x.ndim))

    def check(self, x: jax.Array) -> None:
        if not self.input_is_parallel or not in_region():
            check_last_dim(x, self.in_features, type(self).__name__)

    def local(self, x: jax.Array) -> jax.Array:
        """One rank's math: ``x`` is this rank's slice of the padded input (or the full input)."""
        if not self.input_is_parallel:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.in_padded - self.in_features)])
            x = scatter_to_tensor_region(x, TENSOR, -1)
        partial_sums = x @ cast_for(mask_padding(self.kernel[...], 0, self.in_features), x)  # in x's dtype
        y = exit_tensor_parallel(partial_sums, self.sequence_parallel)
        if self.bias is not None:
            y = y + cast_for(self._replicated_bias(), y)
        return y

    def _replicated_bias(self) -> jax.Array:
        """The bias, per-rank when added to sequence shards (so its gradient, a
        partial sum per shard, is all-reduced: ``copy_to_tensor_region``)."""
        bias = self.bias[...]
        return copy_to_tensor_region(bias) if self.sequence_parallel else bias
