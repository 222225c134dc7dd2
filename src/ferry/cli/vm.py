"""ferry vm / node / migration."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import click

from ferry.cli.connect import with_cluster
from ferry.cli.output import ago, clock, emit_json, rate, size, table
from ferry.cli.progress import progress_line, summary_line, watch
from ferry.control import migrations as migs
from ferry.control import nodes as nodes_ctl
from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.migration.scheduler import is_queued
from ferry.model.errors import FerryError, InvalidSpec, MigrationFailed
from ferry.model.ha import HaPolicy, HaPriority
from ferry.model.migration import MigrationOptions, MigrationPhase, MigrationRecord
from ferry.model.policy import MigrationLimits
from ferry.model.vm import parse_size

json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
def node() -> None:
    """Cluster nodes."""


@node.command("list")
@json_opt
def node_list(as_json: bool) -> None:
    """The nodes, whether they are up, and their VMs."""
    views = asyncio.run(with_cluster(nodes_ctl.list_nodes))
    if as_json:
        emit_json(views)
        return
    table(["NODE", "STATE", "CLUSTER ADDRESS", "ACCEL", "MEMORY USED", "VMS"],
          [[v.info.name, v.state.value, v.info.cluster_address, v.info.accel,
            f"{v.memory_used_mib}/{v.info.memory_mib} MiB", ",".join(v.vms) or "-"]
           for v in views])


@click.group()
def vm() -> None:
    """Virtual machines."""


@vm.command("create")
@click.argument("name")
@click.option("--memory", default="256M", show_default=True, help="RAM, e.g. 256M or 1G.")
@click.option("--vcpus", default=1, show_default=True, type=int)
@click.option("--disk-size", default="1G", show_default=True)
@click.option("--volume", default=None, help="Shared volume (default: the cluster's).")
@click.option("--ha", is_flag=True, help="Highly available: restarted elsewhere if its node dies.")
@click.option("--priority", type=click.Choice([p.value for p in HaPriority]), default="medium",
              show_default=True, help="HA recovery priority (with --ha).")
@click.option("--preferred-nodes", default="", help="HA: nodes to prefer, e.g. node2,node3.")
@click.option("--kernel-args", default="", help="Extra kernel command line (direct boot).")
@json_opt
def vm_create(name: str, memory: str, vcpus: int, disk_size: str, volume: str | None,
              ha: bool, priority: str, preferred_nodes: str, kernel_args: str,
              as_json: bool) -> None:
    """Create a VM (stopped) with a new disk on a shared volume."""
    mem = parse_size(memory) // 2**20
    disk = parse_size(disk_size, default_unit="G")
    policy = HaPolicy(priority=HaPriority(priority),
                      preferred_nodes=split_nodes(preferred_nodes)) if ha else None
    if not ha and (preferred_nodes or priority != "medium"):
        raise InvalidSpec("--priority and --preferred-nodes need --ha")

    async def go(cl: ClusterClient) -> vms_ctl.VmView:
        await vms_ctl.create_vm(cl, name, memory_mib=mem, vcpus=vcpus, disk_size=disk,
                                volume=volume, ha=policy, kernel_args=kernel_args)
        return await vms_ctl.show_vm(cl, name)

    view = asyncio.run(with_cluster(go))
    if as_json:
        emit_json(view)
    else:
        click.echo(f"created {name}: {mem} MiB, {vcpus} vCPU, disk {size(disk)} on"
                   f" {view.volume}{', ip ' + view.ip if view.ip else ''}"
                   f"{', HA ' + priority if ha else ''}")


def split_nodes(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


@vm.command("start")
@click.argument("name")
@click.option("--node", "node_name", default=None, help="Node to run on (default: best fit).")
@click.option("--no-wait", is_flag=True)
@click.option("--force", is_flag=True,
              help="Start it elsewhere although its last node is down (only if that node is"
                   " known to be off: it might still run the VM).")
def vm_start(name: str, node_name: str | None, no_wait: bool, force: bool) -> None:
    """Start a stopped VM."""
    async def go(cl: ClusterClient) -> str:
        token = await vms_ctl.start_vm(cl, name, node=node_name, force=force)
        if no_wait:
            owner, _ = await cl.owner(name)
            return f"starting {name} on {owner.node}"
        view = await vms_ctl.wait_started(cl, name, token=token)
        return f"{name} is running on {view.node} (pid {view.pid})"

    click.echo(asyncio.run(with_cluster(go)))


@vm.command("stop")
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop at once, without asking the guest.")
@click.option("--no-wait", is_flag=True)
def vm_stop(name: str, force: bool, no_wait: bool) -> None:
    """Stop a VM (ACPI power-off; --force pulls the plug)."""
    async def go(cl: ClusterClient) -> None:
        await vms_ctl.stop_vm(cl, name, force=force)
        if not no_wait:
            await vms_ctl.wait_stopped(cl, name)

    asyncio.run(with_cluster(go))
    click.echo(f"{name} {'is stopping' if no_wait else 'stopped'}")


@vm.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop it at once first if it runs.")
def vm_delete(name: str, force: bool) -> None:
    """Delete a stopped VM and its files."""
    op = vms_ctl.destroy_vm if force else vms_ctl.delete_vm
    asyncio.run(with_cluster(lambda cl: op(cl, name)))
    click.echo(f"deleted {name}")


@vm.command("list")
@json_opt
def vm_list(as_json: bool) -> None:
    """All VMs with their state and node."""
    views = asyncio.run(with_cluster(vms_ctl.list_vms))
    if as_json:
        emit_json(views)
        return
    table(["NAME", "STATE", "NODE", "IP", "MEMORY", "VCPUS", "UP", "HA", "MIGRATION"],
          [[v.name, v.state.value, v.node, v.ip, f"{v.memory_mib} MiB", v.vcpus, ago(v.since),
            v.ha.priority.value if v.ha else None,
            f"{v.migration} -> {v.target}" if v.migration else None] for v in views])


def ha_text(view: vms_ctl.VmView) -> str | None:
    if view.ha is None:
        return None
    prefers = f", prefers {','.join(view.ha.preferred_nodes)}" if view.ha.preferred_nodes else ""
    armed = "armed" if view.ha_armed else "not armed yet"
    return f"{view.ha.priority.value} priority{prefers} ({armed})"


@vm.command("show")
@click.argument("name")
@json_opt
def vm_show(name: str, as_json: bool) -> None:
    """One VM in detail."""
    view = asyncio.run(with_cluster(lambda cl: vms_ctl.show_vm(cl, name)))
    if as_json:
        emit_json(view)
        return
    for k, v in [("name", view.name), ("state", view.state.value), ("node", view.node),
                 ("ip", view.ip), ("memory", f"{view.memory_mib} MiB"), ("vcpus", view.vcpus),
                 ("pid", view.pid), ("since", clock(view.since)), ("volume", view.volume),
                 ("disk", view.disk), ("migration", view.migration), ("ha", ha_text(view)),
                 ("start", view.start_action.value), ("detail", view.detail)]:
        if v not in (None, ""):
            click.echo(f"{k:>10}: {v}")


def _migrate(names: tuple[str, ...], *, to: str, no_wait: bool, options: MigrationOptions
             ) -> None:
    async def go(cl: ClusterClient) -> None:
        recs = await migs.request_migrations(cl, names, to=to, options=options)
        await _requested(cl, recs, no_wait=no_wait)

    asyncio.run(with_cluster(go))


async def _requested(cl: ClusterClient, recs: Sequence[MigrationRecord], *,
                     no_wait: bool) -> None:
    """Say what was queued (and where it stands); unless ``no_wait``, follow every migration
    to its end: one alone with its live progress, several with a line as each starts and
    its summary as it ends. Raises if any did not complete."""
    places = await migs.migration_queue(cl)
    for rec in recs:
        place = places.get(rec.id)
        waits = f" (queued #{place.position}: {place.why})" if place and place.position else ""
        click.echo(f"migration {rec.id}: {rec.vm} {rec.source} -> {rec.target}"
                   f"{' queued' if no_wait and not waits else ''}{waits}")
    if no_wait or not recs:
        return
    if len(recs) == 1:
        finals = [await watch(cl, recs[0].id)]
        click.echo(summary_line(finals[0]))
    else:
        finals = list(await asyncio.gather(*(_follow_one(cl, r) for r in recs)))
    failed = [r for r in finals if r.phase is not MigrationPhase.COMPLETED]
    if len(finals) == 1 and failed:
        final = failed[0]
        raise MigrationFailed(final.timeline[-1].phase.value if final.timeline else "?",
                              final.error or final.phase.value)
    if failed:
        raise FerryError(f"{len(failed)} of {len(finals)} migrations did not complete: "
                         + ", ".join(f"{r.vm} ({r.phase.value})" for r in failed))


async def _follow_one(cl: ClusterClient, rec: MigrationRecord) -> MigrationRecord:
    """One of several followed at once: a line when it starts, its summary when it ends."""
    started = not is_queued(rec)
    async for view in migs.follow(cl, rec.id):
        rec = view.record
        if not started and not is_queued(rec):
            started = True
            click.echo(f"  {rec.vm}: started ({_waited(rec)})")
    click.echo(summary_line(rec))
    return rec


def _waited(rec: MigrationRecord) -> str:
    if rec.admitted_at is None:
        return "admitted"
    return f"after {max(0.0, rec.admitted_at - rec.created_at):.1f} s in the queue"


def _options(bandwidth: str | None, *, downtime_ms: int, priority: int,
             network: str | None = None, allow_gateway: bool = False) -> MigrationOptions:
    bw = parse_size(bandwidth) if bandwidth else 0
    return MigrationOptions(max_bandwidth=bw, downtime_limit_ms=downtime_ms, priority=priority,
                            network=network, allow_gateway=allow_gateway)


priority_opt = click.option(
    "--priority", default=0, show_default=True, type=int,
    help="Queue priority: higher starts first when the migration limits make them wait.")


def _migrate_command(fn_name: str, help_text: str) -> click.Command:
    @click.command(fn_name, help=help_text)
    @click.argument("names", metavar="NAME...", nargs=-1, required=True)
    @click.option("--to", "to", required=True, help="Target node.")
    @click.option("--no-wait", is_flag=True, help="Queue them and return their ids.")
    @click.option("--bandwidth", default=None, help="Limit, e.g. 100M (bytes/s).")
    @click.option("--downtime-ms", default=MigrationOptions().downtime_limit_ms,
                  show_default=True, type=int,
                  help="Longest pause QEMU may take to switch over.")
    @priority_opt
    @click.option("--network", default=None,
                  help="Use this migration network only (default: the priority order).")
    @click.option("--allow-gateway", is_flag=True,
                  help="Permit a network that has a default gateway.")
    def command(names: tuple[str, ...], to: str, no_wait: bool, bandwidth: str | None,
                downtime_ms: int, priority: int, network: str | None,
                allow_gateway: bool) -> None:
        _migrate(names, to=to, no_wait=no_wait,
                 options=_options(bandwidth, downtime_ms=downtime_ms, priority=priority,
                                  network=network, allow_gateway=allow_gateway))

    return command


vm.add_command(_migrate_command(
    "migrate", "Live-migrate running VMs to another node: each its own migration, all requested"
    " at once; they start within the cluster's migration limits (`ferry migration limits`)."))
vm.add_command(_migrate_command("move", "Same as migrate."))


@click.group()
def migration() -> None:
    """Live migrations."""


@migration.command("list")
@json_opt
def migration_list(as_json: bool) -> None:
    """Migrations in request order; those not started with their place in the queue and
    why they wait."""
    rows = asyncio.run(with_cluster(migs.list_with_queue))
    if as_json:
        emit_json(rows)
        return
    table(["ID", "VM", "FROM", "TO", "PHASE", "REQUESTED", "TOTAL", "DOWNTIME", "NOTE"],
          [[r.id, r.vm, r.source, r.target, _phase(r, x.queue), clock(r.created_at),
            f"{r.summary.total_s:.2f}s" if r.summary and r.phase.terminal else None,
            f"{r.summary.downtime_ms} ms" if r.summary and r.phase.terminal else None,
            (x.queue.why if x.queue else r.error) or None]
           for x in rows for r in (x.record,)])


def _phase(rec: MigrationRecord, queue: migs.QueuePlace | None) -> str:
    if queue is not None and queue.position:
        return f"{rec.phase.value} #{queue.position}"
    return rec.phase.value


@migration.command("show")
@click.argument("mid")
@json_opt
def migration_show(mid: str, as_json: bool) -> None:
    """A migration's phases with timestamps, progress and outcome."""
    view = asyncio.run(with_cluster(lambda cl: migs.show_migration(cl, mid)))
    if as_json:
        emit_json(view)
        return
    r = view.record
    click.echo(f"migration {r.id}: {r.vm} {r.source} -> {r.target}, {r.phase.value}"
               f"{' (network ' + r.network + ')' if r.network else ''}")
    t0 = r.created_at
    table(["+MS", "TIME", "PHASE", "NODE", "NOTE"],
          [[f"{(e.at - t0) * 1000:8.1f}", clock(e.at), e.phase.value, e.node, e.note]
           for e in r.timeline])
    if view.queue is not None:
        place = f"#{view.queue.position} in the queue" if view.queue.position else "queued"
        click.echo(f"{place}: {view.queue.why}")
    if view.progress is not None and not r.phase.terminal:
        click.echo("progress: " + progress_line(view))
    if r.committed_at:
        click.echo(f"point of no return passed at {clock(r.committed_at)}")
    if r.summary is not None and r.phase is MigrationPhase.COMPLETED:
        s = r.summary
        click.echo(f"total {s.total_s:.3f} s, QEMU {s.qemu_total_ms} ms, downtime"
                   f" {s.downtime_ms} ms, switchover "
                   f"{'-' if s.switchover_ms is None else f'{s.switchover_ms:.1f} ms'},"
                   f" {size(s.bytes_sent)} at {rate(s.throughput_bps)}")
    if r.error:
        click.echo(f"error: {r.error}")


