"""Time of one collective as the communication library runs it: a bandwidth term plus a latency term.

Bandwidth: the data that crosses the slowest link the collective spans (2(n−1)/n of it for an all-reduce, (n−1)/n for
an all-gather or reduce-scatter) over that link's bandwidth — NVLink / PCIe inside a node, the node's NICs across
nodes (NCCL runs one ring per NIC, so a node's rings together move data at its whole NIC bandwidth).

Latency, on an uncalibrated GPU: NCCL's own tuner model (``src/graph/tuning.cc`` in NVIDIA/nccl, default tuner
constants, Simple protocol — the one NCCL picks for the megabyte messages of training): a base latency per call
(8.4 µs), then per ring step 3.4 µs over NVLink, 5.7 µs over PCIe and 14 µs across nodes — an all-reduce ring over n
ranks on N nodes takes 2(n−1) steps of which 2(N−1) cross nodes. An all-reduce may instead run NCCL's tree
(2·((n/N − 1)·4 µs + ⌊log2 N⌋·14 µs), at 92% of the ring's bandwidth); NCCL takes whichever is faster, and so does
this model. At scale the difference is large: a 25 MiB bucket over 48 GPUs on 6 nodes costs ~0.4 ms of ring latency,
~0.12 ms as a tree, where one flat 20 µs per hop (this model before) charged 1.9 ms — which made data parallelism
across nodes look several times dearer than Megatron-LM measures it (``planner/data/published_runs.csv``).

Measured (a profile from ``distgpt bench hardware``, a least-squares fit of a ring on one node): the measured per-hop
latency on every step inside a node, no base; across nodes NCCL's figures on GPUs, the measured one on CPU workers
(gloo over TCP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distgpt.planner.hardware import DeviceType

NCCL_BASE_S = 8.4e-6
NCCL_RING_HOP_S = {"nvlink": 3.4e-6, "pcie": 5.7e-6, "net": 14.0e-6}
NCCL_TREE_HOP_S = {"nvlink": 4.0e-6, "pcie": 4.0e-6, "net": 14.0e-6}
NCCL_TREE_BW = 0.92
GLOO_HOP_S = 20e-6  # a CPU slot with no measured profile: a nominal per-hop latency (a profile replaces it)


@dataclass(frozen=True)
class Hops:
    """Latency of a collective library on one device type, in seconds."""

    base: float
    """Per call."""
    intra: float
    """Per ring step between ranks of one node."""
    inter: float
    """Per ring step that crosses nodes."""
    tree_intra: float = 0.0
    tree_inter: float = 0.0
    """Per step of a tree all-reduce inside a node / across nodes; 0: the library has no tree."""


def library_hops(device: DeviceType, measured: float = 0.0) -> Hops:
    """The latency model for ``device``: a measured per-hop latency where a profile has one, else NCCL's (GPUs) or
    a nominal gloo figure (CPU slots)."""
    if device.name == "cpu":
        hop = measured or GLOO_HOP_S
        return Hops(0.0, hop, hop)
    link = "nvlink" if device.nvlink else "pcie"
    nccl = Hops(NCCL_BASE_S, NCCL_RING_HOP_S[link], NCCL_RING_HOP_S["net"], NCCL_TREE_HOP_S[link],
                NCCL_TREE_HOP_S["net"])
    # a GPU profile is measured on one node: it knows the steps inside a node, not those across nodes
    return Hops(0.0, measured, nccl.inter, measured, nccl.tree_inter) if measured > 0 else nccl


def allreduce(nbytes: float, n: int, nodes: int, bw: float, hops: Hops) -> float:
    """All-reduce of ``nbytes`` over ``n`` ranks on ``nodes`` nodes: ring, or tree where it is faster."""
    if n <= 1:
        return 0.0
    nodes = max(1, min(nodes, n))
    data = 2 * (n - 1) / n * nbytes / bw
    cross = 2 * (nodes - 1)
    ring = hops.base + (2 * (n - 1) - cross) * hops.intra + cross * hops.inter + data
    if not hops.tree_inter:
        return ring
    per_node = math.ceil(n / nodes)
    # NCCL's tree: up and down the ranks of a node, then ⌊log2 N⌋ network steps each way
    tree = hops.base + 2 * ((per_node - 1) * hops.tree_intra + int(math.log2(nodes)) * hops.tree_inter)
    return min(ring, tree + data / NCCL_TREE_BW)


def allgather(nbytes: float, n: int, nodes: int, bw: float, hops: Hops) -> float:
    """All-gather (or reduce-scatter) whose full result is ``nbytes``, over ``n`` ranks on ``nodes`` nodes (ring)."""
    if n <= 1:
        return 0.0
    nodes = max(1, min(nodes, n))
    return hops.base + (n - nodes) * hops.intra + (nodes - 1) * hops.inter + (n - 1) / n * nbytes / bw


def send(nbytes: float, bw: float, hops: Hops, across_nodes: bool) -> float:
    """One point-to-point message (a pipeline stage boundary)."""
    return hops.base + (hops.inter if across_nodes else hops.intra) + nbytes / bw


def nodes_spanned(ranks: int, per_node: int) -> int:
    """Nodes a group of ``ranks`` spans when ``per_node`` of its ranks share a node (at least one)."""
    return math.ceil(ranks / max(1, per_node))
