"""The chaos drill's draws and the node-removal fault's target (no Ray: the drill's pure parts)."""

from __future__ import annotations

import pytest

from distgpt.config_schema import ConfigError
from distgpt.orchestrator.chaos import ALL_KINDS, draw_faults
from distgpt.orchestrator.drills import away_from, node_daemon_pid
from distgpt.recovery.faults import Fault, parse_faults
from distgpt.recovery.policy import Failure, FailureKind


def test_default_draws_are_unchanged_by_the_node_removal_kind():
    """Seeded draws a user may have written down (and the README's) stay the same."""
    assert draw_faults(4, 16, 2, seed=3) == ["hang@3:1", "hang@4:0", "kill@9:0", "preempt@10:1"]
    assert draw_faults(10, 24, 2, seed=1, kinds=("kill", "hang")) == [
        "kill@3:0", "hang@4:0", "hang@5:1", "kill@7:1", "hang@9:0", "kill@11:1", "kill@15:0", "kill@16:0",
        "hang@18:0", "hang@19:0"]


@pytest.mark.parametrize("seed", range(30))
def test_node_losing_faults_come_last_once_each_and_no_more_than_the_cluster_can_lose(seed):
    for replans in (0, 1, 2):
        faults = draw_faults(6, 20, 4, seed, ALL_KINDS, replans)
        kinds = [f.split("@")[0] for f in faults]
        lost = [k for k in kinds if k in ("preempt", "remove")]
        assert len(lost) == len(set(lost)) <= replans
        assert kinds[len(kinds) - len(lost):] == lost  # after every kill and hang
        assert [int(f.split("@")[1].split(":")[0]) for f in faults] == sorted({int(f.split("@")[1].split(":")[0])
                                                                                for f in faults})


def test_ten_faults_of_all_four_kinds_on_three_nodes():
    faults = draw_faults(10, 30, 2, seed=5, kinds=ALL_KINDS, replans=2)
    assert {f.split("@")[0] for f in faults} == set(ALL_KINDS)


def test_a_node_removal_never_takes_the_controllers_node():
    (f,) = parse_faults(["remove@5:0"])
    nodes = {0: "head", 1: "head", 2: "n2", 3: "n3"}
    assert away_from([f], nodes, keep="n9") == [Fault("remove", 5, 0)]
    assert away_from([f], nodes, keep="head") == [Fault("remove", 5, 2)]
    # drawn for a larger first Plan: wraps round onto the current group's ranks
    assert away_from([Fault("remove", 5, 5)], {0: "a", 1: "b"}, keep="a") == [Fault("remove", 5, 1)]
    assert away_from([Fault("kill", 5, 0)], nodes, keep="head") == [Fault("kill", 5, 0)]
    with pytest.raises(ValueError, match="every rank runs on the controller's node"):
        away_from([f], {0: "head", 1: "head"}, keep="head")


def test_a_node_loss_spends_the_removal_drill():
    from distgpt.orchestrator.drills import ControllerDrills

    faults = parse_faults(["remove@4:1", "kill@6:0"])
    drills = ControllerDrills(faults)
    drills.fired(Failure(FailureKind.NODE_LOST, "node gone", 4, (1,), ("n1",)))
    assert faults == [Fault("kill", 6, 0)]


def test_removal_refuses_a_parent_that_is_not_a_raylet():
    with pytest.raises(RuntimeError, match="no Ray raylet above this worker"):
        node_daemon_pid()  # pytest's parent is a shell or CI runner, never a raylet


def test_unknown_kinds_are_one_config_error(monkeypatch):
    from distgpt.orchestrator import chaos

    with pytest.raises(ConfigError, match="--kinds: explode"):
        chaos._possible(("kill", "explode"), 1.0, print)


def test_a_node_removal_the_watchdog_sees_first_is_still_spent():
    """The removed node's ranks stop stepping before Ray calls the node dead: the watchdog may see a hang. The fault
    that fired is the pending one at or before the failure's step, so it is not armed again (it would take down the
    node the run restarted on)."""
    from distgpt.orchestrator.drills import ControllerDrills

    faults = parse_faults(["remove@11:0", "kill@14:1"])
    ControllerDrills(faults).fired(Failure(FailureKind.HANG, "no step for 8 s", 11, (0,)))
    assert faults == [Fault("kill", 14, 1)]
    faults = parse_faults(["kill@4:1", "hang@7:0"])
    ControllerDrills(faults).fired(Failure(FailureKind.WORKER_DIED, "rank 1: actor died", 3, (1,)))  # seen early
    assert faults == [Fault("hang", 7, 0)]
    ControllerDrills(faults).fired(Failure(FailureKind.PREEMPTED, "node going", 9, (0,)))  # not a rank-fired fault
    assert faults == [Fault("hang", 7, 0)]
