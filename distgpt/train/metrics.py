"""Where training metrics go: a JSONL file, TensorBoard, and a progress bar — and the peak FLOP/s behind MFU."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the Ray driver writes metrics without loading it
    import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), in FLOP/s; longest names first so that
# "H100 PCIe" is not read as "H100". The planner's hardware catalog holds the fuller table.
_GPU_PEAKS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("L4", 121e12), ("A10G", 70e12), ("V100", 125e12), ("T4", 65e12), ("4090", 165e12), ("3090", 71e12),
)


def measure_matmul_flops(n: int = 512, seconds: float = 0.2) -> float:
    """FLOP/s of square fp32 matmuls on this CPU: the reference 'peak' for MFU where no datasheet applies."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up (thread pool, caches)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0)


def peak_flops(device: torch.device, configured_tflops: float) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "configured"
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        for key, flops in _GPU_PEAKS:
            if key in name:
                return flops, f"datasheet:{key}"
        return 0.0, f"unknown GPU {name!r} (set train.peak_tflops)"
    return measure_matmul_flops(), "measured fp32 matmul"


class MetricsSink:
    """Writes metric records to ``metrics.jsonl`` (always) and TensorBoard (optionally) under ``out_dir``."""

    def __init__(self, out_dir: str, tensorboard: bool):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self._tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, record: dict[str, Any]) -> None:
        """One record: a dict with 'step' and numeric (or None) metrics, plus optional 'kind' and 'time' (when it
        happened, on the rank that made it; default: now)."""
        self._file.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_records(out_dir: str) -> list[dict[str, Any]]:
    """The records a run wrote to ``out_dir/metrics.jsonl`` (``MetricsSink``), in order."""
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank so far: allocated device memory on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # POSIX; ru_maxrss is in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar; on a non-terminal it refreshes rarely so CI logs stay short."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, unit="step", desc="train")
