"""Data-parallel fallback (lite_tp_jax/runtime/spares.py, called by train/loop.py): a spare takes a failed
device's slot, its shards copied from a data-parallel replica, and training
goes on bit for bit as if nothing failed; without a replica or a spare the
CLI exits 3 saying why."""

import contextlib
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.cli import main
from lite_tp_jax.runtime.spares import (
    DeviceLost, move_array, replace_device, replica_of, spare_devices,
)
from lite_tp_jax.core.mesh import make_mesh, make_mesh_for
from lite_tp_jax.runtime.exit_codes import ExitCode
from lite_tp_jax.train.faults import poisoned
from lite_tp_jax.sharding.rules import param_shardings
from lite_tp_jax.run.config import ConfigError, MeshConfig
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.train.loop import Trainer
from lite_tp_jax.run.optimizer import create_model_and_optimizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# data 2 x tensor 2 on devices 0-3, spares 4 and 5. Device 1 is (data 0, tensor 1);
# its replica is device 3 (data 1, tensor 1).
SMALL = ["mesh.data=2", "mesh.tensor=2", "mesh.spares=2", "train.steps=3", "train.global_batch=4", "train.seq_len=16"]


def shards(array: jax.Array) -> list[np.ndarray]:
    """Every device's copy, in mesh-slot order (np.asarray would read one replica only)."""
    return [np.asarray(shard.data) for shard in array.addressable_shards]


def train(tmp_path: Path, name: str, overrides: list[str]) -> tuple[Trainer, list[dict], dict[str, list]]:
    trainer = Trainer(load_config(TINY, [*SMALL, *overrides]), tmp_path / name)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        trainer.run(show_progress=False)
    trainer.terminal = err.getvalue()  # what the user saw
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    state = {
        ".".join(map(str, path)): shards(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state((trainer.model, trainer.optimizer)))
    }
    return trainer, lines, state


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    return train(tmp_path_factory.mktemp("spare"), "fault-free", [])


@pytest.fixture(scope="module")
def taken_over(tmp_path_factory):
    return train(tmp_path_factory.mktemp("spare"), "taken-over", ["fault.fail_device=1", "fault.fail_step=2"])


def test_takeover_is_bitwise_equal_to_the_fault_free_run(fault_free, taken_over):
    _, expected_lines, expected_state = fault_free
    _, lines, state = taken_over
    steps = [line for line in lines if "event" not in line]
    assert [line["step"] for line in steps] == [1, 2, 3]  # step 2 replayed, recorded once
    assert [line["loss"] for line in steps] == [line["loss"] for line in expected_lines if "event" not in line]
    assert state.keys() == expected_state.keys()
    for name, expected in expected_state.items():  # parameters, moments, counts: every device's copy
        assert len(state[name]) == len(expected) == 4, name
        for slot, (got, want) in enumerate(zip(state[name], expected)):
            np.testing.assert_array_equal(got, want, err_msg=f"{name} slot {slot}", strict=True)


def test_takeover_puts_the_spare_in_the_failed_slot_and_logs_it(taken_over):
    trainer, lines, _ = taken_over
    failed, spare = jax.devices()[1], jax.devices()[4]
    assert trainer.mesh.devices.flat[1] == spare  # the slot of tensor rank 1
    assert [d.id for d in trainer.mesh.devices.flat] == [0, 4, 2, 3]
    for _, variable in nnx.to_flat_state(nnx.state((trainer.model, trainer.optimizer))):
        assert failed not in variable.get_value().sharding.device_set
    event, goodput = [line for line in lines if "event" in line]
    assert lines.index(event) == 1  # after step 1, before the replayed step 2
    assert event["event"] == "spare_takeover"
    assert goodput["event"] == "goodput" and lines[-1] is goodput  # the run's breakdown, last
    assert goodput["takeovers"] == 1 and goodput["takeover_s"] == pytest.approx(event["seconds"], abs=2e-3)
    assert (event["step"], event["failed_device"], event["spare"], event["replica"]) == (2, 1, 4, 3)
    assert event["slot"] == {"data": 0, "pipeline": 0, "expert": 0, "fsdp": 0, "context": 0, "tensor": 1}
    assert event["seconds"] >= event["compile_seconds"] > 0 and event["copied_bytes"] > 0
    assert trainer.spares.devices == [jax.devices()[5]]  # one spare left
    assert trainer.terminal.startswith("lite-tp: device 1 failed at step 2; spare device 4 took its place in ")


