"""Score one candidate layout with the cost model: step time, tokens/s, memory per device type, cost.

A layout is a set of replica kinds; each kind is a tuple of node groups (one per pipeline stage) and a replica count.
Same-type replicas ("replicas" family) or mixed-type pipelines ("hetero-pipeline" family) both fit this shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from distgpt.model.presets import flops_per_token
from distgpt.planner import cost
from distgpt.planner.collectives import nodes_spanned
from distgpt.planner.cost import DeviceModel, Workload
from distgpt.planner.inventory import Inventory, NodeGroup
from distgpt.planner.plan import Plan


@dataclass(frozen=True)
class Layout:
    """Degrees and which devices serve which stage; ``kinds``: ((stage groups...), replica count)."""

    tp: int
    pp: int
    stage_layers: tuple[int, ...]
    kinds: tuple[tuple[tuple[NodeGroup, ...], int], ...]
    family: str


@dataclass
class Candidate:
    """A scored Plan."""

    plan: Plan
    step_time: float
    tokens_per_s: float
    mfu: float
    memory: dict[str, float]
    """Peak bytes per device, by device type."""
    capacity: dict[str, float]
    price_per_hour: float
    cost_per_mtok: float
    breakdown: dict[str, float] = field(default_factory=dict)
    devices_used: dict[str, int] = field(default_factory=dict)
    layout: Layout | None = None

    @property
    def bottleneck(self) -> str:
        """The largest time term."""
        return max(self.breakdown, key=self.breakdown.get) if self.breakdown else "compute"


class Evaluator:
    """Evaluates layouts × options for one workload, inventory and (optional) device profiles."""

    def __init__(self, w: Workload, inv: Inventory, devices: dict[str, DeviceModel]):
        self.w, self.inv, self.devices = w, inv, devices
        self._models: dict[str, DeviceModel] = {}  # one per device type: built ~70k times per search otherwise

    def dev(self, g: NodeGroup) -> DeviceModel:
        name = g.device.name
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = self.devices.get(name) or DeviceModel(g.device)
        return model

    def stage_time(self, lay: Layout, stages: tuple[NodeGroup, ...], j: int, m: int, rc: bool,
                   keys: tuple[str, ...] = ()) -> float:
        """One micro-batch through stage j: its layers, the head on the last stage, sends to the next stage, and
        the measured software cost of the parallel mechanisms in ``keys``."""
        d, g = self.dev(stages[j]), stages[j]
        # a tensor-parallel group larger than a node talks over the network (the search never makes one; a user's
        # Plan or a measured table may)
        across = lay.tp > g.count
        per_layer = cost.layer_time(self.w, d, m, lay.tp, rc, tp_bw=g.network_bw if across else 0.0,
                                    tp_nodes=nodes_spanned(lay.tp, g.count)) + d.engine_cost(list(keys))[0]
        t = lay.stage_layers[j] * per_layer
        if j == lay.pp - 1:
            t += cost.head_time(self.w, d, m, lay.tp)
        if lay.pp > 1:
            span = lay.tp * lay.pp
            t += cost.p2p_time(self.w, m, self.link(stages, span), d.hops, self.crosses(stages, span))
        return t

    @staticmethod
    def crosses(groups: tuple[NodeGroup, ...], span: int) -> bool:
        """Whether ranks spread over ``groups`` needing ``span`` devices of each talk across nodes."""
        return not (len({g.name for g in groups}) == 1 and span <= groups[0].count)

    def link(self, groups: tuple[NodeGroup, ...], span: int) -> float:
        """Slowest link among ranks spread over ``groups`` needing ``span`` devices of each."""
        if not self.crosses(groups, span):
            return self.dev(groups[0]).link_bw
        if len({g.site for g in groups}) > 1:
            return self.inv.inter_site_bw
        return min(g.network_bw for g in groups)

    def shares(self, times: list[float], counts: list[int], units: int, min_units: int) -> list[list[int]] | None:
        """Micro-batch units per replica, proportional to speed (each ≥ min_units); None if they cannot fit."""
        total = sum(counts)
        if units < total * min_units:
            return None
        speed = [1 / t for t in times]
        norm = sum(s * c for s, c in zip(speed, counts, strict=True))
        per = [[max(min_units, int(units * s / norm))] * c for s, c in zip(speed, counts, strict=True)]
        left = units - sum(map(sum, per))
        order = sorted(range(len(per)), key=lambda k: -speed[k])
        while left != 0:  # hand out (or take back) leftovers, fastest kinds first
            moved = False
            for k in order:
                for r in range(len(per[k])):
                    if left > 0:
                        per[k][r] += 1
                        left -= 1
                        moved = True
                    elif left < 0 and per[k][r] > min_units:
                        per[k][r] -= 1
                        left += 1
                        moved = True
                    if left == 0:
                        return per
            if not moved:
                return None
        return per

    def evaluate(self, lay: Layout, m: int, engine: str, zero: int, rc: bool,
                 check_memory: bool = True) -> Candidate | str:
        """Score one option; a string says why it is impossible (``check_memory=False``: score it even where it is
        predicted not to fit, as a table of measured runs needs)."""
        w = self.w
        if w.global_batch % m:
            return "micro-batch does not divide the global batch"
        min_units = lay.pp if lay.pp > 1 else 1
        lay = self.cap_replicas(lay, w.global_batch // m // min_units, m, rc)
        if lay is None:
            return "global batch too small for this many replicas at this micro-batch size"
        # 'base': the software cost every plan pays; 0 unless a tune wrote a measured value back (planner/refit.py)
        keys = (*cost.engine_keys(engine, zero, sum(n for _, n in lay.kinds), lay.tp, lay.pp), "base")
        times = [max(self.stage_time(lay, st, j, m, rc, keys) for j in range(lay.pp)) for st, _ in lay.kinds]
        counts = [n for _, n in lay.kinds]
        per = self.shares(times, counts, w.global_batch // m, min_units)
        if per is None:
            return "global batch too small for this many replicas at this micro-batch size"
        dp = sum(counts)
        compute = max((max(u) + lay.pp - 1) * t for u, t in zip(per, times, strict=True))
        bubble = max((lay.pp - 1) * t for t in times)
        mem, cap, params = self.memory(lay, m, engine, zero, rc, dp, min(min(u) for u in per), keys)
        over = [k for k in mem if mem[k] > cap[k]]
        if over and check_memory:
            return f"out of memory on {over[0]}: {mem[over[0]] / 1e9:.1f} GB > {cap[over[0]] / 1e9:.1f} GB"
        groups = tuple({g for st, _ in lay.kinds for g in st})
        devs = [self.dev(g) for g in groups]
        # inside one node the replicas reduce over NVLink / PCIe; across nodes over the slowest NIC
        bw = self.link(groups, dp * lay.tp * lay.pp) if dp > 1 else 1.0
        # replicas share a node where tp × pp leaves room (model-parallel ranks are placed inside a node first);
        # across nodes, each model-parallel rank of a node reduces with its own replicas at the same time as the
        # others, over the same NICs: a node's tp × pp data-parallel groups share its network bandwidth
        nodes = 1
        if self.crosses(groups, dp * lay.tp * lay.pp):
            per_node = min(g.count for g in groups)
            nodes = nodes_spanned(dp, per_node // (lay.tp * lay.pp))
            bw /= min(per_node, lay.tp * lay.pp)
        n_micro = max(max(u) for u in per)
        hops = max(devs, key=lambda d: d.hops.inter).hops
        dpt = cost.dp_time(params, engine, zero, dp, bw, hops, n_micro, 2 / 3 * min(times), min(times),
                           min(d.comm_overlap for d in devs), lay.pp, layers=max(lay.stage_layers),
                           gather_bytes=w.act_bytes, nodes=nodes)
        local = params / dp if (engine == "fsdp" or zero >= 1) else params
        opt = max(cost.optimizer_time(local, d) for d in devs)
        fixed = max(max(lay.stage_layers) * d.engine_step_cost(list(keys)) for d in devs)
        # measured corrections of the whole step (a tune's write-back); the slowest device's governs
        step = (compute + dpt + opt + fixed) * max(d.time_scale(list(keys)) for d in devs)
        return self._candidate(lay, m, engine, zero, rc, per, step, mem, cap,
                               {"compute": compute - bubble, "pipeline_bubble": bubble, "data_parallel": dpt,
                                "optimizer": opt, "per_step_overhead": fixed})

    def cap_replicas(self, lay: Layout, most: int, m: int, rc: bool) -> Layout | None:
        """Drop replicas, slowest kind first, until each can get work (more devices than batch leaves some idle)."""
        total = sum(n for _, n in lay.kinds)
        if total <= most:
            return lay
        if most < 1:
            return None
        speed = {st: 1 / max(self.stage_time(lay, st, j, m, rc) for j in range(lay.pp)) for st, _ in lay.kinds}
        kinds, left = [], most
        for st, n in sorted(lay.kinds, key=lambda k: -speed[k[0]]):
            take = min(n, left)
            if take:
                kinds.append((st, take))
            left -= take
        return replace(lay, kinds=tuple(kinds))

    def memory(self, lay: Layout, m: int, engine: str, zero: int, rc: bool, dp: int, min_micro: int,
               keys: tuple[str, ...] = ()):
        """Peak bytes per device type, capacities, and the largest per-device parameter count."""
        mem: dict[str, float] = {}
        cap: dict[str, float] = {}
        worst_params = 0.0
        for stages, _ in lay.kinds:
            for j, g in enumerate(stages):
                d = self.dev(g)
                p = cost.stage_params(self.w.model, lay.stage_layers[j], j == 0, j == lay.pp - 1, lay.tp, lay.pp)
                worst_params = max(worst_params, p)
                act = cost.layer_activation_bytes(self.w, m, lay.tp, rc, self.w.flash(g.device)) * d.act_scale
                # with recomputation, the layer being recomputed in backward holds all its activations at once
                work = cost.layer_activation_bytes(self.w, m, lay.tp, False, self.w.flash(g.device)) \
                    * d.act_scale if rc else 0.0
                total = (cost.state_bytes(p, engine, zero, dp, lay.pp) + work
                         + cost.autocast_weight_bytes(p, engine, self.w.dtype)
                         + lay.stage_layers[j] * act * cost.in_flight("1f1b", j, lay.pp, min_micro)
                         + (cost.logits_bytes(self.w, m, lay.tp) if j == lay.pp - 1 else 0) + d.overhead
                         + d.engine_cost(list(keys))[1])
                setup = cost.setup_bytes(self.w.model, p, engine, zero, dp) + d.overhead  # before any step
                mem[g.device.name] = max(mem.get(g.device.name, 0.0), total, setup)
                cap[g.device.name] = d.device.memory_bytes  # a profile's measured memory, else the catalog's
        return mem, cap, worst_params

    def _candidate(self, lay, m, engine, zero, rc, per, step, mem, cap, breakdown) -> Candidate:
        w = self.w
        shares = [u * m for units in per for u in units]
        replica_devices = tuple(st[0].device.name for st, n in lay.kinds for _ in range(n))
        plan = Plan(
            dp=len(shares), tp=lay.tp, pp=lay.pp, stage_layers=lay.stage_layers if lay.pp > 1 else (),
            stage_devices=tuple(g.device.name for g in lay.kinds[0][0]) if lay.family == "hetero-pipeline" else (),
            # Named whenever the inventory has several types, so placement puts each replica where it was planned
            # (a homogeneous L4 plan on a cluster that also has H100s must not land on whatever node is free).
            replica_devices=replica_devices if lay.family == "replicas" and len(self.inv.by_type()) > 1 else (),
            micro_batch_size=m, batch_shares=tuple(shares) if len(set(shares)) > 1 else (),
            dp_engine=engine, zero_stage=zero, recompute=rc, dtype=w.dtype, schedule="1f1b",
        )
        used: dict[str, int] = {}
        price = 0.0
        for stages, n in lay.kinds:
            for g in stages:
                used[g.device.name] = used.get(g.device.name, 0) + n * lay.tp
        for g in {g for st, _ in lay.kinds for g in st}:
            n_dev = sum(n * lay.tp * st.count(g) for st, n in lay.kinds)
            price += math.ceil(n_dev / g.count) * g.price_per_hour
        tps = w.global_batch * w.seq_len / step
        peak = sum(self.dev(g).device.peak(w.dtype) * n_dev for g, n_dev in self._devices(lay))
        cpm = price / 3600 / tps * 1e6 if price else 0.0
        return Candidate(plan, step, tps, flops_per_token(w.model, w.seq_len) * tps / peak, mem, cap, price, cpm,
                         breakdown, used, lay)

    def _devices(self, lay: Layout):
        for stages, n in lay.kinds:
            for g in stages:
                yield g, n * lay.tp


def predict(plan: Plan, w: Workload, inv: Inventory, devices: dict[str, DeviceModel],
            check_memory: bool = True) -> Candidate | str:
    """The cost model's figures for one explicit, homogeneous Plan on the first node group of ``inv``."""
    g = inv.groups[0]
    layers = plan.stage_layers or tuple(r[1] - r[0] for r in plan.layer_ranges(w.model.n_layer))
    lay = Layout(plan.tp, plan.pp, tuple(layers), (((g,) * plan.pp, plan.dp),), "replicas")
    ev = Evaluator(w, inv, devices)
    micro = plan.micro_batch_size or w.global_batch // plan.dp
    return ev.evaluate(lay, micro, plan.dp_engine, plan.zero_stage, plan.recompute, check_memory)
