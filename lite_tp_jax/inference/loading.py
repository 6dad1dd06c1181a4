"""A trained model to generate from: the ``model`` item of a run directory's
latest checkpoint (or of checkpoint ``step``, set aside or not), restored
without building an optimizer."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from flax import nnx

from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.models.factory import abstract_model
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.run.checkpoint import CheckpointError, Checkpointer, restore_set_aside
from lite_tp_jax.run.config import ConfigError
from lite_tp_jax.run.config_file import load_config


def load_trained_model(run_dir: str | os.PathLike, step: int | None = None) -> Transformer:
    """The model of the latest checkpoint in ``run_dir`` (or of checkpoint
    ``step``, a set-aside one too), restored onto the run's
    mesh without pipeline stages and without sequence parallelism (the
    parameters are the same; the KV-cache path needs neither). Builds no
    optimizer and draws no random weights; writes nothing."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"No config.yaml in {run_dir}; train first with `lite-tp train CONFIG --run-dir {run_dir}`.")
    if not (run_dir / "checkpoints").is_dir():  # checked first: orbax would create the directory
        raise CheckpointError(f"No checkpoint in {run_dir / 'checkpoints'}; train first.")
    config = load_config(run_dir / "config.yaml")
    mesh = make_mesh_for({**config.mesh.requested, "pipeline": 1}, spares=config.mesh.spares)
    model = abstract_model(replace(config.model, sequence_parallel=False), mesh)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.checkpoint.keep)
    try:
        live, aside = checkpointer.all_steps(), checkpointer.set_aside_steps()
        if step is None and not live:
            raise CheckpointError(f"No checkpoint in {run_dir / 'checkpoints'}; train first.")
        if step is not None and step not in live:
            if step not in aside:
                held = ", ".join(map(str, sorted({*live, *aside}))) or "none"
                raise CheckpointError(f"There is no checkpoint {step} in {run_dir / 'checkpoints'}; it holds {held}.")
            restore_set_aside(aside[step][-1], {"model": nnx.state(model)}, mesh)
        else:
            checkpointer.restore({"model": nnx.state(model)}, mesh, step=step)
    finally:
        checkpointer.close()
    return model
