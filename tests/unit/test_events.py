"""The event monitor writes one flushed JSON line per event, to files and FIFOs, from any thread."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from nubis.vmm.events import (
    EventMonitor,
    NullEventMonitor,
    format_event,
    open_event_monitor,
)


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_format_splits_the_timestamp_into_secs_and_nanos() -> None:
    record = json.loads(format_event(3_000_000_007, "vm", "booted"))
    assert record == {
        "timestamp": {"secs": 3, "nanos": 7},
        "source": "vm",
        "event": "booted",
        "properties": None,
    }


def test_events_are_visible_in_the_file_before_emit_returns(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    monitor = EventMonitor.open(str(path))
    monitor.vmm("starting")
    assert _lines(path)[0]["event"] == "starting"
    monitor.vm("booting")
    monitor.vm("booted")
    monitor.device("activated", "_disk0")
    records = _lines(path)
    monitor.close()
    assert [(r["source"], r["event"]) for r in records] == [
        ("vmm", "starting"),
        ("vm", "booting"),
        ("vm", "booted"),
        ("virtio-device", "activated"),
    ]
    assert records[3]["properties"] == {"id": "_disk0"}
    stamps = [(r["timestamp"]["secs"], r["timestamp"]["nanos"]) for r in records]  # type: ignore[index]
    assert stamps == sorted(stamps)


def test_open_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"old": true}\n')
    monitor = open_event_monitor(str(path))
    monitor.vm("paused")
    monitor.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"old": true}'
    assert json.loads(lines[1])["event"] == "paused"


def test_events_after_close_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    monitor = EventMonitor.open(str(path))
    monitor.close()
    monitor.vm("resumed")
    assert path.read_text() == ""


def test_no_monitor_configured_is_a_no_op() -> None:
    monitor = open_event_monitor(None)
    assert isinstance(monitor, NullEventMonitor)
    monitor.vm("booted")
    monitor.device("reset", "_net0")
    monitor.close()


def test_concurrent_emitters_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    monitor = EventMonitor.open(str(path))

    def worker(index: int) -> None:
        for _ in range(200):
            monitor.device("activated", f"dev{index}" * 20)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monitor.close()
    records = _lines(path)
    assert len(records) == 8 * 200
    assert all(r["event"] == "activated" for r in records)


def test_a_fifo_reader_sees_each_line(tmp_path: Path) -> None:
    path = tmp_path / "events.fifo"
    os.mkfifo(path)
    received: list[str] = []

    def reader() -> None:
        with open(path, encoding="utf-8") as fifo:
            received.extend(fifo)

    thread = threading.Thread(target=reader)
    thread.start()
    monitor = EventMonitor.open(str(path))  # returns once the reader has opened the FIFO
    monitor.vm("shutdown")
    monitor.vmm("shutdown")
    monitor.close()
    thread.join()
    assert [json.loads(line)["source"] for line in received] == ["vm", "vmm"]


def test_a_reader_that_goes_away_silences_the_monitor(tmp_path: Path) -> None:
    path = tmp_path / "events.fifo"
    os.mkfifo(path)
    reader_fd: list[int] = []
    opener = threading.Thread(target=lambda: reader_fd.append(os.open(path, os.O_RDONLY)))
    opener.start()
    monitor = EventMonitor.open(str(path))
    opener.join()
    os.close(reader_fd[0])
    monitor.vm("rebooting")  # EPIPE: logged, not raised
    monitor.vm("rebooted")
    monitor.close()
