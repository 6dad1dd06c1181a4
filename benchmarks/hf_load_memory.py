"""Peak host memory of ``from_pretrained`` on a ~1B-parameter Llama checkpoint.

    python benchmarks/hf_load_memory.py [--dir /tmp/llama-1b] [--tensor 8] [--dtype bfloat16|float32] [--out FILE.md]

Step 1 (a child process, so its memory does not count): writes a random
Llama checkpoint in the Hugging Face layout (bfloat16 safetensors, one file
per layer plus ``model.safetensors.index.json``), unless ``--dir`` already
holds it. Step 2 (another child): loads it with ``from_pretrained`` onto a
mesh of ``--tensor`` fake CPU devices (they live in host memory, so their
shards are part of the process's RSS) and reports:

* the RSS before loading (after jax has started) and the peak RSS during it
  (``ru_maxrss``; file pages mapped while a tensor is read count too);
* the model's shards: the bytes of every device buffer of every parameter;
* the largest tensor of the checkpoint, in the loaded dtype;
* the goal: peak - baseline <= 1.5 x largest tensor + shards.

The host never holds the whole model outside the device buffers: each
device's callback reads its block of one tensor through a memory map.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIG = {  # ~1.0B parameters: Llama shape (TinyLlama-like, 18 layers)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "intermediate_size": 5632, "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 2048,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "dtype": "bfloat16",
}


def write_checkpoint(directory: Path) -> None:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    c = CONFIG
    h, f, v, d = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    rng = np.random.default_rng(0)

    def random(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    files: dict[str, dict] = {
        "model-embed.safetensors": {"model.embed_tokens.weight": random(v, h)},
        "model-head.safetensors": {"lm_head.weight": random(v, h), "model.norm.weight": random(h)},
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        files[f"model-layer{i:02d}.safetensors"] = {
            f"{p}.input_layernorm.weight": random(h), f"{p}.post_attention_layernorm.weight": random(h),
            f"{p}.self_attn.q_proj.weight": random(q, h), f"{p}.self_attn.k_proj.weight": random(kv, h),
            f"{p}.self_attn.v_proj.weight": random(kv, h), f"{p}.self_attn.o_proj.weight": random(h, q),
            f"{p}.mlp.gate_proj.weight": random(f, h), f"{p}.mlp.up_proj.weight": random(f, h),
            f"{p}.mlp.down_proj.weight": random(h, f),
        }
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for name, tensors in files.items():
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in tensors})
        total += sum(t.nbytes for t in tensors.values())
        tensors.clear()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (directory / "config.json").write_text(json.dumps(CONFIG))


def measure(directory: Path, tensor: int, dtype: str) -> dict:
    import math
    import resource

    import jax

    jax.config.update("jax_num_cpu_devices", tensor)  # fake CPU devices (no effect on accelerators)
    import jax.numpy as jnp

    from lite_tp_jax.interop.hf import from_pretrained
    from lite_tp_jax.interop.safetensors_files import Checkpoint
    from lite_tp_jax.core.mesh import make_mesh
    from lite_tp_jax.sharding.state import flat_variables

    devices = jax.devices() if jax.default_backend() != "cpu" else jax.devices("cpu")
    mesh = make_mesh(tensor=tensor, devices=devices[:tensor])
    jnp.zeros(()).block_until_ready()
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 (Linux: KiB)
    baseline = rss()
    checkpoint = Checkpoint(directory)
    itemsize = jnp.dtype(dtype).itemsize
    largest = max(math.prod(e.shape) for e in checkpoint.entries.values()) * itemsize
    params = sum(math.prod(e.shape) for e in checkpoint.entries.values())
    model = from_pretrained(directory, mesh=mesh, dtype=jnp.dtype(dtype))
    shards = sum(
        shard.data.nbytes for v in flat_variables(model).values() for shard in v.get_value().addressable_shards
    )
    peak = rss()
    return {
        "parameters": params, "tensor": tensor, "dtype": dtype, "baseline_rss": baseline, "peak_rss": peak,
        "shards": shards, "largest_tensor": largest, "goal": 1.5 * largest + shards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/lite_tp_llama_1b")
    parser.add_argument("--tensor", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--out", help="also write the report (markdown) here")
    parser.add_argument("--_step", choices=("write", "measure"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = Path(args.dir)
    if args._step == "write":
        write_checkpoint(directory)
        return
    if args._step == "measure":
        print(json.dumps(measure(directory, args.tensor, args.dtype)))
        return

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    if not (directory / "config.json").exists():
        print(f"writing a random ~1B Llama checkpoint to {directory} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--dir", str(directory), "--_step", "write"], check=True, env=env)
    out = subprocess.run(
        [sys.executable, __file__, "--dir", str(directory), "--tensor", str(args.tensor), "--dtype", args.dtype, "--_step", "measure"],
        check=True, env=env, capture_output=True, text=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    used = r["peak_rss"] - r["baseline_rss"]
    report = "\n".join([
        f"# from_pretrained host memory: {r['parameters'] / 1e9:.2f}B-parameter Llama, TP {r['tensor']}, loaded as {r['dtype']}",
        "",
        "| quantity | value |", "|---|---|",
        f"| RSS before loading (jax started) | {gib(r['baseline_rss'])} |",
        f"| peak RSS | {gib(r['peak_rss'])} |",
        f"| peak - baseline | {gib(used)} |",
        f"| model's shards (all device buffers) | {gib(r['shards'])} |",
        f"| largest tensor | {gib(r['largest_tensor'])} |",
        f"| goal: 1.5 x largest + shards | {gib(r['goal'])} |",
        f"| (peak - baseline) / goal | {used / r['goal']:.3f} |",
        "",
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
