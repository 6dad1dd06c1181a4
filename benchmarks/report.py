"""What the benchmark reports say about the machine they ran on, and writing them."""

import os

from lite_tp_jax.analysis.bench import machine

__all__ = ["machine", "write_report"]


def write_report(lines: list[str], path: str) -> None:
    """Writes the markdown report to ``path`` atomically (a temporary file, then a rename)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
