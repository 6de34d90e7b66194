"""Integration fixtures: the session's Ray cluster."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    from .ray_cluster import SimCluster

    c = SimCluster()
    yield c
    c.close()
