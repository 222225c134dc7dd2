"""Every error Ferry raises on purpose derives from FerryError.

The CLI prints ``str(err)`` of a FerryError as one line and exits with ``err.exit_code``;
anything else reaching the top is a bug.
"""

from __future__ import annotations


class FerryError(Exception):
    """Root of all of Ferry's errors."""

    exit_code = 1


class NotFound(FerryError):
    """A named thing (VM, node, migration, key) does not exist."""

    exit_code = 3


class Conflict(FerryError):
    """The request contradicts the current state (VM already running, already migrating)."""

    exit_code = 4


class InvalidSpec(FerryError):
    """A specification or argument is malformed or would not work."""

    exit_code = 2


class Unavailable(FerryError):
    """A part of the cluster cannot be reached (store, node, QEMU monitor)."""

    exit_code = 5


class Timeout(FerryError):
    """An operation did not finish within its bound."""

    exit_code = 6


class StoreError(Unavailable):
    """The cluster store answered with an error or not at all."""


class Compacted(StoreError):
    """A watch asked for a revision that the store has already compacted."""


class LeaseExpired(StoreError):
    """A lease is gone: its keys are deleted and it can no longer be kept alive."""


class QemuError(FerryError):
    """QEMU failed to start, refused a command or died."""


class LabError(FerryError):
    """The lab could not be built, found or torn down."""


class MigrationFailed(FerryError):
    """A migration ended without moving the VM; the VM still runs on its source."""

    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"migration failed in phase {phase}: {reason}")
        self.phase = phase
        self.reason = reason
