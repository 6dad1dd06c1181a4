"""What the benchmark reports say about the machine they ran on."""

import os
import platform

import jax


def machine() -> str:
    """CPU model and cores, and the jax devices (fake when the backend is cpu)."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    kind = jax.default_backend()
    fake = " fake" if kind == "cpu" else ""
    device_kind = jax.devices()[0].device_kind
    named = "" if device_kind == kind else f" ({device_kind})"
    return f"{cpu}, {os.cpu_count()} cores; {len(jax.devices())}{fake} {kind} devices{named}"


def write_report(lines: list[str], path: str) -> None:
    """Writes the markdown report to ``path`` atomically (a temporary file, then a rename)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
