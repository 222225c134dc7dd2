"""QMP answers parsed at the boundary: query-migrate and events."""

from __future__ import annotations

import pytest

from ferry.model.errors import QemuError
from ferry.qemu.monitor import (
    MigrateInfo,
    MigrationParameters,
    QmpEvent,
    outgoing_status,
    parse_event,
    parse_migrate_info,
    parse_migrate_parameters,
)

RAM = {"total": 268_500_992, "transferred": 100_000_000, "remaining": 150_000_000,
       "mbps": 940.5, "dirty-pages-rate": 1200, "page-size": 4096, "dirty-sync-count": 3,
       "duplicate": 0, "normal": 24000}


# --- outgoing_status -----------------------------------------------------------------


def test_fresh_qemu_has_no_outgoing_migration() -> None:
    assert outgoing_status({}) == "none"
    assert outgoing_status({"status": "none"}) == "none"


def test_former_target_reports_completed_without_ram_outgoing_none() -> None:
    # QEMU 7.2 keeps reporting the incoming migration's "completed" on the target.
    assert outgoing_status({"status": "completed"}) == "none"
    assert outgoing_status({"status": "completed", "socket-address": []}) == "none"


def test_ram_without_downtime_is_active() -> None:
    assert outgoing_status({"status": "active", "ram": RAM}) == "active"
    # On a former target the status field may still say the incoming "completed".
    assert outgoing_status({"status": "completed", "ram": RAM}) == "active"


@pytest.mark.parametrize("status", ["device", "pre-switchover", "cancelling",
                                    "postcopy-active", "setup"])
def test_ram_keeps_the_precise_active_status(status: str) -> None:
    assert outgoing_status({"status": status, "ram": RAM}) == status


def test_downtime_means_completed() -> None:
    assert outgoing_status({"status": "completed", "ram": RAM, "downtime": 25}) == "completed"
    assert outgoing_status({"status": "active", "downtime": 25}) == "completed"


def test_error_desc_without_ram_is_failed() -> None:
    assert outgoing_status({"status": "failed", "error-desc": "Connection refused"}) == "failed"
    # Even if the status still shows the incoming migration's end.
    assert outgoing_status({"status": "completed", "error-desc": "boom"}) == "failed"


@pytest.mark.parametrize("status", ["setup", "cancelled", "cancelling", "failed"])
def test_status_only_states_of_the_outgoing_side(status: str) -> None:
    assert outgoing_status({"status": status}) == status


# --- parse_migrate_info --------------------------------------------------------------


def test_parse_an_active_migration() -> None:
    info = parse_migrate_info({
        "status": "active", "total-time": 1500, "expected-downtime": 40, "setup-time": 7,
        "cpu-throttle-percentage": 20, "ram": RAM,
    })
    assert info == MigrateInfo(
        status="active", outgoing="active", total_time_ms=1500, downtime_ms=0,
        expected_downtime_ms=40, setup_time_ms=7, ram_total=268_500_992,
        ram_transferred=100_000_000, ram_remaining=150_000_000, ram_mbps=940.5,
        dirty_pages_rate=1200.0, page_size=4096, dirty_sync_count=3, throttle_pct=20,
        postcopy_blocktime_ms=0, error="",
    )


def test_parse_a_completed_migration() -> None:
    info = parse_migrate_info({"status": "completed", "total-time": 700, "downtime": 31,
                               "setup-time": 5, "ram": {**RAM, "remaining": 0}})
    assert info.outgoing == "completed"
    assert info.downtime_ms == 31
    assert info.total_time_ms == 700
    assert info.ram_remaining == 0


def test_parse_a_failed_migration() -> None:
    info = parse_migrate_info({"status": "failed", "error-desc": "Unable to write"})
    assert info.status == "failed"
    assert info.outgoing == "failed"
    assert info.error == "Unable to write"
    assert info.ram_total == 0


def test_parse_a_former_target() -> None:
    info = parse_migrate_info({"status": "completed"})
    assert info.status == "completed"
    assert info.outgoing == "none"


def test_parse_empty_answer_defaults() -> None:
    info = parse_migrate_info({})
    assert info == MigrateInfo(status="none")
    assert info.page_size == 4096


def test_parse_tolerates_odd_field_types() -> None:
    info = parse_migrate_info({"status": "active", "total-time": "soon",
                               "ram": {"total": None, "mbps": "fast", "page-size": 0}})
    assert info.total_time_ms == 0
    assert info.ram_total == 0
    assert info.ram_mbps == 0.0
    assert info.page_size == 4096


def test_parse_ignores_a_ram_that_is_not_an_object() -> None:
    info = parse_migrate_info({"status": "active", "ram": [1, 2]})
    assert info.ram_total == 0
    assert info.outgoing == "active"  # "ram" is there: the outgoing side filled it in


def test_floats_are_truncated_to_ints_for_int_fields() -> None:
    assert parse_migrate_info({"total-time": 12.9}).total_time_ms == 12


@pytest.mark.parametrize("raw", [None, [], "completed", 3])
def test_parse_rejects_non_objects(raw: object) -> None:
    with pytest.raises(QemuError, match="query-migrate"):
        parse_migrate_info(raw)


# --- parse_event ---------------------------------------------------------------------


def test_migration_event() -> None:
    ev = parse_event({"event": "MIGRATION", "data": {"status": "completed"},
                      "timestamp": {"seconds": 1700000000, "microseconds": 250000}})
    assert ev == QmpEvent(name="MIGRATION", timestamp=1700000000.25, status="completed")


def test_migration_pass_event() -> None:
    ev = parse_event({"event": "MIGRATION_PASS", "data": {"pass": 3},
                      "timestamp": {"seconds": 10, "microseconds": 1}})
    assert ev.pass_ == 3
    assert ev.status == ""
    assert ev.timestamp == pytest.approx(10.000001)


def test_shutdown_reason_is_the_status() -> None:
    ev = parse_event({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"},
                      "timestamp": {"seconds": 5, "microseconds": 0}})
    assert ev.name == "SHUTDOWN"
    assert ev.status == "guest-shutdown"


def test_status_wins_over_reason() -> None:
    ev = parse_event({"event": "X", "data": {"status": "a", "reason": "b"}})
    assert ev.status == "a"


def test_event_without_data_or_timestamp() -> None:
    assert parse_event({"event": "STOP"}) == QmpEvent(name="STOP", timestamp=0.0)
    assert parse_event({}) == QmpEvent(name="", timestamp=0.0)
    assert parse_event({"event": "RESUME", "data": None, "timestamp": "x"}) == QmpEvent(
        name="RESUME", timestamp=0.0)


@pytest.mark.parametrize("status", ["postcopy-active", "postcopy-paused", "postcopy-recover"])
def test_post_copy_reports_its_switch_downtime_and_is_still_going(status: str) -> None:
    assert outgoing_status({"status": status, "ram": RAM, "downtime": 12}) == status


def test_migrate_parameters_are_parsed() -> None:
    p = parse_migrate_parameters({"downtime-limit": 300, "max-bandwidth": 134217728,
                                  "throttle-trigger-threshold": 100, "cpu-throttle-initial": 1,
                                  "cpu-throttle-increment": 1, "max-cpu-throttle": 1,
                                  "announce-step": 100})
    assert p == MigrationParameters(downtime_limit_ms=300, max_bandwidth=134217728,
                                    throttle_trigger_threshold=100, cpu_throttle_initial=1,
                                    cpu_throttle_increment=1, max_cpu_throttle=1)
    with pytest.raises(QemuError):
        parse_migrate_parameters([])
