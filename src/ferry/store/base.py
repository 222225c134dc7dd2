"""The cluster store contract: what Ferry needs of etcd, written down.

Two implementations: ``EtcdStore`` (etcd 3.4 over its JSON gateway) and ``MemoryStore``
(an in-memory fake with the same semantics, for unit tests). Both pass the same contract
tests (tests/unit/test_store_contract.py against the fake, tests/lab against real etcd).

Semantics (those of etcd):
- Every successful write (put, delete that deletes something, successful txn with writes)
  increases the store's revision by one. An entry remembers ``create_revision`` (the
  revision that created it), ``mod_revision`` (the last write) and ``version`` (writes
  since creation).
- ``txn`` is atomic: either all compares hold and every ``success`` op applies at one new
  revision, or none of them do and the ``failure`` ops apply instead. This is the only
  compare-and-swap primitive; ``create`` and ``cas`` below are built on it.
- Reads are linearizable.
- A key put with a lease is deleted when the lease expires or is revoked. A put with a lease
  that no longer exists raises LeaseExpired and changes nothing.
- ``watch`` yields batches of events after ``start_revision`` (inclusive), in revision
  order, without gaps. If that revision was compacted it raises Compacted: re-list.
  ``start_revision=0`` means "from the next revision on". A batch holds whole revisions but
  may hold several (a watch catching up gets its backlog at once). A DELETE event has an
  empty value and create_revision 0; a lease's keys are deleted at one revision, in key
  order. The iterator holds a server stream: stop it by cancelling the consuming task, or
  ``aclose()`` it (both stores return async generators); after a mere ``break`` it closes
  only once garbage-collected (at once in CPython, unless something still refers to it).
- A write that changes nothing (deleting an absent key, revoking a lease without keys, a
  txn branch without effect) takes no new revision.
- In a txn, a VALUE compare on a missing key is false whatever its op; the other targets
  see a missing key as 0. A branch that puts a key twice, or puts and deletes it, is
  rejected with StoreError (both branches are checked, whichever runs).

Errors: every method raises StoreError (a FerryError) when the store cannot be reached or
answers with an error; LeaseExpired for a dead lease. Never anything else.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class Target(enum.Enum):
    """What a Compare looks at."""

    VALUE = "VALUE"
    MOD = "MOD"
    CREATE = "CREATE"
    VERSION = "VERSION"
    LEASE = "LEASE"


class Op(enum.Enum):
    EQUAL = "EQUAL"
    NOT_EQUAL = "NOT_EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction. A missing key has create/mod revision and version 0."""

    key: str
    target: Target
    op: Op
    value: int | str

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, Target.CREATE, Op.EQUAL, 0)

    @staticmethod
    def exists(key: str) -> Compare:
        return Compare(key, Target.CREATE, Op.GREATER, 0)

    @staticmethod
    def unchanged(key: str, mod_revision: int) -> Compare:
        """The key's last write is ``mod_revision`` (0: the key does not exist)."""
        return Compare(key, Target.MOD, Op.EQUAL, mod_revision)

    @staticmethod
    def value_is(key: str, value: str) -> Compare:
        return Compare(key, Target.VALUE, Op.EQUAL, value)


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


TxnOp = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    key: str
    value: str
    mod_revision: int
    create_revision: int = 0


class ClusterStore(Protocol):
    async def get(self, key: str) -> Entry | None:
        """The entry at ``key``, or None."""
        ...

    async def get_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        """All entries under ``prefix`` sorted by key, and the store revision of the read."""
        ...

    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """Unconditional write; returns the new revision. LeaseExpired if ``lease`` is dead."""
        ...

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many were deleted."""
        ...

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        """Atomic compare-and-swap; see the module docstring."""
        ...

    async def grant_lease(self, ttl: int) -> int:
        """A new lease living ``ttl`` seconds unless kept alive; returns its id."""
        ...

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease`` to its full TTL; returns the TTL. LeaseExpired if it is gone."""
        ...

    async def revoke_lease(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys. A lease already gone is not an error."""
        ...

    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Batches of changes under ``prefix`` from ``start_revision`` on; see above."""
        ...

    async def status(self) -> StoreStatus:
        """Health of the store as seen from this client."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class StoreStatus:
    endpoint: str
    version: str
    revision: int
    leader: int
    member: int
    db_size: int
