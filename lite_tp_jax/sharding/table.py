"""The partitioning rule table: which mesh axes each parameter role is split over.

A parameter has a *role* (``"attention.query"``, ``"mlp.down"``, ...) and names
the part each of its dims plays (``"in"``, ``"out"``, ``"vocab"``,
``"experts"``; None for a dim that is never split). The first rule whose
pattern (``fnmatch``) matches the role gives the *strategy*, and the strategy
says which dims are split over which mesh axes. Megatron-LM's defaults::

    role                     strategy        split                                         and over "fsdp"
    embedding, head          vocab           vocab over ("pipeline", "tensor") (pipeline only when > 1)   features
    attention.query          column          out (heads) over "tensor"                     in
    attention.key / .value   column          out (kv heads) over "tensor"; replicated when kv heads < TP
    attention.out            row             in (heads) over "tensor"                      out
    mlp.gate, mlp.up         column          out (hidden) over "tensor"                    in
    mlp.down                 row             in (hidden) over "tensor"                     out
    moe.router               replicated      -
    moe.shared.gate, .up     column          out (hidden) over "tensor"   (the shared expert)
    moe.shared.down          row             in (hidden) over "tensor"
    moe.shared_gate          replicated      -
    moe.expert_bias          replicated      -   (auxiliary-loss-free balancing)
    moe.gate, moe.up         expert-column   experts over "expert", out (hidden) over "tensor"   in
    moe.down                 expert-row      experts over "expert", in (hidden) over "tensor"    out
    *norm                    replicated      -
    positions                replicated      -   (learned positions, GPT-2)
    column / row             column / row    standalone ColumnParallelLinear / RowParallelLinear
    layers                   stacked         stacked layer groups [virtual_stages, groups/v] over "pipeline"

"fsdp" (fully sharded data parallelism) splits each matrix on the dim no
other axis splits (the last column above; padded at its end when fsdp does
not divide it, like every split dim); it is left out of a spec when the mesh's
fsdp axis is 1. Replicated parameters (norm scales, the router) stay whole.
Where they are gathered back: ``parallel/fsdp.py``.

Activations are not parameters, but where their sequence lies is part of the
same table (the layers' ``Layout``s, ``parallel/region.py``'s ``Placement``
and ``parallel/context.py`` follow it): ``[batch, seq, ...]`` rows over the batch axes, and the sequence

    tokens, targets, positions, segment ids    seq over "context" (whole over "tensor")
    between blocks (residual stream, norms)    seq over "context"; over ("context", "tensor") with SP
    inside a block (q/k/v, MLP hidden)         seq over "context"; heads / hidden over "tensor"
    attention's keys and values                all_gather: every slot (gathered over "context")
                                               ring: one rank's slots at a time (passed round "context")
                                               all_to_all: every slot, heads / ("tensor", "context")
    logits, the loss's tokens                  seq over "context"; vocab over the vocab axes

(the sequence split over "context" is the permuted one when
``model.context_load_balance``: rank r holds chunks r and 2n-1-r).

(Megatron's names: a "column" split is the spec's "row partitioning" and vice
versa; see the README.) A bias has its kernel's role: a column bias is split
with the outputs, a row bias is replicated and added once after the reduction.

Overrides (``model.partition_rules`` in a config, ``{role pattern: strategy}``)
take precedence over the defaults. A layer supports only the strategies its
math is written for (``SUPPORTED`` for the built-in roles; each layer states
its own when it creates a parameter, ``PartitionRules.param``'s ``supports``);
``check_overrides`` refuses anything else in one sentence.

A user's model names its own roles (``ColumnParallelLinear(..., role="patch")``):
a role no rule matches takes the strategy its layer is written for, and an
override pattern may name such roles (``{"vit.*.key": "replicated"}``); it is
checked against the layer when the parameter is created. ``rules.PartitionRules`` applies the table to parameters.
No jax here: configs are checked against the table before jax starts.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from lite_tp_jax.core.axes import EXPERT, FSDP, PIPELINE, TENSOR
from lite_tp_jax.core.errors import BadInput

VOCAB = "vocab axes"
"""Placeholder for the vocabulary's axes: ("pipeline", "tensor") when pipeline > 1, else ("tensor",)."""

