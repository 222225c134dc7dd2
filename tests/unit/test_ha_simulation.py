"""Deterministic simulation of HA (tests/unit/ha_sim.py): the real lease guard, manager,
recovery and reconcile decisions against a MemoryStore in virtual time, under thousands of
seeded random fault schedules, plus targeted scenarios.

Environment:
  FERRY_SIM_SCHEDULES=n   how many random schedules (default 2000)
  FERRY_SIM_SEED=n        run only that schedule and print its trace (replay a failure)
  FERRY_SIM_FIRST=n       first seed of the range (default 0)
  FERRY_SIM_WORKERS=n     processes (default: CPUs, at most 4)
  FERRY_SIM_UNMASK=1      do not keep the schedules clear of the bugs already reported
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence

import pytest

from ferry.ha import lease, manager, recovery
from ferry.model.ha import HaPolicy, HaPriority
from ferry.model.node import NodeInfo
from ferry.store.base import Compare, Op, Target
from tests.unit.ha_sim import (
    MANAGER_KEY,
    Chaos,
    Fault,
    Latency,
    Masks,
    Result,
    Scenario,
    SimNode,
    Simulation,
    Timing,
    VmDef,
    run_one,
    run_seeds,
    simulate,
)

T = Timing()
BOUND = T.bound()
N3 = ("n1", "n2", "n3")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _masks() -> Masks:
    return Masks.none() if os.environ.get("FERRY_SIM_UNMASK", "") not in ("", "0") else Masks()


def ha(priority: HaPriority = HaPriority.MEDIUM, preferred: Sequence[str] = ()) -> HaPolicy:
    return HaPolicy(priority=priority, preferred_nodes=tuple(preferred))


def ok(r: Result) -> Result:
    assert r.ok, r.report()
    return r


# -- thousands of random schedules ---------------------------------------------------------

def test_random_schedules(capsys: pytest.CaptureFixture[str]) -> None:
    chaos = Chaos(masks=_masks())
    seed = os.environ.get("FERRY_SIM_SEED", "").strip()
    if seed:
        r = run_one(int(seed), chaos)
        with capsys.disabled():
            print("\n" + r.report(last=100_000))
        ok(r)
        return
    first = _env_int("FERRY_SIM_FIRST", 0)
    count = _env_int("FERRY_SIM_SCHEDULES", 2000)
    workers = _env_int("FERRY_SIM_WORKERS", min(4, os.cpu_count() or 1))
    started = time.perf_counter()
    totals = run_seeds(range(first, first + count), chaos, workers=workers, stop_after=3)
    took = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nHA simulation: {totals} in {took:.1f}s ({workers} processes)")
    assert totals.schedules == count or totals.failures
    if count >= 100:
        assert totals.recoveries > count // 10  # the schedules do exercise recovery
    if totals.failures:
        seeds = ", ".join(str(f.seed) for f in totals.failures)
        pytest.fail(f"{len(totals.failures)} failing schedule(s) (seeds {seeds}); the first:\n"
                    + totals.failures[0].report(), pytrace=False)


# -- targeted scenarios --------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_power_off_recovers_on_another_node_within_the_bound(seed: int) -> None:
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(preferred=("n3",)), "n1"),
                                 VmDef("vm1", 256, None, "n1"),
                                 VmDef("ha2", 256, ha(), "n2")),
                  faults=(Fault(5.0, "power-off", "n1"),), heal_at=5.5, dead_at_end=("n1",))
    r = ok(simulate(sc, seed=seed))
    first, second = r.runs_of("ha1")
    assert (first.node, first.ended, first.why_ended) == ("n1", 5.0, "power off")
    assert second.node == "n3"  # its preferred node
    assert second.started >= 5.0 - T.keepalive_s + T.ttl + T.fence_delay_s  # expiry + D
    assert second.started - 5.0 <= BOUND
    assert second.ended is None and second.token > first.token
    assert [x.node for x in r.runs_of("vm1")] == ["n1"]  # not HA: stays down
    assert [(x.node, x.ended) for x in r.runs_of("ha2")] == [("n2", None)]
    assert r.recoveries == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_power_off_of_the_manager_node(seed: int) -> None:
    sc = Scenario(nodes=N3, vms=tuple(VmDef(f"ha{i}", 256, ha(), n) for i, n in
                                      enumerate(N3, 1)),
                  faults=(Fault(5.0, "power-off", "@manager"),), heal_at=25.0)
    r = ok(simulate(sc, seed=seed))
    dead = next(x for x in r.runs if x.ended == 5.0)
    moved = r.runs_of(dead.vm)[1]
    assert moved.node != dead.node and moved.ended is None
    assert moved.started - 5.0 <= BOUND
    assert r.recoveries == 1
    managers = [e for e in r.events if e.startswith("manager:")]
    assert managers[0] == f"manager: {dead.node} is the manager"
    assert dead.node not in managers[-1]  # another node took over


def test_isolated_node_stops_its_copy_before_the_new_one_starts() -> None:
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(), "n1"), VmDef("vm1", 256, None, "n1")),
                  faults=(Fault(5.0, "isolate", "n1", 20.0),), heal_at=30.0)
    r = ok(simulate(sc, seed=1))
    old, new = r.runs_of("ha1")
    assert old.node == "n1" and old.why_ended == "self-fenced"
    assert old.ended is not None and old.ended <= 5.0 + T.ttl - T.margin  # by its deadline
    assert old.ended + T.margin + T.fence_delay_s <= new.started  # long before the new copy
    assert new.node != "n1" and new.ended is None
    # not HA: it runs on where it is, cut off or not, and is not restarted anywhere
    assert [(x.node, x.ended) for x in r.runs_of("vm1")] == [("n1", None)]
    assert any("n1 rejoined after being fenced" in e for e in r.events)


def test_frozen_agent_is_stopped_by_its_watchdog_and_does_not_resurrect() -> None:
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(), "n1"), VmDef("vm1", 256, None, "n1")),
                  faults=(Fault(5.0, "freeze", "n1", 12.0),), heal_at=20.0)
    r = ok(simulate(sc, seed=1))
    old, new = r.runs_of("ha1")
    assert old.why_ended == "watchdog"
    assert old.ended is not None and old.ended <= 5.0 + T.watchdog_s + T.feed_s + 0.1
    assert old.ended < new.started and new.node != "n1" and new.ended is None
    assert [(x.node, x.ended) for x in r.runs_of("vm1")] == [("n1", None)]


@pytest.mark.parametrize("down", [0.2, 1.0, 2.0])
def test_quick_agent_restart_keeps_its_vms(down: float) -> None:
    """Shorter than the watchdog's timeout: the QEMUs are adopted, never restarted."""
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(), "n1"), VmDef("vm1", 256, None, "n1")),
                  faults=(Fault(5.0, "crash", "n1", down),), heal_at=10.0)
    r = ok(simulate(sc, seed=1))
    assert [(x.vm, x.node, x.ended) for x in sorted(r.runs, key=lambda x: x.vm)] == [
        ("ha1", "n1", None), ("vm1", "n1", None)]
    assert r.recoveries == 0
    assert any("adopted ['ha1', 'vm1']" in line for line in r.trace)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_etcd_leader_change_restarts_no_vm(seed: int) -> None:
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(), "n1"), VmDef("ha2", 256, ha(), "n2"),
                                 VmDef("vm1", 256, None, "n3")),
                  faults=(Fault(5.0, "etcd", "", 1.0), Fault(12.0, "etcd", "", 1.0)),
                  heal_at=16.0)
    r = ok(simulate(sc, seed=seed))
    assert len(r.runs) == 3 and all(x.ended is None for x in r.runs)
    assert r.recoveries == 0
    assert not any("self-fenced" in line for line in r.trace)


