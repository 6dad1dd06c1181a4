"""``lite-tp convert``: a Hugging Face model as a run directory that ``lite-tp
train`` fine-tunes from, on any mesh (``--from-hf``), and a run directory's
latest checkpoint as a Hugging Face model (``--to-hf``).

The run directory gets ``config.yaml`` (the model section from the Hugging
Face config, the mesh it was loaded on, defaults elsewhere) and an orbax
checkpoint at step 0 holding the weights and a fresh optimizer state, in the
logical layout every checkpoint uses (so ``--set mesh.tensor=4`` resumes it
on another mesh). Nothing is written when the directory already holds a
checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from flax import nnx

from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.interop.errors import HFError
from lite_tp_jax.interop.hf import check_new_model_dir, from_pretrained, save_pretrained
from lite_tp_jax.interop.hf_config import config_from_hf, read_hf_config
from lite_tp_jax.models.factory import abstract_model
from lite_tp_jax.run.checkpoint import Checkpointer
from lite_tp_jax.run.config import Config, MeshConfig, TrainConfig
from lite_tp_jax.run.config_file import dump_config, load_config
from lite_tp_jax.run.optimizer import create_optimizer, make_optimizer
from lite_tp_jax.runtime.run_dir import check_run_dir


def hf_to_run_dir(hf_path: str | os.PathLike, run_dir: str | os.PathLike, *, tensor: int = 1) -> Config:
    """Writes ``run_dir/config.yaml`` and a step-0 checkpoint from ``hf_path``; returns the config."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise HFError(f"{run_dir} already holds checkpoints; convert into a new run directory.")
    model_config = config_from_hf(read_hf_config(hf_path), Path(hf_path) / "config.json")
    train = TrainConfig()
    if model_config.position == "learned":
        train = replace(train, seq_len=min(train.seq_len, model_config.max_positions))
    config = Config(model=model_config, mesh=MeshConfig(tensor=tensor), train=train)
    mesh = make_mesh_for({"tensor": tensor})
    model = from_pretrained(hf_path, mesh=mesh)
    optimizer = create_optimizer(model, make_optimizer(config.train))
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.checkpoint.keep)
    checkpointer.save(0, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, {"step": 0, "data_position": 0})
    checkpointer.close()  # saves are asynchronous: finish and seal it
    dump_config(config, run_dir / "config.yaml")
    return config


def run_dir_to_hf(run_dir: str | os.PathLike, hf_path: str | os.PathLike) -> None:
    """Writes the latest checkpoint of ``run_dir`` as a Hugging Face model directory.
    The model is built abstractly and its checkpoint item restored: no random
    initialisation, no optimizer."""
    run_dir = Path(run_dir)
    check_new_model_dir(hf_path)  # before the checkpoint is read
    if not (run_dir / "config.yaml").exists():
        raise HFError(f"No config.yaml in {run_dir}; convert or train into it first.")
    config = load_config(run_dir / "config.yaml")
    mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.checkpoint.keep)
    try:
        if checkpointer.latest_step() is None:
            raise HFError(f"No checkpoint in {run_dir / 'checkpoints'}; convert or train into it first.")
        model = abstract_model(config.model, mesh)
        checkpointer.restore({"model": nnx.state(model)}, mesh)
    finally:
        checkpointer.close()
    save_pretrained(model, hf_path)
