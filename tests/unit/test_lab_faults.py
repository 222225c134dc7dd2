"""The lab's fault drills, the parts that need no lab: input checks, which links a power-off
takes, which etcd member leads, and the command line's answer to bad input."""

from __future__ import annotations

import sys

import pytest

from ferry.cli.main import main
from ferry.lab import faults, procs
from ferry.lab import lab as labmod
from ferry.lab.layout import BRIDGE, LabLayout
from ferry.model.errors import LabError
from ferry.store.base import StoreStatus

LAYOUT = LabLayout(name="unit", nodes=3)


@pytest.mark.parametrize("action", faults.NODE_ACTIONS)
@pytest.mark.parametrize("node", ["node1", "node3"])
def test_every_node_action_is_accepted(node: str, action: str) -> None:
    faults.check(LAYOUT, node, action)


@pytest.mark.parametrize("action", faults.ETCD_ACTIONS)
def test_every_etcd_action_is_accepted(action: str) -> None:
    faults.check(LAYOUT, "etcd", action)


@pytest.mark.parametrize(("target", "action", "message"), [
    ("node4", "power-off", "no fault target 'node4': use etcd or one of node1, node2, node3"),
    ("client", "isolate", "no fault target 'client'"),
    ("node1", "reboot", "no node fault 'reboot': use one of power-off, power-on"),
    ("node1", "kill-leader", "no node fault 'kill-leader'"),
    ("etcd", "power-off", "no etcd fault 'power-off': use one of kill-leader, start"),
])
def test_bad_input_is_refused(target: str, action: str, message: str) -> None:
    with pytest.raises(LabError, match=message):
        faults.check(LAYOUT, target, action)


def test_power_off_takes_taps_but_not_the_wiring() -> None:
    names = ["lo", "cl0", "mig0", "mig1", "uplink0", BRIDGE, "tap-web1", "fv3a9"]
    assert faults.volatile_links(names, LAYOUT) == ["tap-web1", "fv3a9"]
    assert faults.volatile_links([], LAYOUT) == []


def _status(member: int, leader: int) -> StoreStatus:
    return StoreStatus(endpoint=f"m{member}", version="3.4.23", revision=7, leader=leader,
                       member=member, db_size=0)


def test_leader_is_the_member_the_others_name() -> None:
    assert faults.leader_index([_status(11, 22), _status(22, 22), _status(33, 22)]) == 1
    assert faults.leader_index([None, _status(22, 33), _status(33, 33)]) == 2


def test_majority_view_of_the_leader_wins() -> None:
    # Member 11 was cut off and still believes it leads; 22 and 33 elected 33.
    assert faults.leader_index([_status(11, 11), _status(22, 33), _status(33, 33)]) == 2


@pytest.mark.parametrize("statuses", [
    [None, None, None],
    [_status(11, 0), _status(22, 0), None],  # electing
    [None, _status(22, 11), _status(33, 11)],  # the leader itself does not answer
])
def test_no_leader(statuses: list[StoreStatus | None]) -> None:
    assert faults.leader_index(statuses) is None


@pytest.mark.parametrize(("stat", "state"), [
    ("1234 (python3) S 1 1234 1234 0 -1", "S"),
    ("1234 (ferry agent) T 1 1234 1234 0 -1", "T"),
    ("1234 (a) b) (c) Z 1 2 3", "Z"),
])
def test_stat_state(stat: str, state: str) -> None:
    assert procs.stat_state(stat) == state


@pytest.mark.parametrize(("args", "message"), [
    (["node9", "power-off"], "error: no fault target 'node9'"),
    (["node2", "explode"], "error: no node fault 'explode'"),
    (["etcd", "heal"], "error: no etcd fault 'heal'"),
])
def test_cli_bad_input_is_one_line_and_non_zero(
        args: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    state = labmod.LabState(name="unit", nodes=3, tag="fy", octet=77, cluster="unit")
    monkeypatch.setattr(labmod, "load_state", lambda name=None: state)
    monkeypatch.setattr(sys, "argv", ["ferry", "lab", "fault", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