def test_etcd_quorum_loss_stops_ha_vms_which_restart_where_they_were() -> None:
    """Longer than the lease: every node fences itself (design/ha.md "Losing etcd"); once
    etcd is back with the leases renewed, each node restarts its own VMs, nothing moves."""
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(), "n1"), VmDef("ha2", 256, ha(), "n2"),
                                 VmDef("vm1", 256, None, "n3")),
                  faults=(Fault(5.0, "etcd", "", 8.0),), heal_at=14.0)
    r = ok(simulate(sc, seed=1))
    for vm, node in (("ha1", "n1"), ("ha2", "n2")):
        runs = r.runs_of(vm)
        assert {x.node for x in runs} == {node}
        assert runs[0].why_ended == "self-fenced" and runs[-1].ended is None
    assert [(x.node, x.ended) for x in r.runs_of("vm1")] == [("n3", None)]  # not HA
    assert r.recoveries == 0


def test_fenced_node_rejoins_without_resurrecting_and_takes_vms_again() -> None:
    sc = Scenario(nodes=("n1", "n2"), vms=(VmDef("ha1", 256, ha(), "n1"),),
                  faults=(Fault(3.0, "isolate", "n1", 14.0), Fault(22.0, "power-off", "n2")),
                  heal_at=22.5, dead_at_end=("n2",))
    r = ok(simulate(sc, seed=1))
    assert [(x.node, x.why_ended) for x in r.runs_of("ha1")] == [
        ("n1", "self-fenced"), ("n2", "power off"), ("n1", "")]
    back = r.runs_of("ha1")[2]
    assert back.started > 22.0 + T.ttl  # only once n2 is gone, not when n1 rejoined at 17
    assert any("n1 rejoined after being fenced" in e for e in r.events)


