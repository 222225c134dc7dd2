"""Pure: which queued migrations may start now, and why the others wait.

A requested migration is QUEUED without ``admitted_at``; the elected cluster manager admits
it (sets ``admitted_at``) and only then does its source node drive it. Every migration that
is admitted or already past QUEUED (records from before the scheduler existed, too) counts
as *running* against the limits until it ends.

The rules:
- order: priority (higher first); within one priority, round-robin across source nodes
  (round k takes the k-th oldest waiting migration of every source, older first), so a
  drain of one node does not starve the migrations of another; oldest first within a source;
- walk that order and admit each migration that fits the outbound limit of its source,
  the inbound limit of its target and the cluster's limit, counting those admitted before it;
- work-conserving: one that does not fit does not hold back later ones that do, except
  that a migration never takes a node's slot that a waiting migration of *higher*
  priority needs (else a stream of low-priority migrations to a busy target could keep a
  high-priority one waiting for ever);
- a migration whose source or target node is down waits (its source could not drive it).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from ferry.model.migration import MigrationPhase, MigrationRecord
from ferry.model.policy import MigrationLimits


def is_queued(rec: MigrationRecord) -> bool:
    """Waiting for the scheduler: requested, not yet admitted."""
    return rec.phase is MigrationPhase.QUEUED and rec.admitted_at is None


def is_running(rec: MigrationRecord) -> bool:
    """Counts against the limits: admitted (or past QUEUED) and not ended."""
    return not rec.phase.terminal and not is_queued(rec)


@dataclass(frozen=True)
class Waiting:
    position: int  # 1: the next in line
    why: str


@dataclass(frozen=True)
class Schedule:
    admit: tuple[MigrationRecord, ...]  # in queue order
    waiting: Mapping[str, Waiting]  # migration id -> its place and reason
    running: int  # after admitting ``admit``


class Direction(enum.Enum):
    OUT = "outbound"
    IN = "inbound"


@dataclass
class _Slots:
    """Running migrations by node and direction, as the walk admits more (local to one
    ``schedule`` call)."""

    by_node: dict[tuple[Direction, str], list[MigrationRecord]] = field(default_factory=dict)
    total: int = 0

    def add(self, rec: MigrationRecord) -> None:
        self.by_node.setdefault((Direction.OUT, rec.source), []).append(rec)
        self.by_node.setdefault((Direction.IN, rec.target), []).append(rec)
        self.total += 1

    def on(self, direction: Direction, node: str) -> list[MigrationRecord]:
        return self.by_node.get((direction, node), [])


def queue_order(queued: Iterable[MigrationRecord]) -> list[MigrationRecord]:
    """Priority first, then round-robin across sources, oldest first within a source."""
    by_priority: dict[int, dict[str, list[MigrationRecord]]] = {}
    for rec in queued:
        by_priority.setdefault(rec.options.priority, {}).setdefault(rec.source, []).append(rec)
    order: list[MigrationRecord] = []
    for priority in sorted(by_priority, reverse=True):
        lanes = [sorted(recs, key=_age) for recs in by_priority[priority].values()]
        for k in range(max(len(lane) for lane in lanes)):
            order.extend(sorted((lane[k] for lane in lanes if k < len(lane)), key=_age))
    return order


def _age(rec: MigrationRecord) -> tuple[float, str, str]:
    return rec.created_at, rec.source, rec.id


def schedule(records: Iterable[MigrationRecord], limits: MigrationLimits, *,
             down: Collection[str] = ()) -> Schedule:
    """Which queued migrations to admit now (never exceeding ``limits``), and for every
    other queued one its position and why it waits. ``down``: nodes that are not up."""
    records = list(records)
    slots = _Slots()
    for rec in records:
        if is_running(rec):
            slots.add(rec)
    held: dict[tuple[Direction, str], MigrationRecord] = {}
    admit: list[MigrationRecord] = []
    blocked: list[tuple[MigrationRecord, str]] = []
    for rec in queue_order(r for r in records if is_queued(r)):
        reasons = _down(rec, down)
        if not reasons:
            reasons = _full(rec, slots, limits=limits) + _held(rec, held)
            if reasons:
                # Its nodes are kept for it against lower priorities (see the rules above).
                for side in ((Direction.OUT, rec.source), (Direction.IN, rec.target)):
                    held.setdefault(side, rec)
        if reasons:
            blocked.append((rec, "; ".join(reasons)))
        else:
            admit.append(rec)
            slots.add(rec)
    waiting = {rec.id: Waiting(position=i, why=why)
               for i, (rec, why) in enumerate(blocked, start=1)}
    return Schedule(admit=tuple(admit), waiting=waiting, running=slots.total)


def _down(rec: MigrationRecord, down: Collection[str]) -> list[str]:
    return [f"{role} {node} is down" for role, node in (("source", rec.source),
                                                          ("target", rec.target))
            if node in down]


def _full(rec: MigrationRecord, slots: _Slots, *, limits: MigrationLimits) -> list[str]:
    reasons = []
    for direction, node, limit in ((Direction.OUT, rec.source, limits.per_source),
                                   (Direction.IN, rec.target, limits.per_target)):
        running = slots.on(direction, node)
        if len(running) >= limit:
            reasons.append(f"{node} has {_count(len(running), direction.value + ' migration')}"
                           f" running (limit {limit}): {_names(running)}")
    if slots.total >= limits.per_cluster:
        reasons.append(f"{_count(slots.total, 'migration')} running in the cluster"
                       f" (limit {limits.per_cluster})")
    return reasons


def _held(rec: MigrationRecord, held: Mapping[tuple[Direction, str], MigrationRecord]
          ) -> list[str]:
    reasons = []
    for direction, node in ((Direction.OUT, rec.source), (Direction.IN, rec.target)):
        first = held.get((direction, node))
        if first is not None and first.options.priority > rec.options.priority:
            reasons.append(f"{node}'s {direction.value} slot is kept for {first.vm}"
                           f" (migration {first.id}, priority {first.options.priority})")
    return reasons


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(recs: list[MigrationRecord], most: int = 3) -> str:
    names = [r.vm for r in recs[:most]]
    return ", ".join(names) + (f" and {len(recs) - most} more" if len(recs) > most else "")
