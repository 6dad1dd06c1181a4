"""``lite-tp``: the command line.

    lite-tp train CONFIG [--set KEY=VALUE]... [--run-dir DIR]
    lite-tp generate --run-dir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
    lite-tp convert --from-hf PATH --run-dir DIR [--tensor N]   (Hugging Face -> run dir, step 0)
    lite-tp convert --to-hf PATH --run-dir DIR                  (run dir's latest checkpoint -> Hugging Face)

Exit codes: 0 success; 2 bad input (config, mesh, data, checkpoint), one line
on stderr and no traceback; 1 a failure at run time; 3 a device failed and no
spare could take its place (``fault/spare.py``): one line saying why, and the
job should be restarted from the last checkpoint.
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

    convert = commands.add_parser("convert", help="Hugging Face model directory <-> run directory")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="PATH", help="read this Hugging Face model into --run-dir (step 0)")
    direction.add_argument("--to-hf", metavar="PATH", help="write --run-dir's latest checkpoint here")
    convert.add_argument("--run-dir", required=True)
    convert.add_argument("--tensor", type=int, default=1, help="TP degree to load over while converting (any mesh trains from the result)")
    return parser


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from lite_tp_jax.train.checkpoint import CheckpointError
    from lite_tp_jax.train.config import ConfigError
    from lite_tp_jax.train.data import DataError

    return (ConfigError, DataError, CheckpointError, ValueError, FileNotFoundError)


def _devices_needed(mesh_config) -> int:
    sizes = (mesh_config.data, mesh_config.pipeline, mesh_config.expert, mesh_config.tensor)
    return math.prod(size for size in sizes if size > 0) + mesh_config.spares


def _train(args) -> int:
    from lite_tp_jax.mesh import provide_cpu_devices
    from lite_tp_jax.train.config import load_config

    config = load_config(args.config, args.overrides)
    provide_cpu_devices(_devices_needed(config.mesh))  # fake CPU devices when there is no accelerator

    from lite_tp_jax.fault.spare import DEVICE_LOST_EXIT, DeviceLost
    from lite_tp_jax.train.loop import Trainer

    trainer = Trainer(config, args.run_dir)
    try:
        records = trainer.run(show_progress=not args.no_progress)
    except DeviceLost as lost:
        print(f"lite-tp: {lost}", file=sys.stderr)
        return DEVICE_LOST_EXIT
    except Exception:
        traceback.print_exc()
        return RUNTIME_FAILURE
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": _train, "generate": _generate, "convert": _convert}[args.command](args)
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