def test_vm_not_armed_yet_is_not_recovered() -> None:
    """HA is switched on while its node is cut off: the node never armed it, so the VM may
    still run there unguarded; the manager leaves it and says why."""
    sc = Scenario(nodes=("n1", "n2"), vms=(VmDef("vm1", 256, None, "n1"),),
                  faults=(Fault(2.0, "isolate", "n1", 100.0), Fault(3.0, "ha-add", "vm1"),
                          Fault(6.0, "power-off", "n1")),
                  heal_at=7.0, dead_at_end=("n1",), settle=15.0)
    r = ok(simulate(sc, seed=1))
    assert [x.node for x in r.runs_of("vm1")] == ["n1"]
    assert r.recoveries == 0
    assert any("vm1 not recovered: HA was not yet armed on n1" in e for e in r.events)


def test_priority_decides_who_restarts_when_capacity_is_short() -> None:
    # n2 has 1280 - 512 (reserve) = 768 MiB: gamma (high) and beta (medium) fit, alpha
    # (low, first by name) does not.
    sc = Scenario(nodes=("n1", "n2"), node_memory_mib=1280,
                  vms=(VmDef("alpha", 512, ha(HaPriority.LOW), "n1"),
                       VmDef("beta", 256, ha(HaPriority.MEDIUM), "n1"),
                       VmDef("gamma", 512, ha(HaPriority.HIGH), "n1")),
                  faults=(Fault(3.0, "power-off", "n1"),), heal_at=3.5, dead_at_end=("n1",),
                  settle=8.0)
    r = ok(simulate(sc, seed=1))
    assert [x.node for x in r.runs_of("gamma")] == ["n1", "n2"]
    assert [x.node for x in r.runs_of("beta")] == ["n1", "n2"]
    assert [x.node for x in r.runs_of("alpha")] == ["n1"]
    assert any("alpha not recovered: no node can take it" in e for e in r.events)


# -- bugs the simulation found, fixed since: these guard the fixes ---------------------------

