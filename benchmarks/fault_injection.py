"""Fault injection: runs that must finish bitwise equal to the fault-free run.

    python benchmarks/fault_injection.py [--spare-failures 3] [--steps 30] [--seed 0]
                                         [--workloads tiny,wider] [--kills 10] [--kill-cache off,on]
                                         [--out FILE.md]

Spare takeovers (issue 10, part 3; ``lite_tp_jax/runtime/spares.py``): one
process, data 2 x tensor 3 (uneven shards) with ``mesh.spares=2``: 8 fake
CPU devices; workloads ``configs/tiny.yaml`` and a wider variant (hidden 256,
4 layers, seq 128), whose steps take longer. Per workload, a fault-free run, then
``--spare-failures`` runs, each with one failure of a random mesh device at a
random step (``fault.fail_device``, ``fault.fail_step``, drawn from
``--seed``). Every run must finish without a restart, with every step's loss
and every device's copy of every parameter and optimizer-state array bitwise
equal to the fault-free run. Reported per failure: the takeover's seconds
(from the failure to the re-jitted step ready: new mesh, shards moved,
compile), the compile part of them, the replayed step's own time, and the
goal "at most 2 steps' time plus one compile". The persistent compilation
cache is off, so every compile is a real one.

Process kills (issue 10, part 1; ``lite_tp_jax/runtime/restart.py``): ``lite-tp
launch --processes 2 --max-restarts 2 -- train configs/tiny.yaml`` at data 2 x
tensor 4 (4 devices per process), checkpoint every 5 steps. A fault-free
launch, then ``--kills`` launches in turn, each with one worker process,
drawn at random, killed (SIGKILL) once the run reaches a random step. Each
must finish, with every step recorded once, its losses and the final
checkpoint's parameters and optimizer state bitwise equal to the fault-free
run's. Reported per kill: the restart event's ``seconds_to_first_step`` (from
the failure seen to the first step after it: stopping, start-up, restore,
compile) and the first step's own time separately. ``--kill-cache off,on``
runs the kill launches twice, with ``compile.cache=false`` (every restart
compiles from scratch, as before the persistent cache) and with the cache on
(a fresh directory that the fault-free launch fills), the same kills drawn
for both, and reports the two side by side. ``--workloads ''`` skips the spare
takeovers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lite_tp_jax.runtime.devices import provide_cpu_devices

DEVICES = 8
EVERY = 5  # checkpoint interval of the process-kill runs
MESH = ["mesh.data=2", "mesh.tensor=3", "mesh.spares=2"]
WORKLOADS = {
    "tiny": [],
    "wider": ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4",
              "model.ffn_hidden_size=688", "train.seq_len=128"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spare-failures", type=int, default=3, help="runs with one injected device failure each")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="draws the failed devices and steps")
    parser.add_argument("--workloads", default="tiny,wider", help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--kills", type=int, default=10, help="launches with one killed worker process each")
    parser.add_argument("--kill-cache", default="off",
                        help="compilation cache of the kill launches: off, on, or off,on (side by side)")
    parser.add_argument("--out", help="markdown report (e.g. benchmarks/results/fault-injection-cpu.md)")
    args = parser.parse_args()
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.kill_cache = args.kill_cache.split(",")
    if not set(args.kill_cache) <= {"off", "on"}:
        parser.error(f"--kill-cache takes off, on or off,on, got {','.join(args.kill_cache)!r}")
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")
    return args


def main() -> int:
    args = parse_args()
    if os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        os.environ["JAX_PLATFORMS"] = "cpu"
        provide_cpu_devices(DEVICES)
    import jax
    import numpy as np
    from flax import nnx

    from lite_tp_jax.run.config_file import load_config
    from lite_tp_jax.train.loop import Trainer
    from report import machine, write_report  # benchmarks/report.py

    jax.config.update("jax_enable_compilation_cache", False)
    config_path = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    base = [*MESH, f"train.steps={args.steps}", f"checkpoint.every={args.steps}"]

    def run(run_dir: Path, overrides: list[str]) -> dict:
        started = time.perf_counter()
        trainer = Trainer(load_config(config_path, [*base, *overrides]), run_dir)
        trainer.run(show_progress=False)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        state = {
            path: [np.asarray(shard.data) for shard in variable.get_value().addressable_shards]
            for path, variable in nnx.to_flat_state(nnx.state((trainer.model, trainer.optimizer)))
        }
        return {
            "steps": [line for line in lines if "event" not in line],
            "events": [line for line in lines if "event" in line],
            "state": state,
            "mesh": [d.id for d in trainer.mesh.devices.flat],
            "wall": time.perf_counter() - started,
        }

    def bitwise_equal(a: dict, b: dict) -> bool:
        if [s["loss"] for s in a["steps"]] != [s["loss"] for s in b["steps"]] or a["state"].keys() != b["state"].keys():
            return False
        return all(
            len(a["state"][k]) == len(b["state"][k]) and all(np.array_equal(x, y) for x, y in zip(a["state"][k], b["state"][k]))
            for k in a["state"]
        )

    def workload(name: str, overrides: list[str], tmp: Path) -> list[str]:
        """Runs the fault-free run and the failures of one workload; returns its report section."""
        rng = np.random.default_rng(args.seed)
        reference = run(tmp / f"{name}-fault-free", overrides)
        print(f"{name} fault-free: {args.steps} steps in {reference['wall']:.1f} s", flush=True)
        failures = []
        for i in range(args.spare_failures):
            device, step = int(rng.choice(reference["mesh"])), int(rng.integers(1, args.steps + 1))
            result = run(tmp / f"{name}-failure-{i}", [*overrides, f"fault.fail_device={device}", f"fault.fail_step={step}"])
            finished = [s["step"] for s in result["steps"]] == list(range(1, args.steps + 1))
            failures.append({"device": device, "step": step, "finished": finished,
                             "equal": finished and bitwise_equal(result, reference), **result})
            print(f"{name} failure {i + 1}: device {device} at step {step}: finished={finished} "
                  f"bitwise_equal={failures[-1]['equal']}", flush=True)
        totals[0] += sum(f["finished"] for f in failures)
        totals[1] += sum(f["equal"] for f in failures)
        totals[2] += len(failures)

        median_step = statistics.median(s["step_time_s"] for s in reference["steps"][1:])  # step 1 compiles
        section = [
            f"## {name}: `configs/tiny.yaml` with {', '.join(f'`{o}`' for o in [*base, *overrides])}",
            "",
            f"Fault-free run: median step {median_step * 1000:.1f} ms (steps 2..{args.steps}); step 1 with its "
            f"compile {reference['steps'][0]['step_time_s']:.2f} s; step 2, the first call after the compile, "
            f"{reference['steps'][1]['step_time_s'] * 1000:.1f} ms.",
            "",
            f"**{sum(f['finished'] for f in failures)}/{len(failures)} runs finished without a restart; "
            f"{sum(f['equal'] for f in failures)}/{len(failures)} bitwise equal** to the fault-free run.",
            "",
            "| # | failed device (slot) | spare | from replica | at step | takeover (s) | of it compile (s) | rest (s) "
            "| rest / median step | replayed step (ms) | goal ≤ 2 steps + compile | finished | bitwise equal |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        ]
        for i, f in enumerate(failures, 1):
            event = f["events"][0] if f["events"] else None
            if event is None:
                section.append(f"| {i} | {f['device']} | – | – | {f['step']} | no takeover | | | | | | {f['finished']} | {f['equal']} |")
                continue
            slot = ", ".join(f"{k} {v}" for k, v in event["slot"].items() if k in ("data", "tensor"))
            rest = event["seconds"] - event["compile_seconds"]
            replayed = next(s["step_time_s"] for s in f["steps"] if s["step"] == event["step"])
            goal = event["seconds"] <= 2 * median_step + event["compile_seconds"]
            section.append(
                f"| {i} | {event['failed_device']} ({slot}) | {event['spare']} | {event['replica']} | {event['step']} | "
                f"{event['seconds']:.2f} | {event['compile_seconds']:.2f} | {rest:.3f} | {rest / median_step:.1f} | "
                f"{replayed * 1000:.1f} | {'met' if goal else 'missed'} | {f['finished']} | {f['equal']} |"
            )
        return section + [""]

    totals = [0, 0, 0]  # finished, bitwise equal, runs with a failure
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        sections = [line for name in args.workloads for line in workload(name, WORKLOADS[name], Path(tmp))]
        kill_totals, kill_section = [0, 0, 0], []
        for cache in args.kill_cache if args.kills else ():
            totals_k, section_k = process_kills(args, config_path, Path(tmp) / f"cache-{cache}", cache)
            kill_totals = [a + b for a, b in zip(kill_totals, totals_k)]
            kill_section += section_k
    sections += kill_section
    load_after = os.getloadavg()[0]
    lines = [
        "# Fault injection: spare-device takeovers",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}; load average {load_before:.1f} at the start, {load_after:.1f} at the end",
        f"- jax {jax.__version__}, python {sys.version.split()[0]}",
        f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/fault_injection.py', *sys.argv[1:]])}`",
        f"- per workload: one process, a fault-free run, then {args.spare_failures} runs with one injected "
        f"failure each (device and step drawn with seed {args.seed}); persistent compilation cache off",
        f"- **{totals[0]}/{totals[2]} finished without a restart, {totals[1]}/{totals[2]} bitwise equal** "
        "(every step's loss; every device's copy of every parameter and optimizer-state array)",
        "- takeover: from the injected failure to the re-jitted step compiled for the new mesh (`seconds` of "
        "the `spare_takeover` event in metrics.jsonl); compile includes tracing the step; rest = takeover - "
        "compile: new mesh, model and optimizer pointed at it (`rebind_mesh`), shards moved (only "
        "the spare's are copied, from the replica), the step re-jitted",
        "- replayed step: the interrupted step's own time on the new mesh (its `step_time_s`), after the takeover",
        "",
        *sections,
    ]
    print("\n".join(lines))
    if args.out:
        write_report(lines, args.out)
    return 0 if totals[0] == totals[1] == totals[2] and kill_totals[0] == kill_totals[1] == kill_totals[2] else 1


def process_kills(args, config_path: Path, tmp: Path, cache: str) -> tuple[tuple[int, int, int], list[str]]:
    """The fault-free launch and ``args.kills`` launches with one killed worker each; the
    persistent compilation cache ``cache`` ("off", or "on": a fresh directory under ``tmp``)."""
    import subprocess

    import numpy as np
    from flax import nnx

    from lite_tp_jax.core.mesh import make_mesh_for
    from lite_tp_jax.run.checkpoint import Checkpointer
    from lite_tp_jax.run.config_file import load_config
    from lite_tp_jax.run.optimizer import create_model_and_optimizer
    from lite_tp_jax.sharding.state import export_state

    steps = max(args.steps, 20)
    overrides = ["mesh.data=2", "mesh.tensor=4", f"train.steps={steps}", f"checkpoint.every={EVERY}", "checkpoint.keep=2"]
    launch_overrides = [*overrides, "compile.cache=false" if cache == "off" else f"compile.cache_dir={tmp / 'jax-cache'}"]

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "lite_tp_jax.cli", "launch", "--processes", "2", "--max-restarts", "2",
                "--hang-timeout", "120", "--", "train", str(config_path), "--no-progress",
                *[a for o in launch_overrides for a in ("--set", o)], "--run-dir", str(run_dir)]

    def records(run_dir: Path) -> list[dict]:
        path = run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def final_state(run_dir: Path) -> dict:
        config = load_config(config_path, overrides)
        mesh = make_mesh_for({"data": 2, "pipeline": 1, "expert": 1, "tensor": 4})
        model, optimizer = nnx.eval_shape(lambda: create_model_and_optimizer(config.model, config.train, mesh))
        Checkpointer(run_dir / "checkpoints", keep=2).restore({"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, mesh)
        return export_state(nnx.state((model, optimizer)))

    def workers_of(launcher: int) -> list[int]:
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == launcher:
                children.append(int(stat.parent.name))
        return sorted(children)

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    tmp.mkdir(parents=True, exist_ok=True)
    reference_dir = tmp / "kills-fault-free"
    started = time.perf_counter()
    subprocess.run(command(reference_dir), env=env, check=True, capture_output=True)
    print(f"kills fault-free launch: {steps} steps in {time.perf_counter() - started:.1f} s", flush=True)
    reference_losses = [r["loss"] for r in records(reference_dir) if "event" not in r]
    reference_state = final_state(reference_dir)
    rng = np.random.default_rng(args.seed + 1)
    rows, finished_count, equal_count, seconds = [], 0, 0, []
    for i in range(args.kills):
        run_dir, at, victim = tmp / f"kill-{i}", int(rng.integers(2, steps)), int(rng.integers(0, 2))
        launcher = subprocess.Popen(command(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while launcher.poll() is None and not any(r.get("step", 0) >= at for r in records(run_dir) if "event" not in r):
            time.sleep(0.05)
        workers = workers_of(launcher.pid)
        if launcher.poll() is None and len(workers) > victim:
            os.kill(workers[victim], 9)
        _, err = launcher.communicate(timeout=900)
        lines = records(run_dir)
        steps_seen = [r["step"] for r in lines if "event" not in r]
        finished = launcher.returncode == 0 and steps_seen == list(range(1, steps + 1))
        equal = finished and [r["loss"] for r in lines if "event" not in r] == reference_losses
        if equal:
            state = final_state(run_dir)
            equal = all(np.array_equal(state[k], reference_state[k]) for k in reference_state)
        events = [r for r in lines if r.get("event") == "restart"]
        # The first step after the restart compiles: it is the slowest line logged before the event (which
        # the supervisor appends once that step is logged), step 1 only when no checkpoint existed yet.
        before_event = [r for r in lines[: lines.index(events[0])] if "event" not in r] if events else []
        no_checkpoint_yet = events and events[0]["step"] < EVERY
        candidates = [r for r in before_event if no_checkpoint_yet or r["step"] > 1]
        first = max(candidates, key=lambda r: r["step_time_s"]) if candidates else None
        finished_count, equal_count = finished_count + finished, equal_count + equal
        seconds += [events[0]["seconds_to_first_step"]] if events and events[0]["seconds_to_first_step"] else []
        rows.append(
            f"| {i + 1} | {victim} | {at} | {len(events)} | {events[0]['step'] if events else '–'} | "
            f"{events[0]['seconds_to_first_step'] if events else '–'} | "
            f"{round(first['step_time_s'], 2) if first else '–'} | {finished} | {equal} |"
        )
        print(f"kill {i + 1}: worker {victim} at step {at}: finished={finished} bitwise_equal={equal}"
              + ("" if finished else f" ({err.strip().splitlines()[-1] if err.strip() else 'no output'})"), flush=True)
    section = [
        "## Process kills under `lite-tp launch --max-restarts 2` (2 processes x 4 devices, data 2 x tensor 4), "
        f"compilation cache {cache}",
        "",
        f"`configs/tiny.yaml` with {', '.join(f'`{o}`' for o in overrides)}; the fault-free launch, then "
        f"{args.kills} launches, each with one worker killed (SIGKILL) once the run reached a random step.",
        "",
        f"**{finished_count}/{args.kills} runs finished; {equal_count}/{args.kills} bitwise equal** to the fault-free "
        "run (every step's loss; every parameter and optimizer-state array of the final checkpoint).",
        "",
        "| # | killed rank | at step | restarts | last step before | failure to first step after (s) "
        "| slowest step before the event (s) | finished | bitwise equal |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        f"Median failure to first step after: **{statistics.median(seconds):.2f} s** (compilation cache {cache})."
        if seconds else "",
        "",
    ]
    return (finished_count, equal_count, args.kills), section


if __name__ == "__main__":
    sys.exit(main())