# ---------------------------------------------------------------------------
# move_array on its own: every shard from a surviving device, uneven sizes too
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meshes():
    """data 2 x tensor 3 on devices 0-5; device 4 (data 1, tensor 1) fails, spare 6."""
    mesh = make_mesh(data=2, tensor=3, devices=jax.devices()[:6])
    failed, spare = jax.devices()[4], jax.devices()[6]
    return mesh, replace_device(mesh, failed, spare), failed


@pytest.mark.parametrize(
    "shape, spec",
    [((9, 5), P("tensor")), ((4, 6), P(None, "tensor")), ((7,), P()), ((), P())],
    ids=["rows-over-tensor", "columns-over-tensor", "replicated", "scalar"],
)
def test_move_array_copies_the_failed_shard_from_its_replica(meshes, shape, spec):
    mesh, new_mesh, failed = meshes
    value = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    array = poisoned(jax.device_put(value, NamedSharding(mesh, spec)), failed)
    shards = {shard.device: shard.data for shard in array.addressable_shards}
    assert np.isnan(np.asarray(shards[failed])).all()  # the injected garbage
    replica = replica_of(mesh, failed)
    assert replica == jax.devices()[1]  # (data 0, tensor 1)
    moved, copied = move_array(array, NamedSharding(new_mesh, spec), failed, replica, "x")
    assert len(moved.addressable_shards) == 6
    for shard in moved.addressable_shards:  # every copy, the spare's included
        np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index], strict=True)
    assert failed not in moved.sharding.device_set and jax.devices()[6] in moved.sharding.device_set
    spare_shard = next(s.data for s in moved.addressable_shards if s.device == jax.devices()[6])
    assert copied == spare_shard.nbytes  # only the spare's shard was copied


def test_move_array_without_a_copy_of_the_failed_shard_raises(meshes):
    mesh, new_mesh, failed = meshes
    split_over_data = jax.device_put(jnp.zeros((4, 3)), NamedSharding(mesh, P("data", "tensor")))
    with pytest.raises(DeviceLost, match="no surviving device holds a copy of its shard of 'w'"):
        move_array(split_over_data, NamedSharding(new_mesh, P("data", "tensor")), failed, replica_of(mesh, failed), "w")
    only_on_failed = jax.device_put(jnp.zeros(()), SingleDeviceSharding(failed))
    with pytest.raises(DeviceLost, match="'count'"):
        move_array(only_on_failed, NamedSharding(new_mesh, P()), failed, replica_of(mesh, failed), "count")
    elsewhere = jax.device_put(jnp.full((), 7.0), SingleDeviceSharding(jax.devices()[0]))
    moved, _ = move_array(elsewhere, NamedSharding(new_mesh, P()), failed, None, "count")
    assert float(moved) == 7.0 and moved.sharding.device_set == set(new_mesh.devices.flat)


