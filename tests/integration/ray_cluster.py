"""One simulated multi-node Ray cluster for the whole test session (Ray start-up costs ~10 s here).

Loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and node_ip_address=127.0.0.1, a short private RAY_TMPDIR (unix
socket paths must stay under 108 bytes, and a bare ``ray.init`` must not find another cluster). Shut down by
``cluster.shutdown()`` — never ``ray stop``, which would kill every Ray process on the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

NODES = {
    "a100": {"num_cpus": 2, "labels": {"distgpt.io/device": "A100-40GB", "distgpt.io/site": "onprem"}},
    "l4": {"num_cpus": 2, "labels": {"distgpt.io/device": "L4", "distgpt.io/site": "cloud", "distgpt.io/price": "0.8"}},
}


class SimCluster:
    """A head without slots plus the NODES above; tests may add and remove nodes."""

    def __init__(self):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        self.tmp = tempfile.mkdtemp(prefix="dgray", dir="/tmp")
        os.makedirs(os.path.join(self.tmp, "ray"), exist_ok=True)
        os.environ["RAY_TMPDIR"] = self.tmp
        os.environ.pop("RAY_ADDRESS", None)
        import ray
        from ray.cluster_utils import Cluster

        # The dashboard hosts the Ray Jobs server (``ray job submit``); bound to loopback like everything else.
        self.dashboard_port = _free_port()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "temp_dir": self.tmp, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port,
            # a node whose raylet dies is marked dead after 5 refused health checks 1 s apart (default 3 s apart:
            # ~16 s); a slow raylet still has the default 10 s per check, so a busy machine loses no node
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}})
        self.nodes = {name: self.add(**spec) for name, spec in NODES.items()}
        ray.init(address=self.cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)

    @property
    def jobs_address(self) -> str:
        """Where ``ray job submit --address`` / ``JobSubmissionClient`` reach this cluster."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add(self, num_cpus: int, labels: dict[str, str]):
        return self.cluster.add_node(num_cpus=num_cpus, labels=labels, node_ip_address="127.0.0.1")

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


RUN_ACTORS = ("ControllerActor", "TrainWorker")


def run_actors_alive() -> list:
    """The state of every run actor (controller, rank) not yet DEAD on the connected cluster."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "!=", "DEAD")]) if a.class_name in RUN_ACTORS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
