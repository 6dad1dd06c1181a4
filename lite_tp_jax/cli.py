"""``lite-tp``: the command line, and the composition root of the package.

    lite-tp train CONFIG [--set KEY=VALUE]... [--run-dir DIR] [--profile START:END] [--peak-tflops T]
                  [--resume-step N] [--skip-batches K]
    lite-tp generate (--run-dir DIR [--step N] | --hf PATH [--tensor N]) --prompt TEXT
                     [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    lite-tp checkpoints RUN_DIR [--json]    (step, time, loss, intact, set aside, suspect)
    lite-tp convert --from-hf PATH --run-dir DIR [--tensor N]   (Hugging Face -> run dir, step 0)
    lite-tp convert --to-hf PATH --run-dir DIR                  (run dir's latest checkpoint -> Hugging Face)
    lite-tp plan CONFIG [--set KEY=VALUE]... [--json] [--check]
                 [--devices N --memory-gb M --device-profile h100|h200|a100|tpu-v5e|cpu]
    lite-tp bench CONFIG [--set KEY=VALUE]... [--json] [--steps N] [--out FILE.json]
    lite-tp launch --processes N [--devices-per-process D] [--max-restarts K] [--hang-timeout S]
                   -- train|generate ARGS...
    lite-tp tokenize SOURCE OUT [--tokenizer bytes|tokenizer.json|x.model|MODEL_DIR]
                     [--field F | --prompt-field P --completion-field C] [--split S]
                     (text files, JSONL or a saved Hugging Face dataset -> a corpus for data.source=tokenized)

``train`` and ``generate`` join a multi-process run (``jax.distributed``) when
the environment describes one: ``lite-tp launch`` on one machine, or SLURM,
Open MPI or ``JAX_COORDINATOR_ADDRESS`` on a cluster (docs/multi-host.md).

Exit codes (``runtime.exit_codes.ExitCode``): 0 success; 2 bad input (a
``BadInput``: config, mesh, data, checkpoint, a run directory in use or not
writable, a folder that is not a run directory, a step or a KV cache beyond a
device's memory, a full disk), one line on stderr and no traceback; 1 anything
else, a bug or a failure at run time (a traceback); 3 a device failed and no
spare could take its place: one line saying why, restart from the last
checkpoint; 4 a run stopped on a non-finite step or a loss spike (one line
naming the step a rerun resumes from: ``train/divergence.py``; ``launch
--max-restarts`` never restarts it); 130 interrupted by Ctrl-C and 143
preempted by SIGTERM, each after saving a checkpoint (rerun to continue).

The commands that compute import jax and the model stack inside their bodies:
``launch`` is a supervisor that must stay light (no jax, flax or orbax), and
jax's devices are chosen (fake CPU devices, a cluster) before its backends start.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from pathlib import Path

from lite_tp_jax.analysis.profiles import PROFILES, profile_for_device
from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.run.config import ConfigError
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.runtime.exit_codes import ExitCode
from lite_tp_jax.runtime.restart import supervise
from lite_tp_jax.runtime.run_dir import RunLock, check_run_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(ExitCode.BAD_INPUT, f"lite-tp: error: {message}\n")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _add_overrides(command: argparse.ArgumentParser) -> None:
    command.add_argument("config", nargs="?", help="YAML config, e.g. configs/tiny.yaml")
    command.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                         help="override config values, e.g. --set mesh.tensor=4 model.sequence_parallel=true")


def _config_argument(args) -> str:
    """CONFIG, also where ``--set`` took it (``train --set a=b CONFIG``: a word without
    '=' after --set's values is the config file, never an override)."""
    words = [item for item in args.overrides if "=" not in item]
    if args.config is None and len(words) == 1 and args.overrides[-1] == words[0]:
        args.config, args.overrides = words[0], args.overrides[:-1]
    if args.config is None:
        raise ConfigError(f"lite-tp {args.command} needs a CONFIG file, e.g. lite-tp {args.command} configs/tiny.yaml")
    return args.config


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        depths = [0]
    if any(d < 1 for d in depths):
        raise argparse.ArgumentTypeError(f"must be layer counts separated by commas, e.g. 2,8,32; got {text!r}")
    return depths


def _utf8(text: str) -> str:
    """Text the terminal gave that encodes as UTF-8 (a stray byte arrives as a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text; check the terminal's encoding") from None
    return text


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train a model from a YAML config")
    _add_overrides(train)
    train.add_argument("--run-dir", default="runs/latest", help="where config, metrics and checkpoints go")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--profile", metavar="START:END",
                       help="write a jax.profiler trace of steps START..END into RUN_DIR/profile")
    train.add_argument("--peak-tflops", metavar="T",
                       help="peak TFLOP/s of one device, for MFU (default: the device profile of jax's device kind)")
    train.add_argument("--resume-step", type=_non_negative_int, metavar="N",
                       help="resume from checkpoint N (later checkpoints and metrics lines are set aside, not deleted)")
    train.add_argument("--skip-batches", type=_non_negative_int, default=0, metavar="K",
                       help="skip the K batches after the checkpoint resumed from (as a rollback does)")


def _add_generate(commands) -> None:
    generate = commands.add_parser("generate", help="sample text with a KV cache, streamed to stdout")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a training run: its latest checkpoint, byte-level tokens")
    source.add_argument("--hf", metavar="PATH", help="a Hugging Face model directory (its tokenizer.json if any)")
    generate.add_argument("--step", type=_non_negative_int, metavar="N",
                          help="with --run-dir: checkpoint N (set aside or not) instead of the latest")
    generate.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree for --hf")
    generate.add_argument("--prompt", required=True, type=_utf8)
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set holding P of the mass")
    generate.add_argument("--seed", type=int, default=0)


def _add_launch(commands) -> None:
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


def _add_convert(commands) -> None:
    convert = commands.add_parser("convert", help="Hugging Face model directory <-> run directory")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="PATH", help="read this Hugging Face model into --run-dir (step 0)")
    direction.add_argument("--to-hf", metavar="PATH", help="write --run-dir's latest checkpoint here")
    convert.add_argument("--run-dir", required=True)
    convert.add_argument("--tensor", type=int, default=1,
                         help="TP degree to load over while converting (any mesh trains from the result)")


def _add_checkpoints(commands) -> None:
    checkpoints = commands.add_parser("checkpoints", help="list a run's checkpoints: loss, intact, set aside, suspect")
    checkpoints.add_argument("run_dir", metavar="RUN_DIR")
    checkpoints.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_plan(commands) -> None:
    plan = commands.add_parser("plan", help="memory and communication of a mesh, before running it")
    _add_overrides(plan)
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.add_argument("--check", action="store_true",
                      help="also compile the training step (abstractly) and compare its collective bytes")
    plan.add_argument("--devices", type=_positive_int, help="rank every mesh of N devices")
    plan.add_argument("--memory-gb", type=_positive_float,
                      help="memory per device in GB (10^9 bytes) for the ranking (default: the profile's)")
    plan.add_argument("--device-profile", choices=sorted(PROFILES), default="h100")


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="time a training step: lite_tp_jax vs GSPMD vs one device")
    _add_overrides(bench)
    bench.add_argument("--json", action="store_true", help="print JSON instead of tables")
    bench.add_argument("--steps", type=_positive_int, default=20, help="timed interleaved rounds (>= 2)")
    bench.add_argument("--depths", type=_depths, default=[],
                       help="also time compiling at these layer counts, e.g. 2,8,32 (default: none)")
    bench.add_argument("--out", help="also write the JSON (and a PNG plot beside it) to this path")


def _add_tokenize(commands) -> None:
    tokenize = commands.add_parser("tokenize", help="text, JSONL or a saved dataset -> a tokenized corpus")
    tokenize.add_argument("source", help="a text file, directory or glob; a .jsonl file; a datasets.save_to_disk directory")
    tokenize.add_argument("out", help="the corpus directory to write (must not exist)")
    tokenize.add_argument("--tokenizer", default="bytes",
                          help="bytes, a tokenizer.json, a sentencepiece .model, or a model directory holding one")
    tokenize.add_argument("--field", default="text", help="JSONL / dataset field holding each document")
    tokenize.add_argument("--prompt-field", help="instruction data: the prompt's field (not trained on)")
    tokenize.add_argument("--completion-field", help="instruction data: the completion's field (trained on)")
    tokenize.add_argument("--split", default="train", help="the split of a saved DatasetDict")
    tokenize.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lite-tp", description="Tensor-parallel training for JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_generate, _add_launch, _add_convert, _add_checkpoints, _add_plan, _add_bench, _add_tokenize):
        add(commands)
    return parser


def _peak_flops(peak_tflops: float | None, compute_dtype: str) -> tuple[float | None, str]:
    """Peak FLOP/s of one device for MFU, and where it came from: ``--peak-tflops``,
    else the device profile matching jax's device kind (``analysis/profiles.py``)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12, "--peak-tflops"
    import jax

    kind = jax.devices()[0].device_kind
    profile = profile_for_device(kind)
    if profile is None:
        return None, f"no device profile matches {kind!r}: give --peak-tflops for MFU"
    return profile.peak_for(compute_dtype), f"device profile {profile.name!r}"


def _parse_peak_tflops(text: str | None) -> float | None:
    """``--peak-tflops``: a finite number > 0, or BadInput."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"--peak-tflops must be a positive number of TFLOP/s per device (e.g. 989 for an "
                       f"H100 in bfloat16), got {text!r}")
    return value


def _check_tensor(tensor: int) -> None:
    if tensor < 1:
        raise BadInput(f"--tensor must be a positive integer (the tensor-parallel degree), got {tensor}.")


# --- the commands ---------------------------------------------------------------------


def _check_step_fits(config) -> None:
    """Before any work: PreflightError when the planner's memory for one training
    step (parameters, gradients, optimizer state, gathered fsdp weights, activations) exceeds a device's.
    One process only: the planner lays the model out on this process's devices."""
    import jax

    from lite_tp_jax.analysis import planner
    from lite_tp_jax.runtime.devices import check_fits_memory

    if jax.process_count() > 1:
        return

    needed = planner.plan(config, config.mesh.sizes())["peak_bytes_per_device"]
    check_fits_memory(needed, "a training step of this config (lite-tp plan shows the parts)",
                      "lower train.seq_len or train.global_batch, set model.remat=full, or split over more devices")


def _check_kernel(config) -> None:
    """The attention kernel runs on this backend (jax has started)."""
    import jax

    from lite_tp_jax.models.fit import check_kernel_backend

    check_kernel_backend(config.model, jax.default_backend())


def _train(args) -> int:
    config = load_config(_config_argument(args), args.overrides)
    check_run_dir(args.run_dir)
    peak_tflops = _parse_peak_tflops(args.peak_tflops)
    # Deferred: devices are chosen before jax starts, and the training stack loads jax.
    from lite_tp_jax.runtime.compile_cache import use_compile_cache
    from lite_tp_jax.runtime.devices import prepare_devices
    from lite_tp_jax.train.profiling import parse_steps

    profile = parse_steps(args.profile, config.train.steps) if args.profile is not None else None
    prepare_devices(config.mesh.devices_needed(), deterministic=config.train.deterministic)
    use_compile_cache(config.compile.cache, config.compile.cache_dir)
    _check_step_fits(config)
    _check_kernel(config)
    from lite_tp_jax.run.checkpoint import NonFiniteError
    from lite_tp_jax.runtime.spares import DeviceLost
    from lite_tp_jax.train.loop import Trainer, is_primary

    peak, source = _peak_flops(peak_tflops, config.model.compute_dtype)
    trainer = Trainer(config, args.run_dir, peak_flops=peak, profile=profile, resume_step=args.resume_step,
                      skip_batches=args.skip_batches)
    if peak is None and is_primary():
        print(f"lite-tp: note: no MFU ({source})", file=sys.stderr)
    try:
        records = trainer.run(show_progress=not args.no_progress)
    except NonFiniteError as error:  # stopped on a non-finite step or a spike: one line; never restarted
        print(f"lite-tp: error: {error}", file=sys.stderr)
        return ExitCode.DIVERGED
    except DeviceLost as lost:
        print(f"lite-tp: {lost}", file=sys.stderr)
        return ExitCode.DEVICE_LOST
    if trainer.goodput_line is not None:  # process 0
        print(trainer.goodput_line)
    if trainer.preempted_at is not None:
        how = "interrupted (Ctrl-C)" if trainer.stopped_by == "SIGINT" else "preempted (SIGTERM)"
        print(f"lite-tp: {how}: checkpoint {trainer.preempted_at} saved in {args.run_dir}; "
              f"rerun the same command to continue", file=sys.stderr)
        return ExitCode.INTERRUPTED if trainer.stopped_by == "SIGINT" else ExitCode.PREEMPTED
    if not is_primary():
        return ExitCode.OK
    if trainer.skipped_steps:
        print(f"lite-tp: warning: {trainer.skipped_steps} updates were skipped for a non-finite loss, "
              f"gradient norm or parameter (train.on_nonfinite=skip); see 'skipped' in metrics.jsonl", file=sys.stderr)
    if records:
        print(f"trained steps {records[0]['step']}..{records[-1]['step']}: "
              f"loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; run dir {args.run_dir}")
    else:
        print(f"nothing to do: {args.run_dir} already holds step {trainer.start_step}")
    return ExitCode.OK


def _generate(args) -> int:
    # Every argument is checked before a model is loaded (and before jax starts).
    if args.run_dir is not None:
        check_run_dir(args.run_dir)
    if args.hf is not None:
        _check_tensor(args.tensor)
        if args.step is not None:
            raise BadInput("--step chooses a checkpoint of a --run-dir; a --hf model has none.")
        if not (Path(args.hf) / "config.json").exists():
            raise BadInput(f"No config.json in {args.hf}; --hf takes a Hugging Face model directory.")
    config_path = None if args.hf is not None else Path(args.run_dir) / "config.yaml"
    config = load_config(config_path) if config_path is not None and config_path.exists() else None
    if config is not None and config.mesh.context != 1:
        raise BadInput(f"lite-tp generate does not run on a context mesh, but {config_path} has mesh.context = "
                       f"{config.mesh.context}; context parallelism is for training long sequences, so set "
                       f"mesh.context: 1 there (the checkpoint restores onto any mesh).")
    # Deferred: devices are chosen before jax starts, and generation loads jax and the model.
    from lite_tp_jax.inference.sampling import Sampling, check_max_new_tokens
    from lite_tp_jax.runtime.compile_cache import use_compile_cache
    from lite_tp_jax.runtime.devices import prepare_devices, start_cluster

    check_max_new_tokens(args.max_new_tokens)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.hf is not None:
        prepare_devices(args.tensor)
    elif config is not None:
        prepare_devices(config.mesh.devices_needed(), deterministic=config.train.deterministic)
        _check_kernel(config)
    else:
        start_cluster()
    cache = config.compile if config is not None else None
    use_compile_cache(cache is None or cache.cache, cache.cache_dir if cache is not None else None)
    from lite_tp_jax.inference.loading import load_trained_model
    from lite_tp_jax.inference.text import ByteTokenizer, load_tokenizer, stream_text

    if args.hf is not None:
        from lite_tp_jax.core.mesh import make_mesh_for
        from lite_tp_jax.interop.hf import from_pretrained
        from lite_tp_jax.interop.hf_config import read_hf_config

        tokenizer = load_tokenizer(args.hf, read_hf_config(args.hf).get("vocab_size", 0))
        model = from_pretrained(args.hf, mesh=make_mesh_for({"tensor": args.tensor}))
    else:
        model, tokenizer = load_trained_model(args.run_dir, step=args.step), ByteTokenizer()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    try:
        for piece in stream_text(model, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                 seed=args.seed, tokenizer=tokenizer):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except FloatingPointError as error:  # NaN parameters: a bad checkpoint, not text of NUL bytes
        raise BadInput(f"{args.hf or args.run_dir}: {error}") from error
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return ExitCode.OK


def _launch(args) -> int:
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
    if worker_args.command == "generate" and worker_args.run_dir is None:
        raise ConfigError("launch runs generate from a training run's --run-dir (not --hf)")
    run_dir = Path(worker_args.run_dir)
    check_run_dir(run_dir)
    RunLock(run_dir).check_free()  # before any log is opened: a refused launch touches nothing of the running one
    config = (load_config(_config_argument(worker_args), worker_args.overrides) if worker_args.command == "train"
              else load_config(run_dir / "config.yaml"))
    if config.mesh.spares:
        raise ConfigError(f"'mesh.spares' ({config.mesh.spares}) replaces devices within one process; "
                          f"launch runs several, so set mesh.spares=0")
    devices = args.devices_per_process
    if devices is None:
        if -1 in config.mesh.requested.values():
            raise ConfigError("a mesh axis is -1 (inferred); give --devices-per-process")
        total = math.prod(config.mesh.requested.values())
        if total % args.processes:
            raise ConfigError(f"the mesh's {total} devices do not split evenly over "
                              f"--processes {args.processes}; choose a divisor or give --devices-per-process")
        devices = total // args.processes
    if devices < 1:
        raise ConfigError(f"--devices-per-process must be at least 1, got {devices}")
    return supervise(worker, args.processes, devices, run_dir, max_restarts=args.max_restarts, hang_timeout=args.hang_timeout)


def _convert(args) -> int:
    # Deferred: devices are chosen before jax starts, and conversion loads jax and the model.
    from lite_tp_jax.runtime.devices import provide_cpu_devices

    if args.from_hf is not None:
        _check_tensor(args.tensor)
        check_run_dir(args.run_dir)
        provide_cpu_devices(args.tensor)
        from lite_tp_jax.interop.convert import hf_to_run_dir

        hf_to_run_dir(args.from_hf, args.run_dir, tensor=args.tensor)
        print(f"converted {args.from_hf} -> {args.run_dir} (step 0); fine-tune with "
              f"`lite-tp train {Path(args.run_dir) / 'config.yaml'} --run-dir {args.run_dir}`")
        return ExitCode.OK
    config_path = Path(args.run_dir) / "config.yaml"
    if config_path.exists():
        provide_cpu_devices(load_config(config_path).mesh.devices_needed())
    from lite_tp_jax.interop.convert import run_dir_to_hf

    run_dir_to_hf(args.run_dir, args.to_hf)
    print(f"converted {args.run_dir} -> {args.to_hf}")
    return ExitCode.OK


def _checkpoints(args) -> int:
    from lite_tp_jax.run.checkpoint_list import format_checkpoints, list_checkpoints

    rows = list_checkpoints(args.run_dir)
    print(json.dumps(rows, indent=1) if args.json else format_checkpoints(rows))
    return ExitCode.OK


def _plan(args) -> int:
    config = load_config(_config_argument(args), args.overrides)
    if args.devices is None and -1 in config.mesh.requested.values():
        raise BadInput("the config's mesh has an inferred axis (-1); give --devices N to fix its size")
    sizes = config.mesh.sizes(args.devices)
    # Deferred: fake CPU devices to lay the model out on, before jax starts; the planner loads the model.
    from lite_tp_jax.runtime.devices import provide_cpu_devices

    provide_cpu_devices(max(args.devices or 0, math.prod(sizes.values())))
    from lite_tp_jax.analysis import planner

    out = {"config": args.config, **planner.plan(config, sizes)}
    if args.check:
        out["compiled_collective_bytes_by_axis"] = planner.compiled_bytes_by_axis(config, sizes)
    if args.devices is not None:
        profile = PROFILES[args.device_profile]
        memory_gb = args.memory_gb if args.memory_gb is not None else profile.memory_bytes / 1e9
        out["ranking"] = planner.rank_meshes(config, args.devices, memory_gb, profile)
    if args.json:
        print(json.dumps(out, indent=1))
        return ExitCode.OK
    print(planner.format_plan(out))
    if args.check:
        print("compiled step:", ", ".join(f"{k} {planner.mib(v)}" for k, v in out["compiled_collective_bytes_by_axis"].items()))
    if args.devices is not None:
        print()
        print(planner.format_ranking(out["ranking"], PROFILES[args.device_profile], memory_gb))
    return ExitCode.OK


def _bench(args) -> int:
    config = load_config(_config_argument(args), args.overrides)
    # Deferred: fake CPU devices before jax starts; the benchmark loads the training stack.
    from lite_tp_jax.runtime.devices import provide_cpu_devices

    provide_cpu_devices(config.mesh.devices_needed())
    _check_kernel(config)
    from lite_tp_jax.analysis import bench

    result = bench.run(config, steps=args.steps, depths=args.depths, config_name=args.config)
    print(bench.to_json(result) if args.json else bench.format_result(result))
    if args.out:
        bench.write(result, args.out)
    return ExitCode.OK


def _tokenize(args) -> int:
    import signal

    from lite_tp_jax.run.tokenizer import load_tokenizer
    from lite_tp_jax.train.tokenize import Fields, tokenize

    def interrupt(signum, frame):  # SIGTERM as Ctrl-C: the partial output is removed on the way out
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        fields = Fields(args.field, args.prompt_field, args.completion_field)
        meta = tokenize(args.source, args.out, load_tokenizer(args.tokenizer), fields=fields, split=args.split,
                        show_progress=not args.no_progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    speed = f" ({meta['bytes'] / 1e6 / max(meta['seconds'], 1e-9):.1f} MB/s)" if meta["bytes"] else ""
    print(f"tokenized {meta['documents']} documents into {meta['tokens']} {meta['dtype']} tokens "
          f"(vocabulary {meta['vocab_size']}) in {meta['seconds']:.1f} s{speed}: {args.out}")
    return ExitCode.OK


COMMANDS = {"train": _train, "generate": _generate, "launch": _launch, "convert": _convert, "checkpoints": _checkpoints,
            "plan": _plan, "bench": _bench, "tokenize": _tokenize}


def _quiet_library_logs() -> None:
    """orbax and jax log through absl: their warnings and errors would appear on
    the terminal beside lite-tp's own one-line messages, which already say what
    happened (a damaged checkpoint set aside, a full disk). Only critical records pass."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_library_logs()
    try:
        return COMMANDS[args.command](args)
    except BadInput as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"lite-tp: error: {message}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception:  # a bug, or a failure at run time: the whole story
        traceback.print_exc()
        return ExitCode.FAILURE


if __name__ == "__main__":
    sys.exit(main())