def test_slow_start_on_a_node_cut_off_does_not_spawn_after_the_deadline() -> None:
    """QEMU's preparation outlasts the lease: runtime.start asks may_start just before it
    spawns (was: the lease was checked only before the preparation)."""
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(), "n1"),),
                  latency=Latency(start=(6.0, 6.0)),  # 6 s from the owner read to the spawn
                  faults=(Fault(0.4, "isolate", "n1", 25.0),), heal_at=26.0)
    r = ok(simulate(sc, seed=1))
    assert [x.node for x in r.runs_of("ha1")] == ["n2"]
    assert any("ha1: not started: the lease is no longer valid" in line for line in r.trace)


def test_user_cannot_restart_a_vm_elsewhere_while_its_node_is_cut_off() -> None:
    """The node is down, not fenced: it may still run the VM (was: started on n2 too)."""
    sc = Scenario(nodes=("n1", "n2"), vms=(VmDef("vm1", 256, None, "n1"),),
                  faults=(Fault(2.0, "isolate", "n1", 20.0), Fault(3.0, "stop", "vm1"),
                          Fault(9.0, "start", "vm1")),
                  heal_at=25.0)
    r = ok(simulate(sc, seed=1, masks=Masks.none()))  # the real start_vm decides
    assert any("start vm1: refused: VM vm1 last ran on n1, which is down" in line
               for line in r.trace)
    assert [x.node for x in r.runs_of("vm1")] == ["n1"]


def test_stop_and_start_while_the_first_start_is_in_flight() -> None:
    """No fault: start, stop before QEMU is up, start again: the STARTING status reads as
    "stopping" until the QEMU is gone (was: no status yet read as stopped, and vm1 started
    on the emptier n2 while n1 spawned it)."""
    sc = Scenario(nodes=("n1", "n2"), vms=(VmDef("vm1", 256, None, "n1"),
                                           VmDef("vm2", 512, None, "n1")),
                  latency=Latency(start=(0.5, 0.5), stop=(1.5, 1.5), watch=(0.3, 0.3)),
                  faults=(Fault(0.2, "stop", "vm1"), Fault(0.45, "start", "vm1")),
                  heal_at=5.0, boot_spread=0.0)
    r = ok(simulate(sc, seed=1, masks=Masks.none()))  # the real start_vm decides
    assert any("start vm1: refused: VM vm1 is still stopping on n1" in line
               for line in r.trace)


class LostCampaignAnswers(Simulation):
    """The first campaign of n1 and of n2 is applied but its answer is lost."""

    lost: set[str]

    def answer_lost(self, n: SimNode, compares: Sequence[Compare]) -> bool:
        if not hasattr(self, "lost"):
            self.lost = set()
        if compares == [Compare.absent(MANAGER_KEY)] and n.name in ("n1", "n2") and (
                n.name not in self.lost):
            self.lost.add(n.name)
            self.trace(n.name, "the campaign's answer is lost")
            return True
        return False


def test_lost_campaign_answer_the_node_adopts_its_key() -> None:
    """Was: the key stayed on the node's lease with nobody acting as manager."""
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(), "n3"),),
                  faults=(Fault(5.0, "power-off", "n3"),), heal_at=6.0, dead_at_end=("n3",))
    r = ok(asyncio.run(LostCampaignAnswers(sc, seed=1).run()))
    assert any("the campaign's answer is lost" in line for line in r.trace)
    assert r.runs_of("ha1")[-1].node != "n3"


# -- more bugs the simulation found, fixed since: these guard the fixes ----------------------

def test_bug1b_freeze_between_owner_read_and_spawn_then_reregistration() -> None:
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(), "n1"),),
                  latency=Latency(start=(2.0, 2.0)),  # QEMU's preparation takes 2 s
                  faults=(Fault(1.0, "freeze", "n1", 10.0),), heal_at=12.0)
    # frozen while preparing; ha1 restarts on another node; on thaw the keepalive loop
    # registers a new lease before the start reaches may_start: it must say no (other lease)
    r = ok(simulate(sc, seed=1, masks=Masks.none()))
    assert r.runs_of("ha1")[-1].node != "n1"


