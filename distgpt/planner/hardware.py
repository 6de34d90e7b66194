"""Device catalog: dense peak FLOP/s, memory, bandwidths — from the vendors' datasheets. No torch import.

Figures are dense (no 2:4 sparsity). bf16 for cards without bf16 (V100, T4) holds their fp16 tensor-core peak,
which is what mixed precision uses there. Sources:
  H200 SXM      — NVIDIA H200 Tensor Core GPU datasheet (2024): 989 TF bf16, 67 TF fp32, 141 GB, 4.8 TB/s, NVLink
                  900 GB/s
  H100 SXM/PCIe — NVIDIA H100 Tensor Core GPU datasheet (2023): SXM 989 TF bf16, 67 TF fp32, 80 GB, 3.35 TB/s, NVLink
                  900 GB/s; PCIe 756 TF bf16, 51 TF fp32, 80 GB, 2.0 TB/s, PCIe Gen5 128 GB/s
  A100 80/40 GB — NVIDIA A100 datasheet (2021): 312 TF bf16, 19.5 TF fp32, 2.04 / 1.56 TB/s, NVLink 600 GB/s
  L40S          — NVIDIA L40S datasheet (2023): 362 TF bf16, 91.6 TF fp32, 48 GB, 864 GB/s, PCIe Gen4 64 GB/s
  L4            — NVIDIA L4 datasheet (2023): 121 TF bf16, 30.3 TF fp32, 24 GB, 300 GB/s, PCIe Gen4 64 GB/s
  A10G          — not published by NVIDIA; AWS EC2 G5 documentation and the A10 datasheet (GA102, 24 GB, 600 GB/s):
                  ~70 TF bf16 dense, 31.2 TF fp32
  V100 SXM2     — NVIDIA V100 datasheet (2020): 125 TF fp16 tensor, 15.7 TF fp32, 32 GB (V100-16GB: 16 GB), 900 GB/s,
                  NVLink 300 GB/s
  T4            — NVIDIA T4 datasheet (2019): 65 TF fp16 tensor, 8.1 TF fp32, 16 GB, 320 GB/s, PCIe Gen3 32 GB/s
  RTX 4090      — NVIDIA Ada Lovelace architecture whitepaper (2022): 165.2 TF bf16 (fp32 accumulate), 82.6 TF fp32,
                  24 GB, 1008 GB/s, PCIe Gen4 64 GB/s, no NVLink
  RTX 3090      — NVIDIA Ampere GA102 whitepaper (2020): 71 TF bf16 (fp32 accumulate), 35.6 TF fp32, 24 GB, 936 GB/s,
                  NVLink bridge 112.5 GB/s
  cpu           — one core (a worker slot on CPU clusters): nominal figures only, meant to be replaced by a measured
                  profile (``distgpt bench hardware``).
"""

from __future__ import annotations

from dataclasses import dataclass

TB = 1e12
GB = 1e9


@dataclass(frozen=True)
class DeviceType:
    """One kind of accelerator (or a CPU core)."""

    name: str
    bf16_flops: float
    fp32_flops: float
    memory_bytes: float
    mem_bw: float
    """Device memory bandwidth, bytes/s."""
    intra_node_bw: float
    """Bandwidth to a peer in the same node (NVLink, else PCIe), bytes/s per direction."""
    efficiency: float = 0.45
    """Fraction of peak a transformer layer reaches (replaced by calibration where measured)."""
    flash_attention: bool = True
    """Attention kernels that do not store the T×T score matrix (FlashAttention via SDPA)."""
    runtime_overhead_bytes: float = 1.5 * GB
    """CUDA context, NCCL buffers, allocator slack not counted elsewhere."""
    nvlink: bool = False
    """Peers in a node talk over NVLink (NCCL's per-step latency is lower than over PCIe)."""

    def peak(self, dtype: str) -> float:
        """Peak dense FLOP/s in ``dtype`` ('bf16' or 'fp32')."""
        return self.bf16_flops if dtype == "bf16" else self.fp32_flops


def _gpu(name, bf16, fp32, mem_gb, bw_tbs, link_gbs, eff=0.45, flash=True, nvlink=False) -> DeviceType:
    return DeviceType(name, bf16 * TB, fp32 * TB, mem_gb * GB, bw_tbs * TB, link_gbs * GB, eff, flash, nvlink=nvlink)