@migration.command("cancel")
@click.argument("mid")
@click.option("--no-wait", is_flag=True)
def migration_cancel(mid: str, no_wait: bool) -> None:
    """Cancel a migration; the VM stays on its source."""
    async def go(cl: ClusterClient) -> str:
        rec = await migs.cancel_migration(cl, mid)
        if no_wait:
            return f"cancel of {mid} requested"
        final = await watch(cl, rec.id, quiet=True)
        return summary_line(final)

    click.echo(asyncio.run(with_cluster(go)))


@migration.command("limits")
@click.option("--per-source", type=int, default=None,
              help="Migrations at once out of one node.")
@click.option("--per-target", type=int, default=None,
              help="Migrations at once into one node.")
@click.option("--per-cluster", type=int, default=None, help="Migrations at once in all.")
@json_opt
def migration_limits(per_source: int | None, per_target: int | None,
                     per_cluster: int | None, as_json: bool) -> None:
    """Show or set how many migrations run at once; the rest wait in the queue."""
    async def go(cl: ClusterClient) -> MigrationLimits:
        if (per_source, per_target, per_cluster) == (None, None, None):
            return await migs.migration_limits(cl)
        return await migs.set_migration_limits(cl, per_source=per_source,
                                               per_target=per_target, per_cluster=per_cluster)

    limits = asyncio.run(with_cluster(go))
    if as_json:
        emit_json(limits)
        return
    click.echo(f"per source {limits.per_source}, per target {limits.per_target},"
               f" per cluster {limits.per_cluster}")


@node.command("drain")
@click.argument("name")
@click.option("--no-wait", is_flag=True, help="Queue the migrations and return.")
@priority_opt
def node_drain(name: str, no_wait: bool, priority: int) -> None:
    """Pause NAME and live-migrate each of its running VMs to the best other node."""
    options = MigrationOptions(priority=priority)

    async def go(cl: ClusterClient) -> None:
        drain = await migs.drain_node(cl, name, options=options)
        click.echo(f"{name} is paused" if drain.paused else f"{name} was paused already")
        for vm_name in drain.already:
            click.echo(f"{vm_name} is already migrating: left to that migration")
        for vm_name, mid in drain.incoming:
            click.echo(f"warning: {vm_name} is on its way to {name} (migration {mid}):"
                       " cancel it, or drain again once it has arrived")
        if not drain.migrations:
            click.echo(f"no VM to move off {name}")
        await _requested(cl, drain.migrations, no_wait=no_wait)
        if not no_wait and drain.migrations:
            click.echo(f"{name} is drained")

    asyncio.run(with_cluster(go))
