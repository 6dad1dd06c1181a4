"""The shape of a Llama-style decoder LM and how it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Remat = Literal["none", "full", "selective"]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # default: hidden_size // num_heads
    ffn_hidden_size: int = 172
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sequence_parallel: bool = False
    remat: Remat = "none"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads
