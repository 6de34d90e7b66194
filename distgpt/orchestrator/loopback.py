"""The environment that keeps a Ray cluster distgpt starts itself (the embedded one, the autoscaling sandbox) from
sending anything beyond this machine. No Ray import: the driver applies it before Ray starts."""

from __future__ import annotations

import os

LOCAL_ONLY: dict[str, str] = {
    # Ray resolves this machine's external address unless told otherwise (see driver._loopback_only).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray's usage statistics are on by default: a cluster up for a minute posts a report to Ray's public collector,
    # and one started like `ray start` posts a "disabled" report even with them off — so the collector's address
    # is also pointed at a closed port on loopback.
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
}
"""Variables a cluster started on this machine for this machine alone runs with (a user's own setting wins)."""


def keep_local() -> None:
    """Set ``LOCAL_ONLY`` in this process's environment where the user has not; Ray's processes inherit it."""
    for key, value in LOCAL_ONLY.items():
        os.environ.setdefault(key, value)