STRATEGIES: dict[str, dict[str, tuple[str, ...] | str]] = {
    "column": {"out": (TENSOR,), "in": (FSDP,)},
    "row": {"in": (TENSOR,), "out": (FSDP,)},
    "vocab": {"vocab": VOCAB, "features": (FSDP,)},
    "expert-column": {"experts": (EXPERT,), "out": (TENSOR,), "in": (FSDP,)},
    "expert-row": {"experts": (EXPERT,), "in": (TENSOR,), "out": (FSDP,)},
    "replicated": {},
    "stacked": {"stages": (PIPELINE,)},
}
"""Strategy -> {dim role: mesh axes}."""

MEGATRON_RULES: tuple[tuple[str, str], ...] = (
    ("embedding", "vocab"),
    ("head", "vocab"),
    ("attention.query", "column"),
    ("attention.key", "column"),
    ("attention.value", "column"),
    ("attention.out", "row"),
    ("mlp.gate", "column"),
    ("mlp.up", "column"),
    ("mlp.down", "row"),
    ("moe.router", "replicated"),
    ("moe.shared.gate", "column"),
    ("moe.shared.up", "column"),
    ("moe.shared.down", "row"),
    ("moe.shared_gate", "replicated"),
    ("moe.expert_bias", "replicated"),
    ("moe.gate", "expert-column"),
    ("moe.up", "expert-column"),
    ("moe.down", "expert-row"),
    ("*norm", "replicated"),
    ("positions", "replicated"),
    ("column", "column"),
    ("row", "row"),
    ("layers", "stacked"),
)
"""(role pattern, strategy), first match wins."""

SUPPORTED: dict[str, frozenset[str]] = {
    "attention.key": frozenset({"column", "replicated"}),
    "attention.value": frozenset({"column", "replicated"}),
}
"""Roles whose layer math supports more than its default strategy."""


class RuleError(BadInput):
    """A partition rule override the table cannot take."""


def default_strategy(role: str) -> str:
    return next(s for pattern, s in MEGATRON_RULES if fnmatch.fnmatchcase(role, pattern))


def check_overrides(overrides: Mapping[str, str], *, builtin_only: bool = True) -> None:
    """RuleError for an unknown strategy, a pattern that matches no built-in role
    (with ``builtin_only``: a config of the decoder), or a strategy a matched
    built-in role's layer does not support."""
    for pattern, strategy in overrides.items():
        if strategy not in STRATEGIES:
            raise RuleError(
                f"partition rule {pattern!r}: unknown strategy {strategy!r}; "
                f"choose one of {', '.join(STRATEGIES)}."
            )
        roles = [role for role, _ in MEGATRON_RULES if fnmatch.fnmatchcase(role, pattern)]
        if not roles and builtin_only:
            raise RuleError(
                f"partition rule {pattern!r} matches no role; roles are "
                f"{', '.join(role for role, _ in MEGATRON_RULES)}."
            )
        for role in roles:
            allowed = SUPPORTED.get(role, frozenset({default_strategy(role)}))
            if strategy not in allowed:
                raise RuleError(
                    f"partition rule {pattern!r}: {role!r} cannot be {strategy!r}; "
                    f"its layer supports {', '.join(sorted(allowed))}."
                )


def strategy_of(role: str, overrides: Mapping[str, str], supports: tuple[str, ...] = ()) -> str:
    """The strategy of ``role``: the first matching override, else Megatron's
    default, else the first of ``supports`` (what its layer is written for).
    RuleError where the rule gives one ``supports`` does not list."""
    for pattern, strategy in (*overrides.items(), *MEGATRON_RULES):
        if fnmatch.fnmatchcase(role, pattern):
            if supports and strategy not in supports:
                raise RuleError(
                    f"partition rule {pattern!r}: {role!r} cannot be {strategy!r}; "
                    f"its layer supports {', '.join(supports)} (rename the role or add an override)."
                )
            return strategy
    if supports:
        return supports[0]
    raise RuleError(f"no partition rule matches role {role!r}; add {{{role!r}: strategy}} to partition_rules.")
