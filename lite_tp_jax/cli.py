"""``lite-tp``: the command line.

    lite-tp train CONFIG [--set KEY=VALUE]... [--run-dir DIR]
    lite-tp generate --run-dir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]

Exit codes: 0 success; 2 bad input (config, mesh, data, checkpoint, a run
directory in use or not writable), one line on stderr and no traceback; 1 a
failure at run time (a non-finite loss with ``train.on_nonfinite=stop``: one
line); 143 preempted by SIGTERM after saving a checkpoint (rerun to continue).
"""

from __future__ import annotations

import argparse
import math
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

    generate = commands.add_parser("generate", help="sample text from a run's latest checkpoint")
    generate.add_argument("--run-dir", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--seed", type=int, default=0)
    return parser


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from lite_tp_jax.train.checkpoint import CheckpointError
    from lite_tp_jax.train.config import ConfigError
    from lite_tp_jax.train.data import DataError
    from lite_tp_jax.train.run_lock import RunLockError

    return (ConfigError, DataError, CheckpointError, RunLockError, ValueError, FileNotFoundError)


def _devices_needed(mesh_config) -> int:
    return math.prod(size for size in (mesh_config.data, mesh_config.pipeline, mesh_config.expert, mesh_config.tensor) if size > 0)


def _train(args) -> int:
    from lite_tp_jax.mesh import provide_cpu_devices
    from lite_tp_jax.train.config import load_config
    from lite_tp_jax.train.preflight import check_fake_device_count

    config = load_config(args.config, args.overrides)
    check_fake_device_count(_devices_needed(config.mesh))  # before jax allocates them
    provide_cpu_devices(_devices_needed(config.mesh))  # fake CPU devices when there is no accelerator

    from lite_tp_jax.train.checkpoint import NonFiniteError
    from lite_tp_jax.train.loop import Trainer
    from lite_tp_jax.train.preemption import PREEMPTED_EXIT_CODE

    trainer = Trainer(config, args.run_dir)
    try:
        records = trainer.run(show_progress=not args.no_progress)
    except NonFiniteError as error:  # train.on_nonfinite=stop: one line, the last checkpoint kept
        print(f"lite-tp: error: {error}", file=sys.stderr)
        return RUNTIME_FAILURE
    except Exception:
        traceback.print_exc()
        return RUNTIME_FAILURE
    if trainer.preempted_at is not None:
        print(f"lite-tp: preempted (SIGTERM): checkpoint {trainer.preempted_at} saved in {args.run_dir}; "
              f"rerun the same command to continue", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
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
    from pathlib import Path

    from lite_tp_jax.mesh import provide_cpu_devices
    from lite_tp_jax.train.config import load_config

    config_path = Path(args.run_dir) / "config.yaml"
    if config_path.exists():
        provide_cpu_devices(_devices_needed(load_config(config_path).mesh))

    from lite_tp_jax.train.generate import generate, load_trained_model

    model, window = load_trained_model(args.run_dir)
    text = generate(model, window, args.prompt, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, seed=args.seed)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": _train, "generate": _generate}[args.command](args)
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
