"""lite_tp_jax: tensor parallelism for JAX/Flax NNX on a
("data", "pipeline", "expert", "tensor") device mesh."""

from lite_tp_jax.layers import (
    ColumnParallelLinear,
    MoEMLP,
    ParallelAttention,
    ParallelMLP,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from lite_tp_jax.interop.hf import from_pretrained, save_pretrained
from lite_tp_jax.layers.norm import LayerNorm
from lite_tp_jax.mesh import AXES, DATA, EXPERT, PIPELINE, TENSOR, make_mesh, provide_cpu_devices
from lite_tp_jax.state import export_state, import_state

__all__ = [
    "AXES", "DATA", "EXPERT", "PIPELINE", "TENSOR",
    "make_mesh", "provide_cpu_devices",
    "export_state", "import_state", "from_pretrained", "save_pretrained",
    "ColumnParallelLinear", "RowParallelLinear", "ParallelMLP", "ParallelAttention",
    "VocabParallelEmbedding", "vocab_parallel_cross_entropy", "RMSNorm", "LayerNorm", "MoEMLP",
]
