"""Events: the cluster's record of its decisions, under ``events/`` in time order."""

from __future__ import annotations

import time

from ferry.model import codec
from ferry.model.ha import Event, EventKind
from ferry.store.base import Put
from ferry.store.keys import Keys


def event_put(keys: Keys, *, kind: EventKind, message: str, by: str, node: str = "",
              vm: str = "", at: float | None = None) -> Put:
    """The write that records one event; goes into the transaction of the decision itself,
    so that an event exists exactly when its decision was taken."""
    at = time.time() if at is None else at
    ev = Event(at=at, kind=kind, message=message, node=node, vm=vm, by=by)
    return Put(keys.event(at, by), codec.encode(ev))
