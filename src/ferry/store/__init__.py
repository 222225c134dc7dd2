"""The cluster store: the protocol, the etcd implementation, the in-memory fake, the keys."""

from ferry.store.base import (
    ClusterStore,
    Compare,
    Delete,
    Entry,
    EventType,
    Put,
    StoreStatus,
    TxnResult,
    WatchEvent,
)

__all__ = [
    "ClusterStore",
    "Compare",
    "Delete",
    "Entry",
    "EventType",
    "Put",
    "StoreStatus",
    "TxnResult",
    "WatchEvent",
]
