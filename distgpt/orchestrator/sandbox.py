"""A real Ray autoscaler on one machine: a head started with an autoscaling config whose node types Ray's fake
multi-node provider launches as local raylets (autoscaler v2). Tests and ``distgpt bench autoscale`` use it to watch
the autoscaler add nodes of the types a Plan asks for and remove them when idle.

Why not ``ray.cluster_utils.AutoscalingCluster``: its start and shutdown run ``ray stop --force``, which kills every
Ray process on the machine, and the 2.60 wheel lacks the ``fake_multi_node/example.yaml`` it reads. Here the provider
is named as an ``external`` module (Ray's own ``FakeMultiNodeProvider``), everything binds to 127.0.0.1, ports are
free ones, and ``stop`` ends exactly the processes this sandbox started — those whose command line names its private
temp directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distgpt.orchestrator.loopback import LOCAL_ONLY

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the provider's fixed head id
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(node_types: dict[str, dict[str, Any]], gcs_address: str, idle_timeout_s: float) -> dict:
    """A complete cluster-launcher config for the fake provider: a head with no CPUs (it trains nothing) plus
    ``node_types`` (``resources``, ``labels``, ``max_workers`` each)."""
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0,
                                  "labels": {"distgpt.io/slots": "0"}}}
    for name, nt in node_types.items():
        types[name] = {"node_config": {}, "min_workers": 0, **nt}
    empty: dict[str, Any] = {k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter",
                                              "initialization_commands", "setup_commands", "head_setup_commands",
                                              "worker_setup_commands", "head_start_ray_commands",
                                              "worker_start_ray_commands")}
    return {"cluster_name": "distgpt-sandbox", "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
            "idle_timeout_minutes": idle_timeout_s / 60, "upscaling_speed": 10.0,
            "provider": {"type": "external", "module": PROVIDER, "gcs_address": gcs_address, "launch_multiple": True,
                         "head_node_id": FAKE_HEAD_NODE_ID, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {"ssh_user": "nobody"}, "available_node_types": types, "head_node_type": "ray.head.default",
            "file_mounts": {}, "file_mounts_sync_continuously": False, **empty}


class AutoscalingSandbox:
    """``with AutoscalingSandbox({...node types...}) as sb:`` → a head at ``sb.address`` with zero worker nodes."""

    def __init__(self, node_types: dict[str, dict[str, Any]], idle_timeout_s: float = 6.0, auth_token: str = ""):
        self.tmp = tempfile.mkdtemp(prefix="dgas", dir="/tmp")  # short: unix socket paths stay under 108 bytes
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.auth_token = auth_token
        """With a token, Ray's token authentication is on (RAY_AUTH_MODE=token) for the head and every node."""
        self.config_path = str(Path(self.tmp, "autoscaling.json"))
        Path(self.config_path).write_text(json.dumps(autoscaling_config(node_types, self.address, idle_timeout_s)))

    @property
    def jobs_address(self) -> str:
        """The head's Jobs API (``distgpt submit --address``), on 127.0.0.1."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Environment for a process that joins this cluster (``distgpt train``): loopback, and the token."""
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token} if self.auth_token else \
            {"RAY_AUTH_MODE": "disabled"}
        return {**os.environ, **LOCAL_ONLY, "RAY_ADDRESS": self.address, "RAY_TMPDIR": self.tmp, **auth}

    def start(self) -> AutoscalingSandbox:
        """Start the head and its autoscaler (v2); returns once the head is up (~8 s here)."""
        env = {**self.env(), "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1",
               "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
               "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        env.pop("RAY_ADDRESS")
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [ray, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
               f"--autoscaling-config={self.config_path}", f"--temp-dir={self.tmp}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}",
               f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
        try:
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as e:
            self.stop()
            raise RuntimeError(f"the sandbox head did not start: {e.stderr[-2000:]}") from None
        return self

    def events(self) -> list[tuple[float, str]]:
        """The autoscaler's own events so far ('Adding 1 node(s) of type a100.'), with their (whole-second) times."""
        out = []
        for f in Path(self.tmp).glob("session_2*/logs/events/event_AUTOSCALER.log"):  # not session_latest too
            for line in f.read_text().splitlines():
                try:
                    e = json.loads(line)
                    out.append((float(e["timestamp"]), str(e["message"])))
                except (ValueError, KeyError):
                    continue  # a line still being written
        return sorted(out)

    def _pids(self) -> list[int]:
        mine = []
        for p in os.listdir("/proc"):
            if not p.isdigit() or int(p) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if self.tmp in cmdline:
                mine.append(int(p))
        return mine

    def stop(self, grace_s: float = 5.0) -> None:
        """End every process this sandbox started (SIGTERM, then SIGKILL) and remove its directory."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + grace_s
            while pids and time.monotonic() < deadline and self._pids():
                time.sleep(0.2)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> AutoscalingSandbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
