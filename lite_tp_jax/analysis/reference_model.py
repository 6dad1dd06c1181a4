"""The baseline of ``lite-tp bench``: the same Llama-style model and AdamW step
in plain ``jax.numpy`` under ``jax.jit``, with no hand-written collectives.

Placed with ``NamedSharding`` (parameters as the rule table splits them, batch
rows over the batch axes), XLA's partitioner (GSPMD) chooses its collectives;
placed on one device, it is the unsharded reference. It names the same
tensors as the layers (``checkpoint_name``), so a remat policy keeps the same
activations on both sides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name

from lite_tp_jax.layers.rotary import apply_rotary
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.remat import remat_policy
from lite_tp_jax.run.config import TrainConfig
from lite_tp_jax.run.optimizer import learning_rate_schedule, make_optimizer


def _rms_norm(x, scale, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


# checkpoint_name: the tensors lite_tp_jax's layers name, so that ``remat`` keeps the same ones.


def _attention(x, w, cfg: ModelConfig):
    q, k, v = (jnp.einsum("bsf,fhd->bshd", x, w[name]["kernel"]) for name in ("query", "key", "value"))
    positions = jnp.arange(x.shape[1])
    q, k = apply_rotary(q, positions, cfg.rope_theta), apply_rotary(k, positions, cfg.rope_theta)
    q, k, v = (checkpoint_name(t, name) for t, name in zip((q, k, v), ("query", "key", "value")))
    group = cfg.num_heads // cfg.num_kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(cfg.resolved_head_dim))
    causal = jnp.tril(jnp.ones((x.shape[1],) * 2, dtype=bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(jnp.float32).min), axis=-1)
    out = checkpoint_name(jnp.einsum("bhqk,bkhd->bqhd", checkpoint_name(weights, "attention_weights"), v),
                          "attention_output")
    return jnp.einsum("bqhd,hdf->bqf", out, w["out"]["kernel"])


def _swiglu(x, w):
    up = checkpoint_name(x @ w["up"]["kernel"], "mlp_up")
    hidden = jax.nn.silu(checkpoint_name(x @ w["gate"]["kernel"], "mlp_gate")) * up
    return checkpoint_name(hidden, "mlp_hidden") @ w["down"]["kernel"]


def plain_loss(params, tokens, targets, cfg: ModelConfig):
    """Mean next-token cross-entropy of the Llama-style model in plain jax.numpy."""

    def block(x, b):
        norm = checkpoint_name(_rms_norm(x, b["attention_norm"]["scale"], cfg.norm_eps), "attention_input")
        x = checkpoint_name(x + _attention(norm, b["attention"], cfg), "attention_residual")
        norm = checkpoint_name(_rms_norm(x, b["mlp_norm"]["scale"], cfg.norm_eps), "mlp_input")
        return x + _swiglu(norm, b["mlp"]), None

    block = jax.checkpoint(block, policy=remat_policy(cfg.remat), prevent_cse=False)
    x, _ = jax.lax.scan(block, params["embed"]["embedding"][tokens], params["layers"]["blocks"]["0"])
    head = params["embed" if cfg.tie_embeddings else "head"]["embedding"]
    logits = _rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps) @ head.T
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logits)


def nested(flat: dict) -> dict:
    """``{"a.b": v}`` -> ``{"a": {"b": v}}`` (optax's decay mask looks for "kernel")."""
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def plain_train_step(cfg: ModelConfig, train: TrainConfig, params, param_shardings, replicated, rows):
    """AdamW step of the plain model: ``step((params, opt_state, count), tokens,
    targets) -> (state, metrics)``, jitted to keep its placement (optimizer
    moments like their parameter, counters ``replicated``, batch ``rows``) and
    to donate its state, as ``TrainStep`` does. ``params``: arrays or
    ShapeDtypeStructs. Returns ``(optimizer, step, state placement)``."""
    # TrainStep clips by the global norm itself (parallel/grads.py); here optax does it.
    tx = optax.chain(optax.clip_by_global_norm(train.grad_clip), make_optimizer(train))
    schedule = learning_rate_schedule(train)

    def step(state, tokens, targets):
        params, opt_state, count = state
        loss, grads = jax.value_and_grad(plain_loss)(params, tokens, targets, cfg)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(count)}
        return (optax.apply_updates(params, updates), opt_state, count + 1), metrics

    opt_state = jax.eval_shape(tx.init, params)
    placement = (param_shardings,
                 optax.tree_map_params(tx, lambda _, s: s, opt_state, param_shardings,
                                       transform_non_params=lambda _: replicated),
                 replicated)
    jitted = jax.jit(step, in_shardings=(placement, rows, rows), out_shardings=(placement, None), donate_argnums=0)
    return tx, jitted, placement
