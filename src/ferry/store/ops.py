"""Conditional writes built on ``ClusterStore.txn``, for any store.

``cas`` and ``update`` keep the key's lease only if told (``update`` does so itself): a put
without a lease detaches the key from its lease, as in etcd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ferry.model import codec
from ferry.model.errors import Conflict
from ferry.store.base import ClusterStore, Compare, Delete, Entry, Put

T = TypeVar("T")


async def create(store: ClusterStore, key: str, value: str, *, lease: int = 0) -> int | None:
    """Put ``key`` only if it does not exist; the new revision, or None if it existed."""
    result = await store.txn([Compare.absent(key)], [Put(key, value, lease)])
    return result.revision if result.succeeded else None


async def cas(
    store: ClusterStore, key: str, value: str, *, mod_revision: int, lease: int = 0
) -> int | None:
    """Put ``key`` only if its last write is ``mod_revision`` (0: only if absent).

    Returns the new revision, or None if the key changed in between.
    """
    result = await store.txn([Compare.unchanged(key, mod_revision)], [Put(key, value, lease)])
    return result.revision if result.succeeded else None


async def delete_if(store: ClusterStore, key: str, *, mod_revision: int) -> bool:
    """Delete ``key`` only if its last write is ``mod_revision``; whether it did."""
    result = await store.txn([Compare.unchanged(key, mod_revision)], [Delete(key)])
    return result.succeeded


async def update(
    store: ClusterStore,
    key: str,
    fn: Callable[[str | None], str | None],
    *,
    attempts: int = 10,
) -> Entry | None:
    """Read-modify-write ``key`` until no one else wrote it in between.

    ``fn`` gets the current value (None: absent) and returns the new one (None: delete). It
    may run several times, so it must not have side effects. Returns the entry as written
    (None if deleted or left absent); raises Conflict after ``attempts`` lost races.
    """
    for _ in range(attempts):
        current = await store.get(key)
        old = current.value if current else None
        new = fn(old)
        if new == old:
            return current
        if current is None:
            assert new is not None  # new == old covers None → None
            revision = await cas(store, key, new, mod_revision=0)
            if revision is not None:
                return Entry(key, new, create_revision=revision, mod_revision=revision, version=1)
        elif new is None:
            if await delete_if(store, key, mod_revision=current.mod_revision):
                return None
        else:
            revision = await cas(
                store, key, new, mod_revision=current.mod_revision, lease=current.lease
            )
            if revision is not None:
                return Entry(
                    key,
                    new,
                    create_revision=current.create_revision,
                    mod_revision=revision,
                    version=current.version + 1,
                    lease=current.lease,
                )
    raise Conflict(f"{key}: changed concurrently {attempts} times in a row; giving up")


async def update_json(
    store: ClusterStore,
    key: str,
    fn: Callable[[T | None], T | None],
    *,
    cls: type[T],
    attempts: int = 10,
) -> T | None:
    """``update`` for a JSON document holding a ``cls`` (a model dataclass).

    ``fn`` gets the decoded document (None: absent) and returns the new one (None: delete);
    returns the document as written. InvalidSpec if the stored JSON is not a ``cls``.
    """
    written: list[T | None] = [None]

    def apply(text: str | None) -> str | None:
        new = fn(codec.decode(cls, text) if text is not None else None)
        written[0] = new
        return codec.encode(new) if new is not None else None

    await update(store, key, apply, attempts=attempts)
    return written[0]
