"""Hardware profiles: measured figures that replace catalog peaks in the cost model. No torch import.

A profile is JSON written by ``distgpt bench hardware``::

    {"format": "distgpt-profile/1",
     "devices": {"cpu": {"flops_curve": [[tokens_per_micro_batch, achieved_flop_s], ...],
                         "intra_bw": 2.1e9, "latency": 3e-5, "comm_overlap": 0.0,
                         "act_scale": 0.93, "overhead_bytes": 4.1e8, "memory_bytes": 1.2e10}}}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from distgpt.errors import DistgptError
from distgpt.planner.cost import DeviceModel
from distgpt.planner.hardware import device_type

FORMAT = "distgpt-profile/1"


@dataclass(frozen=True)
class DeviceProfile:
    """What was measured for one device type."""

    flops_curve: tuple[tuple[float, float], ...]
    intra_bw: float
    latency: float
    comm_overlap: float
    act_scale: float
    overhead_bytes: float
    memory_bytes: float = 0.0
    engine_time: tuple[tuple[str, float], ...] = ()
    engine_memory: tuple[tuple[str, float], ...] = ()
    engine_step_time: tuple[tuple[str, float], ...] = ()
    step_scale: tuple[tuple[str, float], ...] = ()


def save_profile(path: str | Path, devices: dict[str, DeviceProfile], measured: dict | None = None) -> None:
    """Write a profile file."""
    data = {"format": FORMAT, "devices": {k: asdict(v) for k, v in devices.items()}, "measured": measured or {}}
    Path(path).write_text(json.dumps(data, indent=2))


class ProfileError(DistgptError, ValueError):
    """A hardware profile file that cannot be used; the message says how to get a good one."""


def load_profile(path: str | Path) -> dict[str, DeviceProfile]:
    """Read a profile file; a clear error if it is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProfileError(f"{p}: cannot read hardware profile ({e}) — write one with `distgpt bench hardware`"
                           ) from None
    if data.get("format") != FORMAT:
        raise ProfileError(f"{p}: not a distgpt hardware profile (format {data.get('format')!r}) — write one with "
                           "`distgpt bench hardware`")
    out = {}
    for name, d in data.get("devices", {}).items():
        for key in ("flops_curve", "engine_time", "engine_memory", "engine_step_time", "step_scale"):
            d[key] = tuple(tuple(x) for x in d.get(key, ()))
        try:
            out[device_type(name).name] = DeviceProfile(**d)
        except (KeyError, TypeError) as e:
            raise ProfileError(f"{p}: device {name!r}: {e} — write the profile again with `distgpt bench hardware`"
                               ) from None
    return out


def load_measured(path: str | Path) -> dict:
    """The profile's record of how it was measured (``reference_s``: the machine-speed yardstick, when present)."""
    return dict(json.loads(Path(path).read_text()).get("measured", {}))


def device_models(profiles: dict[str, DeviceProfile]) -> dict[str, DeviceModel]:
    """Cost-model devices that use the measured figures."""
    out: dict[str, DeviceModel] = {}
    for name, pr in profiles.items():
        dev = device_type(name)
        if pr.memory_bytes:
            dev = replace(dev, memory_bytes=pr.memory_bytes)
        out[dev.name] = DeviceModel(dev, intra_bw=pr.intra_bw, latency=pr.latency, comm_overlap=pr.comm_overlap,
                                    act_scale=pr.act_scale, overhead_bytes=pr.overhead_bytes,
                                    flops_curve=pr.flops_curve, engine_time=pr.engine_time,
                                    engine_memory=pr.engine_memory, engine_step_time=pr.engine_step_time,
                                    step_scale=pr.step_scale)
    return out
