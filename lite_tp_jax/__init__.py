"""lite_tp_jax: tensor parallelism for JAX/Flax NNX on one named device mesh.

``import lite_tp_jax`` loads nothing heavy: each public name is imported from
its module when first used (PEP 562), so ``lite_tp_jax.AXES`` needs no jax and
``lite_tp_jax.ParallelMLP`` loads the layers, not the training stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC: dict[str, str] = {
    "AXES": "lite_tp_jax.core.axes",
    "DATA": "lite_tp_jax.core.axes",
    "PIPELINE": "lite_tp_jax.core.axes",
    "EXPERT": "lite_tp_jax.core.axes",
    "FSDP": "lite_tp_jax.core.axes",
    "CONTEXT": "lite_tp_jax.core.axes",
    "TENSOR": "lite_tp_jax.core.axes",
    "BadInput": "lite_tp_jax.core.errors",
    "make_mesh": "lite_tp_jax.core.mesh",
    "provide_cpu_devices": "lite_tp_jax.runtime.devices",
    "export_state": "lite_tp_jax.sharding.state",
    "import_state": "lite_tp_jax.sharding.state",
    "ColumnParallelLinear": "lite_tp_jax.layers.linear",
    "RowParallelLinear": "lite_tp_jax.layers.linear",
    "ParallelMLP": "lite_tp_jax.layers.mlp",
    "ParallelAttention": "lite_tp_jax.layers.attention",
    "VocabParallelEmbedding": "lite_tp_jax.layers.embedding",
    "vocab_parallel_cross_entropy": "lite_tp_jax.layers.cross_entropy",
    "RMSNorm": "lite_tp_jax.layers.norm",
    "LayerNorm": "lite_tp_jax.layers.norm",
    "MoEMLP": "lite_tp_jax.layers.moe",
    "LearnedPositions": "lite_tp_jax.layers.positions",
    "region": "lite_tp_jax.parallel.region",
    "enter_region": "lite_tp_jax.parallel.region",
    "batch_sum": "lite_tp_jax.parallel.region",
    "batch_mean": "lite_tp_jax.parallel.region",
    "STATISTIC": "lite_tp_jax.parallel.region",
    "ROWS": "lite_tp_jax.parallel.region",
    "features": "lite_tp_jax.parallel.region",
    "PartitionRules": "lite_tp_jax.sharding.rules",
    "stack_blocks": "lite_tp_jax.models.stack",
    "scan_blocks": "lite_tp_jax.models.stack",
    "create_optimizer": "lite_tp_jax.run.optimizer",
    "TrainStep": "lite_tp_jax.train.step",
    "plan": "lite_tp_jax.analysis.model_plan",
    "ModelConfig": "lite_tp_jax.models.config",
    "Transformer": "lite_tp_jax.models.transformer",
    "from_pretrained": "lite_tp_jax.interop.hf",
    "save_pretrained": "lite_tp_jax.interop.hf",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lite_tp_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from lite_tp_jax.core.axes import AXES, CONTEXT, DATA, EXPERT, FSDP, PIPELINE, TENSOR
    from lite_tp_jax.core.errors import BadInput
    from lite_tp_jax.core.mesh import make_mesh
    from lite_tp_jax.interop.hf import from_pretrained, save_pretrained
    from lite_tp_jax.layers.attention import ParallelAttention
    from lite_tp_jax.layers.cross_entropy import vocab_parallel_cross_entropy
    from lite_tp_jax.layers.embedding import VocabParallelEmbedding
    from lite_tp_jax.layers.linear import ColumnParallelLinear, RowParallelLinear
    from lite_tp_jax.layers.mlp import ParallelMLP
    from lite_tp_jax.layers.moe import MoEMLP
    from lite_tp_jax.analysis.model_plan import plan
    from lite_tp_jax.layers.positions import LearnedPositions
    from lite_tp_jax.models.stack import scan_blocks, stack_blocks
    from lite_tp_jax.parallel.region import ROWS, STATISTIC, batch_mean, batch_sum, enter_region, features, region
    from lite_tp_jax.run.optimizer import create_optimizer
    from lite_tp_jax.sharding.rules import PartitionRules
    from lite_tp_jax.train.step import TrainStep
    from lite_tp_jax.layers.norm import LayerNorm, RMSNorm
    from lite_tp_jax.models.config import ModelConfig
    from lite_tp_jax.models.transformer import Transformer
    from lite_tp_jax.runtime.devices import provide_cpu_devices
    from lite_tp_jax.sharding.state import export_state, import_state
