"""``lite-tp``: the command line.

    lite-tp train CONFIG [--set KEY=VALUE]... [--run-dir DIR]
    lite-tp generate (--run-dir DIR | --hf PATH [--tensor N]) --prompt TEXT
                     [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    lite-tp convert --from-hf PATH --run-dir DIR [--tensor N]   (Hugging Face -> run dir, step 0)
    lite-tp convert --to-hf PATH --run-dir DIR                  (run dir's latest checkpoint -> Hugging Face)
    lite-tp plan CONFIG [--set KEY=VALUE]... [--json] [--check]
                 [--devices N --memory-gb M --device-profile h100|h200|a100|tpu-v5e|cpu]
    lite-tp bench CONFIG [--set KEY=VALUE]... [--json] [--steps N] [--out FILE.json]
    lite-tp launch --processes N [--devices-per-process D] [--max-restarts K] [--hang-timeout S]
                   -- train|generate ARGS...

``train`` and ``generate`` join a multi-process run (``jax.distributed``) when
the environment describes one: ``lite-tp launch`` on one machine, or SLURM,
Open MPI or ``JAX_COORDINATOR_ADDRESS`` on a cluster (docs/multi-host.md).

Exit codes: 0 success; 2 bad input (config, mesh, data, checkpoint, a run
directory in use or not writable), one line on stderr and no traceback; 1 a
failure at run time (a non-finite loss with ``train.on_nonfinite=stop``: one
line); 3 a device failed and no spare could take its place
(``fault/spare.py``): one line saying why, and the job should be restarted
from the last checkpoint; 143 preempted by SIGTERM after saving a checkpoint
(rerun to continue).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

BAD_INPUT = 2
RUNTIME_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(BAD_INPUT, f"lite-tp: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lite-tp", description="Tensor-parallel training for JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override config values, e.g. --set mesh.tensor=4 model.sequence_parallel=true")
    train.add_argument("--run-dir", default="runs/latest", help="where config, metrics and checkpoints go")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    generate = commands.add_parser("generate", help="sample text with a KV cache, streamed to stdout")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a training run: its latest checkpoint, byte-level tokens")
    source.add_argument("--hf", metavar="PATH", help="a Hugging Face model directory (its tokenizer.json if any)")
    generate.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree for --hf")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set holding P of the mass")
    generate.add_argument("--seed", type=int, default=0)

    launch = commands.add_parser("launch", help="run train or generate in several local processes, one mesh")
    launch.add_argument("--processes", type=int, required=True, help="number of processes (each a 'host')")
    launch.add_argument("--devices-per-process", type=int, default=None,
                        help="fake CPU devices per process (default: the mesh's devices / processes)")
    launch.add_argument("--max-restarts", type=int, default=0,
                        help="restart the whole job from its last checkpoint after a failure, at most this often")
    launch.add_argument("--hang-timeout", type=float, default=None, metavar="S",
                        help="treat S seconds without a completed training step as a failure")
    launch.add_argument("worker", nargs=argparse.REMAINDER, metavar="-- train|generate ARGS",
                        help="the lite-tp command every process runs")

    convert = commands.add_parser("convert", help="Hugging Face model directory <-> run directory")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="PATH", help="read this Hugging Face model into --run-dir (step 0)")
    direction.add_argument("--to-hf", metavar="PATH", help="write --run-dir's latest checkpoint here")
    convert.add_argument("--run-dir", required=True)
    convert.add_argument("--tensor", type=int, default=1, help="TP degree to load over while converting (any mesh trains from the result)")

    from lite_tp_jax.plan.profiles import PROFILES

    plan = commands.add_parser("plan", help="memory and communication of a mesh, before running it")
    plan.add_argument("config", help="YAML config, e.g. configs/llama-1b.yaml")
    plan.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.add_argument("--check", action="store_true",
                      help="also compile the training step (abstractly) and compare its collective bytes")
    plan.add_argument("--devices", type=_positive_int, help="rank every mesh of N devices")
    plan.add_argument("--memory-gb", type=float, help="memory per device in GB (10^9 bytes) for the ranking (default: the profile's)")
    plan.add_argument("--device-profile", choices=sorted(PROFILES), default="h100")

    bench = commands.add_parser("bench", help="time a training step: lite_tp_jax vs GSPMD vs one device")
    bench.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    bench.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    bench.add_argument("--json", action="store_true", help="print JSON instead of tables")
    bench.add_argument("--steps", type=_positive_int, default=20, help="timed interleaved rounds (>= 2)")
    bench.add_argument("--depths", default="2,8,32", help="layer counts for compile time vs depth ('' for none)")
    bench.add_argument("--out", help="also write the JSON (and a PNG plot beside it) to this path")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from lite_tp_jax.train.checkpoint import CheckpointError
    from lite_tp_jax.train.config import ConfigError
    from lite_tp_jax.train.data import DataError
    from lite_tp_jax.train.run_lock import RunLockError

    return (ConfigError, DataError, CheckpointError, RunLockError, ValueError, FileNotFoundError)


def _devices_needed(mesh_config) -> int:
    sizes = (mesh_config.data, mesh_config.pipeline, mesh_config.expert, mesh_config.tensor)
    return math.prod(size for size in sizes if size > 0) + mesh_config.spares


def _start_devices(config) -> None:
    """Joins a multi-process run if the environment describes one (its devices
    are then set by the launcher or the cluster); otherwise provides fake CPU
    devices for the mesh when there is no accelerator. Before any jax operation."""
    from lite_tp_jax.mesh import provide_cpu_devices, start_cluster
    from lite_tp_jax.train.preflight import check_fake_device_count

    if config.train.deterministic:
        _use_deterministic_gpu_ops()
    if not start_cluster():
        check_fake_device_count(_devices_needed(config.mesh))  # before jax allocates them
        provide_cpu_devices(_devices_needed(config.mesh))


def _use_deterministic_gpu_ops() -> None:
    """XLA's ``--xla_gpu_deterministic_ops`` (no effect on CPU); read when jax starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def _train(args) -> int:
    from lite_tp_jax.train.config import load_config

    config = load_config(args.config, args.overrides)
    _start_devices(config)

    from lite_tp_jax.train.checkpoint import NonFiniteError
    from lite_tp_jax.fault.spare import DEVICE_LOST_EXIT, DeviceLost
    from lite_tp_jax.train.loop import Trainer
    from lite_tp_jax.train.preemption import PREEMPTED_EXIT_CODE

    trainer = Trainer(config, args.run_dir)
    try:
        records = trainer.run(show_progress=not args.no_progress)
    except NonFiniteError as error:  # train.on_nonfinite=stop: one line, the last checkpoint kept
        print(f"lite-tp: error: {error}", file=sys.stderr)
        return RUNTIME_FAILURE
    except DeviceLost as lost:
        print(f"lite-tp: {lost}", file=sys.stderr)
        return DEVICE_LOST_EXIT
    except Exception:
        traceback.print_exc()
        return RUNTIME_FAILURE
    from lite_tp_jax.train.loop import is_primary

    if trainer.preempted_at is not None:
        print(f"lite-tp: preempted (SIGTERM): checkpoint {trainer.preempted_at} saved in {args.run_dir}; "
              f"rerun the same command to continue", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if not is_primary():
        return 0
    if trainer.skipped_steps:
        print(f"lite-tp: warning: {trainer.skipped_steps} updates were skipped for a non-finite loss, "
              f"gradient norm or parameter (train.on_nonfinite=skip); see 'skipped' in metrics.jsonl", file=sys.stderr)
    if records:
        print(f"trained steps {records[0]['step']}..{records[-1]['step']}: "
              f"loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; run dir {args.run_dir}")
    else:
        print(f"nothing to do: {args.run_dir} already holds step {trainer.start_step}")
    return 0


def _generate(args) -> int:
    import json
    from pathlib import Path

    from lite_tp_jax.mesh import provide_cpu_devices, start_cluster

    # Everything about the arguments is checked before a model is loaded.
    sampling = _sampling(args)
    if args.hf is not None:
        if args.tensor < 1:
            raise ValueError(f"--tensor must be a positive integer, got {args.tensor}.")
        if not (Path(args.hf) / "config.json").exists():
            raise FileNotFoundError(f"No config.json in {args.hf}; --hf takes a Hugging Face model directory.")
        if not start_cluster():
            provide_cpu_devices(args.tensor)
    else:
        from lite_tp_jax.train.config import load_config

        config_path = Path(args.run_dir) / "config.yaml"
        if config_path.exists():
            _start_devices(load_config(config_path))
        else:
            start_cluster()

    from lite_tp_jax.generate import ByteTokenizer, load_tokenizer, load_trained_model, stream_text

    if args.hf is not None:
        import lite_tp_jax
        from lite_tp_jax.mesh import make_mesh_for

        tokenizer = load_tokenizer(args.hf, json.loads((Path(args.hf) / "config.json").read_text()).get("vocab_size", 0))
        model = lite_tp_jax.from_pretrained(args.hf, mesh=make_mesh_for({"tensor": args.tensor}))
    else:
        model, tokenizer = load_trained_model(args.run_dir), ByteTokenizer()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    try:
        for piece in stream_text(model, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                 seed=args.seed, tokenizer=tokenizer):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except FloatingPointError as error:  # NaN parameters: a bad checkpoint, not text of NUL bytes
        raise ValueError(f"{args.hf or args.run_dir}: {error}") from error
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _sampling(args):
    """The sampling options of ``lite-tp generate``, checked (ValueError, one sentence)."""
    from lite_tp_jax.generate import Sampling, check_max_new_tokens

    check_max_new_tokens(args.max_new_tokens)
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _launch(args) -> int:
    from pathlib import Path

    from lite_tp_jax.fault.restart import supervise
    from lite_tp_jax.train.config import ConfigError, load_config

    worker = args.worker[1:] if args.worker[:1] == ["--"] else args.worker
    if worker[:1] not in (["train"], ["generate"]):
        raise ConfigError(f"launch runs 'train' or 'generate', got {' '.join(worker) or 'nothing'}; "
                          f"e.g. lite-tp launch --processes 2 -- train configs/tiny.yaml")
    if args.processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {args.processes}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be at least 0, got {args.max_restarts}")
    if args.hang_timeout is not None and not args.hang_timeout > 0:
        raise ConfigError(f"--hang-timeout must be a positive number of seconds, got {args.hang_timeout}")
    worker_args = _parser().parse_args(worker)  # bad worker arguments: exit 2 here, once
    run_dir = Path(worker_args.run_dir)
    config = (load_config(worker_args.config, worker_args.overrides) if worker_args.command == "train"
              else load_config(run_dir / "config.yaml"))
    if config.mesh.spares:
        raise ConfigError(f"'mesh.spares' ({config.mesh.spares}) replaces devices within one process; "
                          f"launch runs several, so set mesh.spares=0")
    devices = args.devices_per_process
    if devices is None:
        sizes = (config.mesh.data, config.mesh.pipeline, config.mesh.expert, config.mesh.tensor)
        if -1 in sizes:
            raise ConfigError("a mesh axis is -1 (inferred); give --devices-per-process")
        if math.prod(sizes) % args.processes:
            raise ConfigError(f"the mesh's {math.prod(sizes)} devices do not split evenly over "
                              f"--processes {args.processes}; choose a divisor or give --devices-per-process")
        devices = math.prod(sizes) // args.processes
    if devices < 1:
        raise ConfigError(f"--devices-per-process must be at least 1, got {devices}")
    return supervise(worker, args.processes, devices, run_dir, max_restarts=args.max_restarts, hang_timeout=args.hang_timeout)


def _convert(args) -> int:
    from pathlib import Path

    from lite_tp_jax.mesh import provide_cpu_devices
    from lite_tp_jax.train.config import load_config

    if args.from_hf is not None:
        if args.tensor < 1:
            raise ValueError(f"--tensor must be a positive TP degree, got {args.tensor}.")
        provide_cpu_devices(args.tensor)
        from lite_tp_jax.interop.convert import hf_to_run_dir

        hf_to_run_dir(args.from_hf, args.run_dir, tensor=args.tensor)
        print(f"converted {args.from_hf} -> {args.run_dir} (step 0); fine-tune with "
              f"`lite-tp train {Path(args.run_dir) / 'config.yaml'} --run-dir {args.run_dir}`")
        return 0
    config_path = Path(args.run_dir) / "config.yaml"
    if config_path.exists():
        provide_cpu_devices(_devices_needed(load_config(config_path).mesh))
    from lite_tp_jax.interop.convert import run_dir_to_hf

    run_dir_to_hf(args.run_dir, args.to_hf)
    print(f"converted {args.run_dir} -> {args.to_hf}")
    return 0


def _plan(args) -> int:
    import json

    from lite_tp_jax.mesh import provide_cpu_devices
    from lite_tp_jax.train.config import load_config

    config = load_config(args.config, args.overrides)
    if args.devices is None and -1 in (config.mesh.data, config.mesh.pipeline, config.mesh.expert, config.mesh.tensor):
        raise ValueError("the config's mesh has an inferred axis (-1); give --devices N to fix its size")
    provide_cpu_devices(max(args.devices or 0, _devices_needed(config.mesh)))  # fake CPU devices to lay the model out on

    from lite_tp_jax.plan import planner
    from lite_tp_jax.plan.profiles import PROFILES

    sizes = planner.mesh_sizes(config, args.devices)
    out = {"config": args.config, **planner.plan(config, sizes)}
    if args.check:
        out["compiled_collective_bytes_by_axis"] = planner.compiled_bytes_by_axis(config, sizes)
    if args.devices is not None:
        profile = PROFILES[args.device_profile]
        memory_gb = args.memory_gb if args.memory_gb is not None else profile.memory_bytes / 1e9
        out["ranking"] = planner.rank_meshes(config, args.devices, memory_gb, profile)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(planner.format_plan(out))
    if args.check:
        print("compiled step:", ", ".join(f"{k} {planner.mib(v)}" for k, v in out["compiled_collective_bytes_by_axis"].items()))
    if args.devices is not None:
        print()
        print(planner.format_ranking(out["ranking"], PROFILES[args.device_profile], memory_gb))
    return 0


def _bench(args) -> int:
    from lite_tp_jax.mesh import provide_cpu_devices
    from lite_tp_jax.train.config import load_config

    config = load_config(args.config, args.overrides)
    provide_cpu_devices(_devices_needed(config.mesh))

    from lite_tp_jax import bench

    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    result = bench.run(config, steps=args.steps, depths=depths, config_name=args.config)
    print(bench.to_json(result) if args.json else bench.format_result(result))
    if args.out:
        bench.write(result, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"train": _train, "generate": _generate, "launch": _launch, "convert": _convert, "plan": _plan, "bench": _bench}
        return commands[args.command](args)
    except _bad_input_errors() as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"lite-tp: error: {message}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return RUNTIME_FAILURE


if __name__ == "__main__":
    sys.exit(main())