CATALOG: dict[str, DeviceType] = {d.name: d for d in (
    _gpu("H200", 989, 67, 141, 4.8, 900, nvlink=True),
    _gpu("H100-SXM", 989, 67, 80, 3.35, 900, nvlink=True),
    _gpu("H100-PCIe", 756, 51, 80, 2.0, 128),
    _gpu("A100-80GB", 312, 19.5, 80, 2.04, 600, nvlink=True),
    _gpu("A100-40GB", 312, 19.5, 40, 1.56, 600, nvlink=True),
    _gpu("L40S", 362, 91.6, 48, 0.864, 64),
    _gpu("L4", 121, 30.3, 24, 0.3, 64),
    _gpu("A10G", 70, 31.2, 24, 0.6, 64),
    _gpu("V100", 125, 15.7, 32, 0.9, 300, eff=0.40, flash=False, nvlink=True),
    _gpu("V100-16GB", 125, 15.7, 16, 0.9, 300, eff=0.40, flash=False, nvlink=True),
    _gpu("T4", 65, 8.1, 16, 0.32, 32, eff=0.35, flash=False),
    _gpu("RTX4090", 165.2, 82.6, 24, 1.008, 64),
    _gpu("RTX3090", 71, 35.6, 24, 0.936, 112.5, nvlink=True),
    # SDPA trains with its flash kernel on CPU too (measured: no T×T tensor kept for backward)
    DeviceType("cpu", 50e9, 50e9, 8 * GB, 10 * GB, 5 * GB, efficiency=0.5, flash_attention=True,
               runtime_overhead_bytes=0.4 * GB),
)}

# Names people (and Ray's accelerator_type) use for the same parts.
ALIASES = {
    "H100": "H100-SXM", "H100-80GB": "H100-SXM", "H100-SXM5": "H100-SXM", "A100": "A100-80GB",
    "A100-SXM4-80GB": "A100-80GB", "A100-SXM4-40GB": "A100-40GB", "A100-40G": "A100-40GB", "A100-80G": "A100-80GB",
    "V100-SXM2": "V100", "TESLA-V100": "V100", "V100-SXM2-16GB": "V100-16GB",
    "TESLA-T4": "T4", "NVIDIA-L4": "L4", "RTX-4090": "RTX4090",
    "RTX-3090": "RTX3090", "CPU": "cpu",
}


def device_type(name: str) -> DeviceType:
    """Look up a device by name or alias (case-insensitive); a clear error lists the known ones."""
    key = name.strip()
    for cand in (key, key.upper(), ALIASES.get(key.upper(), ""), ALIASES.get(key, "")):
        if cand in CATALOG:
            return CATALOG[cand]
    for real in CATALOG:
        if real.lower() == key.lower():
            return CATALOG[real]
    raise KeyError(f"unknown device type {name!r}; known: {', '.join(CATALOG)}")


def cuda_device_type(name: str, total_memory: float = 0.0) -> str:
    """The catalog name of a GPU as CUDA reports it (``torch.cuda.get_device_properties(d).name``, its memory in
    bytes); KeyError naming the GPU when the catalog has no entry for it."""
    n = name.upper().replace("NVIDIA", "").replace("GEFORCE", "").replace("TESLA", "").strip()
    rules = (("H200", "H200"), ("H100", "H100-PCIe" if "PCIE" in n or "NVL" in n else "H100-SXM"),
             ("A100", "A100-80GB" if total_memory > 60e9 or "80G" in n else "A100-40GB"), ("L40S", "L40S"),
             ("A10G", "A10G"), ("V100", "V100-16GB" if 0 < total_memory < 20e9 or "16G" in n else "V100"),
             ("4090", "RTX4090"), ("3090", "RTX3090"))
    for token, catalog in rules:
        if token in n:
            return catalog
    for token, catalog in (("L4", "L4"), ("T4", "T4"), ("A10", "A10G")):  # short names last: 'L4' is in 'L40S'
        if n == token or n.startswith(token + " ") or n.startswith(token + "-"):
            return catalog
    raise KeyError(f"GPU {name!r} is not in distgpt's device catalog (planner/hardware.py); add it there with its "
                   f"datasheet figures, then run `distgpt bench hardware` again")
