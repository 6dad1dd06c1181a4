"""Several training runs in one group of processes, for tests/test_launch.py
(one process launch covers several checks).

    python tests/launch_worker.py '[{"run_dir": ..., "overrides": [...]}, ...]'

Run by ``lite_tp_jax.launch.run_processes`` with the ``LITE_TP_*`` environment;
every run uses configs/tiny.yaml with its overrides.
"""

import json
import sys
from pathlib import Path

from lite_tp_jax.mesh import start_cluster

if __name__ == "__main__":
    assert start_cluster(), "run me through lite_tp_jax.launch (LITE_TP_* environment)"
    from lite_tp_jax.train.config import load_config
    from lite_tp_jax.train.loop import Trainer

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    for run in json.loads(sys.argv[1]):
        Trainer(load_config(tiny, run["overrides"]), run["run_dir"]).run(show_progress=False)
