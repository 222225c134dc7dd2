"""The source's steering: which policy applies, how QEMU is set up, how steps are carried
out and noted. QEMU and the store are fakes; the clock is the samples' (nothing sleeps)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, cast

import pytest

from ferry.agent import steering
from ferry.agent.steering import (
    DECIDE_S,
    INERT_THROTTLE,
    Steering,
    capabilities,
    describe_setup,
    parameters,
    policy_for,
    throttle_parameters,
)
from ferry.migration.convergence import (
    Continue,
    Engine,
    GiveUp,
    PauseAndFinish,
    SetDowntime,
    Throttle,
)
from ferry.migration.policy import setup
from ferry.model import codec
from ferry.model.cluster import ClusterConfig
from ferry.model.errors import MigrationFailed
from ferry.model.migration import (
    MigrationOptions,
    MigrationPhase,
    MigrationProgress,
    MigrationRecord,
)
from ferry.model.policy import MigrationPolicy, PolicyKind
from ferry.model.vm import VmSpec
from ferry.store.base import Entry

MiB = 2**20
SPEC = VmSpec(name="vm1", uid="0123456789ab", memory_mib=256, vcpus=1, volume="v",
              config_path="/v/vm1/vm.json", disks=(), nics=())


class FakeMonitor:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def set_parameters(self, params: dict[str, object]) -> None:
        self.calls.append(("set", dict(params)))

    async def stop(self) -> None:
        self.calls.append(("stop", None))


class FakeCtx:
    node = "node1"

    def __init__(self, rec: MigrationRecord, *, cluster: MigrationPolicy | None = None,
                 vm: MigrationPolicy | None = None) -> None:
        self.rec = rec
        self.keys = SimpleNamespace(cluster_config="/c/config/cluster")
        entries = {}
        if cluster is not None:
            value = codec.encode(ClusterConfig(name="c", migration_policy=cluster))
            entries[self.keys.cluster_config] = Entry(self.keys.cluster_config, value, 1, 1, 1)
        spec = dataclasses.replace(SPEC, migration_policy=vm)
        self.view = SimpleNamespace(entries=entries, spec=lambda name: spec)

    async def update_record(self, mid: str, change: Any) -> MigrationRecord:
        self.rec = change(self.rec)
        return self.rec


def record(options: MigrationOptions = MigrationOptions()) -> MigrationRecord:
    return MigrationRecord(id="m1", vm="vm1", source="node1", target="node2",
                           phase=MigrationPhase.COPYING_MEMORY, created_at=0.0, options=options)


def sample(it: int, *, t: float, sent: int, left: int) -> MigrationProgress:
    return MigrationProgress(
        at=t, status="active", elapsed_ms=int(t * 1000) + 1, ram_total=256 * MiB,
        ram_transferred=sent, ram_remaining=left, throughput_bps=0.0, dirty_rate_pps=0,
        page_size=4096, expected_downtime_ms=0, iterations=it)


def make(policy: MigrationPolicy, engine: Engine | None = None
         ) -> tuple[Steering, FakeCtx, FakeMonitor]:
    ctx = FakeCtx(record())
    mon = FakeMonitor()
    local = SimpleNamespace(monitor=mon, meta=SimpleNamespace(spec=SPEC))
    s = Steering(cast(Any, ctx), ctx.rec, cast(Any, local), policy,
                 engine or setup(policy, 256 * MiB).engine, started_at=0.0)
    return s, ctx, mon


def notes(ctx: FakeCtx) -> list[str]:
    return [e.note for e in ctx.rec.timeline]


# --- which policy, and QEMU's set-up --------------------------------------------------


def test_policy_comes_from_the_migration_then_the_vm_then_the_cluster() -> None:
    cluster = MigrationPolicy(budget_s=3)
    vm = MigrationPolicy(budget_s=2)
    mine = MigrationPolicy(budget_s=1)
    local = cast(Any, SimpleNamespace(meta=SimpleNamespace(spec=SPEC)))
    ctx = FakeCtx(record(), cluster=cluster)
    assert policy_for(cast(Any, ctx), ctx.rec, local) == cluster
    ctx = FakeCtx(record(), cluster=cluster, vm=vm)
    assert policy_for(cast(Any, ctx), ctx.rec, local) == vm
    rec = record(MigrationOptions(policy=mine))
    assert policy_for(cast(Any, FakeCtx(rec, cluster=cluster, vm=vm)), rec, local) == mine
    assert policy_for(cast(Any, FakeCtx(record())), record(), local) == MigrationPolicy()


def test_a_malformed_cluster_config_falls_back_to_the_default() -> None:
    ctx = FakeCtx(record())
    ctx.view.entries[ctx.keys.cluster_config] = Entry(ctx.keys.cluster_config, "{", 1, 1, 1)
    local = cast(Any, SimpleNamespace(meta=SimpleNamespace(spec=SPEC)))
    assert policy_for(cast(Any, ctx), ctx.rec, local) == MigrationPolicy()


def test_every_capability_is_set_on_or_off() -> None:
    s = setup(MigrationPolicy(allow_postcopy=True, allow_throttle=False), 256 * MiB)
    assert capabilities(s) == {"events": True, "auto-converge": False, "postcopy-ram": True,
                               "xbzrle": False}
    prox = setup(MigrationPolicy(kind=PolicyKind.PROXMOX), 256 * MiB)
    assert capabilities(prox)["xbzrle"] and capabilities(prox)["auto-converge"]


def test_parameters_start_unlimited_with_throttling_held_back() -> None:
    p = parameters(setup(MigrationPolicy(), 256 * MiB))
    assert p["max-bandwidth"] == steering.UNLIMITED_BANDWIDTH and p["downtime-limit"] == 50
    assert all(p[k] == v for k, v in INERT_THROTTLE.items())
    assert "max-postcopy-bandwidth" not in p and "xbzrle-cache-size" not in p
    capped = parameters(setup(MigrationPolicy(max_bandwidth=16 * MiB, allow_postcopy=True),
                              256 * MiB))
    assert capped["max-bandwidth"] == capped["max-postcopy-bandwidth"] == 16 * MiB
    prox = parameters(setup(MigrationPolicy(kind=PolicyKind.PROXMOX), 256 * MiB))
    assert prox["xbzrle-cache-size"] == 32 * MiB and prox["cpu-throttle-initial"] == 20


def test_throttle_parameters_pin_qemu_to_the_asked_level() -> None:
    p = throttle_parameters(Throttle(55, "x", initial_pct=55, increment_pct=35))
    assert p == {"throttle-trigger-threshold": 50, "cpu-throttle-initial": 55,
                 "cpu-throttle-increment": 35, "max-cpu-throttle": 55,
                 "cpu-throttle-tailslow": False}
    assert throttle_parameters(Throttle(40, "x"))["cpu-throttle-increment"] == 40


def test_the_setup_is_described_for_the_timeline() -> None:
    policy = MigrationPolicy(max_bandwidth=64 * MiB, allow_postcopy=True)
    text = describe_setup(policy, setup(policy, 256 * MiB))
    assert text == ("policy adaptive: max downtime 300 ms, budget 120 s, may throttle,"
                    " post-copy, pause; starts at downtime 50 ms, bandwidth 64 MiB/s")


# --- carrying out steps ----------------------------------------------------------------


async def test_set_downtime_and_throttle_reach_qemu_and_the_timeline() -> None:
    s, ctx, mon = make(MigrationPolicy())
    await s.apply(SetDowntime(240, "fits"))
    await s.apply(Throttle(60, "hot", initial_pct=60, increment_pct=60))
    assert mon.calls[0] == ("set", {"downtime-limit": 240})
    assert mon.calls[1][1] == throttle_parameters(Throttle(60, "x", initial_pct=60,
                                                           increment_pct=60))
    assert notes(ctx) == ["policy: downtime limit -> 240 ms: fits",
                          "policy: throttle guest to 60%: hot"]


async def test_pause_stops_the_guest_then_lets_qemu_switch_over() -> None:
    s, ctx, mon = make(MigrationPolicy())
    await s.apply(PauseAndFinish(1200, "no other way"))
    assert mon.calls == [("stop", None), ("set", {"downtime-limit": 1200})]
    assert notes(ctx) == ["policy: pause the guest and finish: no other way"]


async def test_give_up_fails_the_migration_with_the_reason() -> None:
    s, ctx, mon = make(MigrationPolicy())
    with pytest.raises(MigrationFailed) as err:
        await s.apply(GiveUp("nothing allowed converges"))
    assert err.value.reason == "policy: give up: nothing allowed converges"
    assert mon.calls == []


async def test_continue_is_noted_once_per_topic_and_never_when_quiet() -> None:
    s, ctx, mon = make(MigrationPolicy())
    for step in (Continue("a", topic="t1"), Continue("b", topic="t1"),
                 Continue("c", topic="t2"), Continue("d", topic="t3", quiet=True),
                 SetDowntime(100, "e"), Continue("f", topic="t2")):
        await s.apply(step)
    assert notes(ctx) == ["policy: continue: a", "policy: continue: c",
                          "policy: downtime limit -> 100 ms: e", "policy: continue: f"]


async def test_the_policy_is_asked_each_pass_and_now_and_then_between() -> None:
    policy = MigrationPolicy(allow_throttle=False, allow_pause=False, budget_s=2.0)
    s, ctx, mon = make(policy)
    await s.observe(sample(1, t=0.1, sent=0, left=128 * MiB), 0.1)
    assert s.decided_at == 0.1
    await s.observe(sample(1, t=0.5, sent=32 * MiB, left=96 * MiB), 0.5)
    assert s.decided_at == 0.1, "mid-pass, not yet DECIDE_S later"
    await s.observe(sample(1, t=0.1 + DECIDE_S, sent=64 * MiB, left=64 * MiB), 0.1 + DECIDE_S)
    assert s.decided_at == 0.1 + DECIDE_S
    with pytest.raises(MigrationFailed, match="budget of 2 s is spent"):
        await s.observe(sample(2, t=2.5, sent=128 * MiB, left=96 * MiB), 2.5)
    assert [p.iterations for p in s.passes] == [1, 2]
