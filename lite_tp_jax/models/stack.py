"""Identical blocks stacked into one module and run with ``jax.lax.scan``.

``stack_blocks(make, count, ...)`` builds ``count`` blocks with ``nnx.vmap``:
one module whose parameters are ``[count, ...]`` (the decoder's layer groups:
``[virtual_stages, groups / v, ...]``, dim 1 split over "pipeline" as the
rule table's "stacked" strategy says), each slice drawn from its own key.
``scan_blocks(blocks, x, remat=...)`` runs them in order inside a region, one
block per scan iteration under ``jax.checkpoint`` with a remat policy
(``remat.py``), so the program holds one block's code whatever ``count`` is:
a 48-block model compiles about as fast as a 2-block one. A block returns
``x``, or ``(x, aux)`` with ``aux`` a pytree of scalars summed over blocks.
The blocks' collectives are their layers'; with an "fsdp" axis, each scan
iteration first all-gathers its group's parameter shards over "fsdp"
(``parallel/fsdp.gather_group``, cast to the activations' dtype first), and
the backward reduce-scatters the group's gradients; the gathered weights are
not kept for the backward (no remat policy names them): gathered again there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.models.remat import remat_policy
from lite_tp_jax.parallel.fsdp import gather_group
from lite_tp_jax.sharding.rules import MEGATRON, PartitionRules

Block = TypeVar("Block", bound=nnx.Module)


def stack_blocks(
    make: Callable[[nnx.Rngs], Block],
    count: int,
    *,
    mesh: Mesh,
    rules: PartitionRules = MEGATRON,
    laps: int | None = None,
    rngs: nnx.Rngs,
) -> Block:
    """``make(rngs)`` ``count`` times as one module, parameters ``[count, ...]``
    (or ``[laps, count / laps, ...]`` split over "pipeline" on dim 1: the
    decoder's pipeline layout). Initialised as ``[count, ...]`` and reshaped,
    so the values do not depend on the layout."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def create(rngs: nnx.Rngs) -> Block:
        return make(rngs)

    stacked = create(rngs)
    lead = (count,) if laps is None else (laps, count // laps)
    variables = [variable for _, variable in nnx.to_flat_state(nnx.state(stacked))]
    shapes = [(*lead, *v.shape[1:]) for v in variables]
    # vmap put a None in front of each spec for the stacking dim; the table replaces it
    stacking = [
        rules.stack(tuple(v.get_metadata()["out_sharding"] or (None,))[1:], shape, mesh, pipelined=laps is not None)
        for v, shape in zip(variables, shapes)
    ]
    reshaped = jax.jit(
        lambda values: [v.reshape(shape) for v, shape in zip(values, shapes)],
        out_shardings=[NamedSharding(mesh, P(*spec)) for spec in stacking],
    )([v[...] for v in variables])
    for variable, value, spec in zip(variables, reshaped, stacking):
        variable.set_value(value)
        variable.set_metadata(out_sharding=spec, scanned=True)  # fsdp: gathered per group, in the scan
    return stacked


def scan_states(graphdef: nnx.GraphDef, states: Any, x: Any, policy: Callable, *constants: Any) -> Any:
    """The blocks ``states`` (stacked on dim 0) of ``graphdef`` applied to ``x`` in
    order, each under ``jax.checkpoint`` with the remat ``policy``; ``constants``
    (e.g. packed documents' segment ids) are passed to every block after ``x``."""

    def one_block(x, state):
        state = gather_group(state, jax.tree.leaves(x)[0].dtype)  # fsdp: this group's weights, re-gathered in the backward
        out = nnx.merge(graphdef, state)(x, *constants)
        return out if isinstance(out, tuple) else (out, None)

    x, aux = jax.lax.scan(jax.checkpoint(one_block, policy=policy, prevent_cse=False), x, states)
    return x if aux is None else (x, jax.tree.map(lambda s: s.sum(0), aux))


def scan_blocks(blocks: nnx.Module, x: Any, *, remat: str = "full") -> Any:
    """``stack_blocks``'s ``[count, ...]`` blocks applied to ``x`` in order (inside a
    region). ``remat``: a ``remat.REMAT_SAVES`` setting; each block's tensor-parallel
    exits are kept too, so the backward reruns no reduction."""
    return scan_states(*nnx.split(blocks), x, remat_policy(remat, keep_exits=True))
