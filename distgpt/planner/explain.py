"""Human output of the planner: the ranked table, an explanation of the top plan, what to change when nothing fits."""

from __future__ import annotations

from dataclasses import replace

from distgpt.planner.cost import Workload
from distgpt.planner.evaluate import Candidate
from distgpt.planner.inventory import Inventory
from distgpt.planner.search import TP_DEGREES, SearchResult, search

GB = 1e9


def table(res: SearchResult, top: int = 10) -> str:
    """The first ``top`` ranked plans, one per line."""
    head = f"{'#':>2}  {'step s':>8} {'tokens/s':>11} {'MFU':>5} {'$/Mtok':>8}  {'peak mem / capacity':28} plan"
    lines = [head, "-" * len(head)]
    for i, c in enumerate(res.ranked[:top], 1):
        mem = ", ".join(f"{k} {c.memory[k] / GB:.0f}/{c.capacity[k] / GB:.0f}G" for k in sorted(c.memory))
        cost = f"{c.cost_per_mtok:8.3g}" if c.cost_per_mtok else f"{'-':>8}"
        lines.append(f"{i:>2}  {c.step_time:8.3g} {c.tokens_per_s:11,.0f} {c.mfu:5.2f} {cost}  {mem:28} "
                     f"{c.plan.describe()}")
    return "\n".join(lines)


def _versus(c: Candidate, others: list[Candidate]) -> str | None:
    """Why not the best plan with other degrees: the time term that grows most there."""
    alt = next((o for o in others if (o.plan.tp, o.plan.pp) != (c.plan.tp, c.plan.pp)), None)
    if alt is None:
        return None
    worse = max(alt.breakdown, key=lambda k: alt.breakdown[k] - c.breakdown.get(k, 0.0))
    return (f"- Why tp={c.plan.tp}, pp={c.plan.pp}: the best plan with other degrees ({alt.plan.describe()}) is "
            f"{alt.step_time / c.step_time - 1:+.0%} slower, mostly in {worse.replace('_', ' ')} "
            f"({c.breakdown.get(worse, 0.0):.3g} s → {alt.breakdown[worse]:.3g} s).")


def explain(c: Candidate, inv: Inventory, w: Workload, others: list[Candidate] = ()) -> str:
    """Why the top plan looks the way it does, in operator terms (``others``: the rest of the ranking)."""
    p, lay = c.plan, c.layout
    out = [f"Top plan: {p.describe()}"]
    why = _versus(c, list(others))
    if why:
        out.append(why)
    used = ", ".join(f"{n}× {k}" for k, n in c.devices_used.items())
    left = {k: n - c.devices_used.get(k, 0) for k, n in inv.by_type().items()}
    idle = ", ".join(f"{n}× {k}" for k, n in left.items() if n > 0)
    out.append(f"- Uses {used}" + (f"; leaves out {idle} (adding them would slow the step or does not fit)."
                                   if idle else "."))
    if p.tp > 1:
        out.append(f"- tp={p.tp}: each layer's matrices split over {p.tp} GPUs of one node (fast intra-node link); "
                   f"needed for memory or speed of a single replica.")
    if p.pp > 1 and lay is not None:
        stages = ", ".join(f"{g.device.name}: {n} layers" for g, n in zip(lay.kinds[0][0], p.stage_layers,
                                                                           strict=True))
        out.append(f"- pp={p.pp}: layers per stage {stages}; the 1F1B bubble costs "
                   f"{c.breakdown.get('pipeline_bubble', 0) / c.step_time:.0%} of the step.")
    if p.batch_shares:
        by_type: dict[str, int] = {}
        for dev, share in zip(p.replica_devices or [None] * p.dp, p.batch_shares, strict=True):
            by_type[dev or "replica"] = max(by_type.get(dev or "replica", 0), share)
        shares = ", ".join(f"{k} takes {v} samples" for k, v in by_type.items())
        out.append(f"- Uneven batch: {shares} per step, so faster replicas do not wait for slower ones.")
    engine = f"ZeRO-{p.zero_stage}" if p.dp_engine == "deepspeed" else p.dp_engine.upper()
    out.append(f"- dp={p.dp} with {engine}; micro-batch {p.micro_batch_size}"
               f"{', activations recomputed to fit memory' if p.recompute else ''}.")
    total = c.step_time
    parts = ", ".join(f"{k.replace('_', ' ')} {v / total:.0%}" for k, v in c.breakdown.items() if v > 0)
    out.append(f"- Step {total:.3f} s: {parts}. Bottleneck: {c.bottleneck.replace('_', ' ')}.")
    margins = ", ".join(f"{k} {1 - c.memory[k] / c.capacity[k]:.0%} free" for k in c.memory)
    out.append(f"- Memory margin to OOM: {margins}.")
    hint = _vocab_blocks_tp(w, inv)
    if hint:
        out.append(hint)
    return "\n".join(out)


def _vocab_blocks_tp(w: Workload, inv: Inventory) -> str | None:
    """A line when tensor parallelism was never considered because the vocabulary does not split (the embedding
    and LM head are split by vocabulary rows): GPT-2's 50,257 tokens split no way at all."""
    v = w.model.vocab_size
    room = max(g.count for g in inv.groups)  # devices per node: TP stays inside a node
    blocked = [t for t in TP_DEGREES if 1 < t <= room and w.model.n_head % t == 0 and v % t]
    if not blocked:
        return None
    padded = -(-v // 64) * 64
    return (f"- tp={'/'.join(map(str, blocked))} not considered: vocab_size {v} does not divide by it (TP splits "
            f"the vocabulary) — set model.vocab_size = {padded} (a multiple of 64, as Megatron-LM pads) to let "
            f"the planner weigh tensor parallelism.")


def nothing_fits(res: SearchResult, inv: Inventory, w: Workload) -> str:
    """Explain an empty search and find the smallest change that makes some plan fit."""
    why = ", ".join(f"{k} ({n}×)" for k, n in sorted(res.reasons.items(), key=lambda kv: -kv[1])[:3])
    tries = [
        ("halve data.seq_len (fewer tokens per micro-batch)", replace(w, seq_len=max(1, w.seq_len // 2)), inv),
        ("double every node group (more devices to shard states over)",
         replace(w), Inventory(tuple(replace(g, replicas=g.replicas * 2) for g in inv.groups), inv.inter_site_bw)),
        ("devices with twice the memory", replace(w), Inventory(tuple(
            replace(g, device=replace(g.device, memory_bytes=2 * g.device.memory_bytes)) for g in inv.groups),
            inv.inter_site_bw)),
        ("a global batch of at least one sample per device", replace(w, global_batch=max(w.global_batch,
                                                                                         inv.total_devices)), inv),
    ]
    fixes = [label for label, w2, inv2 in tries if search(w2, inv2, top=1).ranked]
    msg = (f"No plan fits {w.model.n_layer}-layer d={w.model.n_embd} on {inv.summary()}. "
           f"Every candidate failed: {why or 'no layout possible'}. Recomputation and ZeRO-3/FSDP were already tried.")
    if fixes:
        msg += " Smallest change that fits: " + fixes[0] + "." + (
            f" Also works: {'; '.join(fixes[1:])}." if len(fixes) > 1 else "")
    else:
        msg += " None of: shorter sequences, twice the devices, twice the memory, makes it fit."
    return msg
