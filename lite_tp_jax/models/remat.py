"""Activation recomputation: what each ``remat`` setting keeps per layer group.

Everything not kept is recomputed in the backward. The layers name their
tensors with ``checkpoint_name``; a policy keeps a set of names:

* ``none``: every matmul's input (norm outputs, q/k/v, attention output, MLP
  gate/up/hidden) and the softmax output (Megatron without recomputation;
  the softmax is a named tensor of ``attention: reference`` only: the
  ``jax.nn.dot_product_attention`` kernels keep no ``[S, S]`` tensor, so with
  them ``none`` recomputes scores and softmax like ``selective``);
* ``selective``: the same without the softmax (Korthikanti et al.'s selective
  recomputation);
* ``full``: only the residual stream (each block's input, and after attention).

With sequence parallelism the saved norm outputs are the sequence shards, as
in Megatron-LM: the backward all-gathers them again. No policy reruns an
all-reduce or a reduce-scatter (the MoE all-to-all outputs are kept too).
"""

from __future__ import annotations

import jax

from lite_tp_jax.models.config import Remat

# The group's input (scan keeps it anyway), each later block's input, and each block after attention.
_RESIDUAL_STREAM = ("block_input", "attention_residual")
_MATMUL_INPUTS = (
    "attention_input", "query", "key", "value", "attention_output",  # layers/attention.py
    "mlp_input", "mlp_gate", "mlp_up", "mlp_hidden",  # layers/mlp.py
    "moe_dispatched", "moe_combined",  # layers/moe.py: all-to-all outputs, never rerun
)
REMAT_SAVES: dict[str, tuple[str, ...]] = {
    "none": _RESIDUAL_STREAM + _MATMUL_INPUTS + ("attention_weights",),
    "selective": _RESIDUAL_STREAM + _MATMUL_INPUTS,
    "full": _RESIDUAL_STREAM,
}
"""The named tensors each remat setting keeps per layer for the backward."""


def remat_policy(remat: Remat, *, keep_exits: bool = False):
    """The ``jax.checkpoint`` policy for a layer group: keep ``REMAT_SAVES[remat]``, recompute the rest.
    ``keep_exits``: also keep each tensor-parallel exit's reduced output (``tensor_exit``,
    ``collectives.exit_tensor_parallel``), for a user's block that names no residual:
    its backward then reruns no all-reduce or reduce-scatter either."""
    if remat not in REMAT_SAVES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_SAVES)}, got {remat!r}.")
    return jax.checkpoint_policies.save_only_these_names(*REMAT_SAVES[remat], *(("tensor_exit",) if keep_exits else ()))