def test_bug4_no_watchdog_kill_on_a_healthy_node() -> None:
    sc = Scenario(nodes=N3, vms=(VmDef("ha1", 256, ha(), "n1"), VmDef("ha2", 256, ha(), "n2"),
                                 VmDef("vm1", 256, None, "n3")),
                  faults=(Fault(5.0, "etcd", "", 8.0),), heal_at=14.0)
    r = ok(simulate(sc, seed=1))
    assert r.spurious_kills == 0, r.report()


@pytest.mark.parametrize("fault", [Fault(3.0, "crash", "n1", 0.5),  # a routine restart
                                   Fault(2.0, "isolate", "n1", 6.0)])  # a short cut-off
def test_bug5_restart_elsewhere_while_still_stopping(fault: Fault) -> None:
    """Then stop (the guest takes 5 s to shut down) and start again: on the emptier n2."""
    sc = Scenario(nodes=("n1", "n2"), vms=(VmDef("vm1", 256, None, "n1"),
                                           VmDef("vm2", 512, None, "n1")),
                  latency=Latency(stop=(5.0, 5.0)),
                  faults=(fault, Fault(5.5, "stop", "vm1"), Fault(9.0, "start", "vm1")),
                  heal_at=16.0)
    ok(simulate(sc, seed=1, masks=Masks.none()))


# -- the checks can fail: unsafe variants of the code are caught ---------------------------

def _first_failure(chaos: Chaos, seeds: int) -> Result:
    totals = run_seeds(range(seeds), chaos, workers=1, stop_after=1)
    assert totals.failures, f"no violation found in {totals}"
    return totals.failures[0]


def test_catches_a_fence_delay_shorter_than_the_watchdog(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No fence delay and a watchdog slower than the lease: a frozen node's VM runs twice."""
    monkeypatch.setattr(recovery, "fence_delay", lambda info, base: 0.0)
    chaos = Chaos(kinds=("freeze", "power"), timing=Timing(watchdog_s=6.0))
    bad = _first_failure(chaos, 200)
    assert "while it still runs on" in bad.violations[0], bad.report()
    # without check (3), check (1) sees the two copies
    sim = Simulation(bad.scenario, seed=bad.seed or 0, masks=chaos.masks)
    sim.manager_txn_after = lambda *args: None  # type: ignore[method-assign]
    again = asyncio.run(sim.run())
    assert any("runs twice" in v for v in again.violations), again.report()


def test_catches_a_node_that_does_not_fence_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease guard that never expires: a node cut off keeps its VMs and feeds its
    watchdog while they restart elsewhere."""
    monkeypatch.setattr(lease.LeaseGuard, "valid",
                        lambda self: self.state is lease.LeaseState.VALID)
    bad = _first_failure(Chaos(kinds=("isolate",)), 200)
    assert "while it still runs on" in bad.violations[0], bad.report()


def test_catches_a_manager_write_without_its_term_guard(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard that always holds: a manager acting on a stale view after it lost the
    manager key writes anyway."""
    monkeypatch.setattr(manager.Manager, "_guard", lambda self: Compare(
        self.keys.manager, Target.CREATE, Op.GREATER, -1))
    bad = _first_failure(Chaos(kinds=("isolate", "freeze", "etcd")), 600)
    assert "wrote as manager while" in bad.violations[0], bad.report()


def test_same_seed_same_run() -> None:
    a, b = run_one(7), run_one(7)
    assert a.trace == b.trace and a.steps == b.steps and a.trace


def test_fence_delay_covers_the_published_watchdog() -> None:
    """The simulated nodes publish their watchdog timeout; the manager waits longer."""
    info = NodeInfo(name="n1", cluster_address="", migration_addresses=(), bridge="",
                    memory_mib=0, cpus=1, accel="tcg", version="", started_at=0.0,
                    watchdog_s=T.watchdog_s)
    assert recovery.fence_delay(info, T.fence_delay_s) >= T.watchdog_s + recovery.KILL_S
