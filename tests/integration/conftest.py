"""Integration fixtures: the session's Ray cluster."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    from .ray_cluster import SimCluster

    c = SimCluster()
    yield c
    c.close()



RUN_ACTORS = ("ControllerActor", "TrainWorker")


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test(request):
    """A test that leaves a run's actors alive fails here, by name, instead of the tests after it failing to place
    (the session shares one cluster: two slots held by a driver that outlived its stopped Ray job once made three
    later tests wait out their start timeouts). The leftovers are killed so that the rest of the session runs."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    import contextlib
    import os
    import signal
    import time

    from .ray_cluster import run_actors_alive

    deadline = time.monotonic() + 30  # a run's teardown is asynchronous: killed actors take a moment to be DEAD
    while (alive := run_actors_alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for a in alive:  # every simulated node is this machine: the processes are ours to end
        with contextlib.suppress(ProcessLookupError):
            os.kill(a.pid, signal.SIGKILL)
    assert not alive, f"{request.node.name} left a run's actors alive: {[(a.class_name, a.pid) for a in alive]}"