def test_before_the_first_step_every_array_has_a_replica():
    """Optimizer step counts are created on one device; they must be on the mesh
    (replicated) too, or device 0 failing at step 1 would lose them. Uneven TP 3:
    padded kernels (ffn 172 -> 174, kv groups) move like any other array."""
    config = load_config(TINY, [*SMALL, "mesh.tensor=3"])
    mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
    failed, spare = mesh.devices.flat[0], jax.devices()[6]
    new_mesh = replace_device(mesh, failed, spare)
    state = nnx.state(create_model_and_optimizer(config.model, config.train, mesh))
    targets = dict(nnx.to_flat_state(param_shardings(state, new_mesh)))
    for path, variable in nnx.to_flat_state(state):
        array = variable.get_value()
        moved, _ = move_array(poisoned(array, failed), targets[path], failed, replica_of(mesh, failed), str(path))
        assert len(shards(moved)) == len(shards(array)) == 6
        for got, want in zip(shards(moved), shards(array)):
            np.testing.assert_array_equal(got, want, err_msg=str(path), strict=True)


def test_make_mesh_for_keeps_spares_out_of_the_mesh():
    mesh = make_mesh_for({"data": 2, "pipeline": 1, "expert": 1, "tensor": 2}, spares=2)
    assert [d.id for d in mesh.devices.flat] == [0, 1, 2, 3]
    assert spare_devices(mesh, 2) == jax.devices()[4:6]
    inferred = make_mesh_for({"data": 1, "pipeline": 1, "expert": 1, "tensor": -1}, spares=3)
    assert inferred.shape["tensor"] == 5
    with pytest.raises(ValueError, match=r"'mesh.spares' \(1\) needs 1 devices beyond the mesh's 8, but only 8 exist"):
        make_mesh_for({"data": 2, "pipeline": 1, "expert": 1, "tensor": 4}, spares=1)
    # The CLI asks for fake CPU devices for the mesh and its spares.
    assert MeshConfig(data=2, tensor=3, spares=2).devices_needed() == 8


# ---------------------------------------------------------------------------
# No replica or no spare: exit 3, one line, restart from the last checkpoint
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mesh.data=1", "mesh.spares=1"], "device 1 failed at step 1 and mesh.data is 1, so no data-parallel replica holds a copy of its shards"),
        (["mesh.spares=0"], "device 1 failed at step 1 and no spare device is left (mesh.spares=0)"),
    ],
    ids=["no-replica", "no-spare"],
)
def test_without_replica_or_spare_the_trainer_exits_3(overrides, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", str(TINY), "--no-progress", "--run-dir", str(run_dir),
            "--set", *SMALL, *overrides, "fault.fail_device=1", "fault.fail_step=1"]
    assert main(argv) == ExitCode.DEVICE_LOST == 3
    err = capsys.readouterr().err
    assert message in err and "restart from the last checkpoint (none yet: from step 0)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # No step and no takeover: only the run's goodput breakdown.
    assert [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == ["goodput"]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    # The restart (the same command again) does not fail again.
    rerun = Trainer(load_config(TINY, [*SMALL, *overrides, "fault.fail_device=1", "fault.fail_step=1"]), run_dir)
    assert rerun.spares.failure is None and rerun.start_step == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fault.fail_device=1"], "'fault.fail_device' is set but 'fault.fail_step' is not"),
        (["fault.fail_step=2"], "'fault.fail_step' is set but 'fault.fail_device' is not"),
        (["fault.fail_device=1", "fault.fail_step=4"], "'fault.fail_step' (4) is past 'train.steps' (3)"),
        (["fault.fail_device=-1", "fault.fail_step=1"], "'fault.fail_device' must be an integer >= 0 or null, got -1"),
        (["mesh.spares=-1"], "'mesh.spares' must be an integer >= 0, got -1"),
    ],
)
def test_bad_fault_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as raised:
        load_config(TINY, [*SMALL, *overrides])
    assert message in str(raised.value)


def test_failing_a_device_outside_the_mesh_exits_2(tmp_path, capsys):
    argv = ["train", str(TINY), "--run-dir", str(tmp_path / "run"),
            "--set", *SMALL, "fault.fail_device=4", "fault.fail_step=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'fault.fail_device' (4) is not a device of the mesh; choose one of the mesh's device ids [0, 1, 2, 3] (4, 5 are spares)" in err
    assert not (tmp_path / "run").exists()
