"""Several checks in one group of processes, for tests/test_launch.py (one
process launch covers them all).

    python tests/launch_worker.py '[{"run_dir": ..., "overrides": [...]}, {"all_reduce_to": FILE.npz}, ...]'

Run by ``lite_tp_jax.runtime.launch.run_processes`` with the ``LITE_TP_*`` environment.
A ``run_dir`` entry trains configs/tiny.yaml with its overrides; an
``all_reduce_to`` entry saves (from process 0) ``all_reduce_sums()`` in both modes.
"""

import json
import sys
from pathlib import Path

import numpy as np

from lite_tp_jax.runtime.devices import start_cluster


def all_reduce_sums() -> dict[str, np.ndarray]:
    """``collectives.all_reduce`` over tensor = all devices of rows of a fixed
    random [devices, 65536] array (row r on device r), default and deterministic."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lite_tp_jax.core import collectives
    from lite_tp_jax.core.mesh import make_mesh
    from lite_tp_jax.train.data import process_rows

    mesh = make_mesh(tensor=-1)
    rows = np.random.default_rng(0).standard_normal((mesh.size, 65536)).astype(np.float32)
    sharding = NamedSharding(mesh, P("tensor"))
    x = jax.make_array_from_process_local_data(sharding, rows[process_rows(sharding, rows.shape)], rows.shape)
    sums = {}
    for mode in ("default", "deterministic"):
        with collectives.deterministic_collectives(mode == "deterministic"):
            total = jax.shard_map(lambda v: collectives.all_reduce(v[0], "tensor"), mesh=mesh, in_specs=P("tensor"), out_specs=P())
            sums[mode] = np.asarray(jax.jit(total)(x))
    return sums


if __name__ == "__main__":
    assert start_cluster(), "run me through lite_tp_jax.runtime.launch (LITE_TP_* environment)"
    import jax

    from lite_tp_jax.run.config_file import load_config
    from lite_tp_jax.train.loop import Trainer

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    for entry in json.loads(sys.argv[1]):
        if "all_reduce_to" in entry:
            sums = all_reduce_sums()
            if jax.process_index() == 0:
                np.savez(entry["all_reduce_to"], **sums)
        else:
            Trainer(load_config(tiny, entry["overrides"]), entry["run_dir"]).run(show_progress=False)
