"""Cross-entropy from vocabulary-sharded logits (Megatron-LM's
``vocab_parallel_cross_entropy``), without ever gathering the logits.

Rank i holds ``logits[..., vocab_i]`` (as ``VocabParallelEmbedding.attend`` or
``ColumnParallelLinear(..., gather_output=False)`` produce them). Per token:

    m = pmax(max_i logits)                       all-reduce (max) of [B, S]
    s = sum over ranks of sum_i exp(logits - m)  all-reduce of [B, S]
    t = the target's logit, on the rank owning it all-reduce of [B, S]
    loss = log(s) + m - t

Backward needs no collective: d loss / d logits = softmax - onehot, which each
rank computes for its own slice (``m`` is a constant under ``stop_gradient``,
the all-reduces' backward is the identity).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lite_tp_jax.core.collectives import reduce_from_tensor_region
from lite_tp_jax.parallel.region import TOKENS, Layout, features, in_region, run_standalone
from lite_tp_jax.sharding.rules import padded_size, vocab_axes as mesh_vocab_axes
from lite_tp_jax.core.checks import check_last_dim

_NAME = "vocab_parallel_cross_entropy"


def vocab_parallel_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    vocab_size: int,
    *,
    mesh: Mesh | None = None,
    vocab_axes: tuple[str, ...] | None = None,
) -> jax.Array:
    """Per-token loss ``-log softmax(logits)[targets]``, shape ``targets.shape``, float32.

    Inside a tensor region ``logits`` is this rank's ``[..., vocab_i]`` slice of
    the vocabulary padded to a multiple of the TP degree (padded entries are
    ignored, whatever their value). From ordinary jit code it is the logical
    ``[..., vocab_size]`` array (best sharded over "tensor" on its last dim);
    ``mesh`` is then required, and the function enters a shard_map over
    "tensor". ``targets``: integers, replicated over "tensor".

    ``vocab_axes``: the mesh axes the vocabulary is split over, as in
    ``VocabParallelEmbedding`` (its statistics are reduced over all of them);
    by default the rule table's (``sharding.rules.vocab_axes``).

    Targets outside ``[0, vocab_size)`` cannot raise an error under jit: no rank
    owns them, so their loss is the log-sum-exp of the logits (gradient:
    softmax). Mask such tokens out of the mean yourself.
    """
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise TypeError(f"{_NAME} expects integer targets, got dtype {jnp.result_type(targets)}.")
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{_NAME}: targets of shape {tuple(targets.shape)} do not match logits of shape "
            f"{tuple(logits.shape)} (expected targets.shape == logits.shape[:-1])."
        )
    if in_region():
        return _local(logits, targets, vocab_size, tuple(vocab_axes or ("tensor",)))
    if mesh is None:
        raise ValueError(
            f"{_NAME} called outside a tensor-parallel region needs mesh=... to shard "
            f"the logits over 'tensor'."
        )
    check_last_dim(logits, vocab_size, _NAME)
    vocab_axes = tuple(vocab_axes or mesh_vocab_axes(mesh))
    layout = Layout((features(vocab_size, vocab_axes), TOKENS), TOKENS.of(targets.ndim))
    local = partial(_local, vocab_size=vocab_size, vocab_axes=vocab_axes)
    return run_standalone(None, local, layout, logits, targets, mesh=mesh, name=_NAME)


def _local(logits: jax.Array, targets: jax.Array, vocab_size: int, vocab_axes: tuple[str, ...]) -> jax.Array:
    """One rank's math: ``logits`` is this rank's slice, ``targets`` replicated."""
    local = logits.shape[-1]
    tp = jax.lax.axis_size(vocab_axes)
    if local * tp != padded_size(vocab_size, tp):
        raise ValueError(
            f"{_NAME}: this rank's logits slice has {local} entries; a vocabulary of "
            f"{vocab_size} over {tp} ranks needs {padded_size(vocab_size, tp) // tp}."
        )
    logits = logits.astype(jnp.float32)
    start = jax.lax.axis_index(vocab_axes) * local
    if local * tp != vocab_size:  # mask the padded tail of the vocabulary
        valid = start + jnp.arange(local) < vocab_size
        logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)

    logits_max = jax.lax.pmax(jax.lax.stop_gradient(logits.max(axis=-1)), vocab_axes)
    shifted = logits - logits_max[..., None]
    sum_exp = reduce_from_tensor_region(jnp.exp(shifted).sum(axis=-1), vocab_axes)

    local_targets = targets - start
    mine = (local_targets >= 0) & (local_targets < local) & (targets < vocab_size)
    picked = jnp.take_along_axis(logits, jnp.where(mine, local_targets, 0)[..., None], axis=-1)[..., 0]
    target_logit = reduce_from_tensor_region(jnp.where(mine, picked, 0.0), vocab_axes)
    return jnp.log(sum_exp) + logits_max - target_logit
