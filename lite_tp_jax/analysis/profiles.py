"""Device profiles for the planner's roofline: peak matmul rate for this
project's float32 parameters, memory, and link bandwidth per device within a
node ("tensor") and across nodes ("data", "pipeline", "expert").

Sources (vendor datasheets, dense math, no sparsity):
- H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet (2023): TF32 494.7 TFLOPS
  dense (989 with sparsity), 80 GB HBM3, NVLink 900 GB/s bidirectional (450 GB/s
  each way); across nodes one 400 Gb/s ConnectX-7 NIC per GPU (DGX H100) = 50 GB/s.
- H200 SXM: NVIDIA H200 datasheet (2024): same compute and NVLink as H100 SXM,
  141 GB HBM3e; one 400 Gb/s NIC per GPU (DGX H200).
- A100 SXM4 80GB: NVIDIA A100 datasheet (2021): TF32 156 TFLOPS dense, NVLink
  600 GB/s bidirectional (300 each way); 200 Gb/s HDR InfiniBand per GPU (DGX A100) = 25 GB/s.
- TPU v5e: Google Cloud TPU v5e documentation (cloud.google.com/tpu/docs/v5e):
  197 TFLOPS bf16 (float32 matmuls run as multi-pass bf16: taken as 1/3), 16 GB
  HBM, ICI 1600 Gbps per chip = 200 GB/s within a slice; across slices (DCN)
  taken as 25 GB/s per chip (a 200 Gb/s host NIC shared by 4 chips = 6.25 GB/s
  is the pessimistic end).
- Nodes: 8 GPUs per DGX/HGX node; a TPU v5e slice of up to 256 chips shares ICI.
- bfloat16 peaks (``peak_bf16_flops``, for MFU of ``compute_dtype: bfloat16``):
  H100/H200 SXM 989 TFLOPS dense, A100 312, TPU v5e 197 (same datasheets);
  the CPU profile's is its float32 one.
- cpu: a nominal 2-core host (about 100 GFLOPS float32 with AVX2 FMA), 16 GB,
  memory-bandwidth "links" of 10 GB/s; only for trying the planner out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    peak_flops: float              # float32 (TF32 on NVIDIA) dense matmul FLOP/s
    memory_bytes: float
    intra_node_bytes_per_s: float  # per device, one direction
    inter_node_bytes_per_s: float  # per device, one direction
    devices_per_node: int          # a "tensor" group larger than this crosses nodes
    peak_bf16_flops: float = 0.0   # bfloat16 dense matmul FLOP/s (0: as peak_flops)
    device_kinds: tuple[str, ...] = ()  # substrings of jax's device_kind that name this device

    def peak_for(self, compute_dtype: str) -> float:
        """Peak FLOP/s per device for matmuls in ``compute_dtype`` (``model.compute_dtype``)."""
        return self.peak_bf16_flops or self.peak_flops if compute_dtype == "bfloat16" else self.peak_flops


GB = 1e9
PROFILES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("h100", 494.7e12, 80 * GB, 450 * GB, 50 * GB, 8, 989.4e12, ("H100",)),
    "h200": DeviceProfile("h200", 494.7e12, 141 * GB, 450 * GB, 50 * GB, 8, 989.4e12, ("H200",)),
    "a100": DeviceProfile("a100", 156e12, 80 * GB, 300 * GB, 25 * GB, 8, 312e12, ("A100",)),
    "tpu-v5e": DeviceProfile("tpu-v5e", 197e12 / 3, 16 * GB, 200 * GB, 25 * GB, 256, 197e12,  # one ICI slice
                             ("TPU v5 lite", "TPU v5e")),
    "cpu": DeviceProfile("cpu", 100e9, 16 * GB, 10 * GB, 10 * GB, 8, 0.0, ("cpu",)),
}


def profile_for_device(device_kind: str) -> DeviceProfile | None:
    """The profile whose ``device_kinds`` name ``device_kind`` (jax's, e.g.
    ``"NVIDIA H100 80GB HBM3"``), or None."""
    kind = device_kind.lower()
    return next((p for p in PROFILES.values() if any(k.lower() in kind for k in p.device_kinds)), None)
