"""Logging setup: text and JSON lines carry the request id; journald mode drops timestamps
and prefixes syslog priorities; reconfiguration replaces, never duplicates, the handler."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import warnings

import pytest

from cgtree.daemon.logsetup import configure_logging, current_request, get_logger, request_context

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_root_logger(monkeypatch):
    """configure_logging changes process-wide state: put it back after each test."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_text_line_has_timestamp_level_logger_and_message():
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    get_logger("daemon.server").info("bound %s", "ipc:///run/cgtree/cgtreed.sock")
    [line] = lines_of(out)
    assert re.fullmatch(TIMESTAMP + r" INFO cgtree\.daemon\.server: bound ipc:///run/cgtree/cgtreed\.sock", line)


def test_text_lines_inside_a_request_carry_its_id_and_session():
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    log = get_logger("cgtree.daemon.commands.submit")
    with request_context(42, session="ab12"):
        log.info("replayed graph 3")
        with request_context("43"):
            log.warning("nested request")
        log.info("back in 42")
    log.info("no request")
    assert [line.split(": ", 1)[1] for line in lines_of(out)] == [
        "replayed graph 3 [req=42 session=ab12]",
        "nested request [req=43]",
        "back in 42 [req=42 session=ab12]",
        "no request",
    ]
    assert current_request() is None


def test_request_context_is_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with request_context("r1"):
            raise RuntimeError("handler failed")
    assert current_request() is None


def test_each_thread_logs_its_own_request_id():
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    log = get_logger("cgtree.daemon.server")
    barrier = threading.Barrier(4)

    def serve(request_id: str) -> None:
        with request_context(request_id):
            barrier.wait()  # all four contexts are active at the same time
            log.info("handling %s", request_id)

    threads = [threading.Thread(target=serve, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = lines_of(out)
    assert len(lines) == 4
    for line in lines:
        request_id = re.search(r"handling (t\d)", line).group(1)
        assert line.endswith(f"[req={request_id}]")


def test_json_lines_are_objects_with_core_fields_request_and_extras():
    out = io.StringIO()
    configure_logging("DEBUG", "json", stream=out)
    log = get_logger("cgtree.daemon.server")
    with request_context("req-9", session="s1"):
        log.debug("recorded", extra={"graph_id": 3, "device": "cuda:0", "ts": "clash"})
    log.info("idle")
    first, second = (json.loads(line) for line in lines_of(out))
    assert re.fullmatch(TIMESTAMP, first["ts"])
    assert first["level"] == "DEBUG"
    assert first["logger"] == "cgtree.daemon.server"
    assert first["msg"] == "recorded"
    assert (first["request_id"], first["session"]) == ("req-9", "s1")
    assert (first["graph_id"], first["device"]) == (3, "cuda:0")
    assert first["extra_ts"] == "clash"  # an extra field never overwrites a core field
    assert "request_id" not in second and "session" not in second


def test_json_line_holds_the_traceback_and_survives_unserialisable_extras():
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    try:
        raise ValueError("bad payload")
    except ValueError:
        get_logger("cgtree.daemon.codec").exception("decode failed", extra={"obj": object()})
    [line] = lines_of(out)  # the traceback is inside the one JSON line
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert "ValueError: bad payload" in entry["exc"]
    assert entry["obj"].startswith("<object object at")


def journal_file(tmp_path, monkeypatch):
    """A real file whose device:inode is announced as JOURNAL_STREAM, as systemd does."""
    stream = open(tmp_path / "journal", "w", encoding="utf-8")
    info = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    return stream


def test_under_journald_text_lines_have_priority_prefix_and_no_timestamp(tmp_path, monkeypatch):
    stream = journal_file(tmp_path, monkeypatch)
    configure_logging("DEBUG", "text", stream=stream)
    log = get_logger("cgtree.daemon.server")
    log.debug("d")
    log.info("i")
    with request_context("r5"):
        log.warning("w")
    log.error("e")
    log.critical("c")
    stream.close()
    assert (tmp_path / "journal").read_text().splitlines() == [
        "<7>DEBUG cgtree.daemon.server: d",
        "<6>INFO cgtree.daemon.server: i",
        "<4>WARNING cgtree.daemon.server: w [req=r5]",
        "<3>ERROR cgtree.daemon.server: e",
        "<2>CRITICAL cgtree.daemon.server: c",
    ]


def test_under_journald_every_traceback_line_keeps_the_priority(tmp_path, monkeypatch):
    stream = journal_file(tmp_path, monkeypatch)
    configure_logging("INFO", "text", stream=stream)
    try:
        raise KeyError("graph 7")
    except KeyError:
        get_logger("cgtree.daemon.server").exception("replay failed")
    stream.close()
    lines = (tmp_path / "journal").read_text().splitlines()
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>KeyError: 'graph 7'"


def test_under_journald_json_lines_get_the_prefix_too(tmp_path, monkeypatch):
    stream = journal_file(tmp_path, monkeypatch)
    configure_logging("INFO", "json", stream=stream)
    get_logger("cgtree.x").warning("w")
    stream.close()
    [line] = (tmp_path / "journal").read_text().splitlines()
    assert line.startswith("<4>{")
    assert json.loads(line[3:])["msg"] == "w"


def test_journal_stream_naming_another_file_is_ignored(tmp_path, monkeypatch):
    # stderr redirected to a file after systemd set JOURNAL_STREAM: not the journal any more.
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with open(tmp_path / "log", "w", encoding="utf-8") as stream:
        configure_logging("INFO", "text", stream=stream)
        get_logger("cgtree.x").info("plain")
    [line] = (tmp_path / "log").read_text().splitlines()
    assert re.fullmatch(TIMESTAMP + r" INFO cgtree\.x: plain", line)


def test_journald_can_be_forced_for_streams_without_a_descriptor():
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out, journald=True)
    get_logger("cgtree.x").info("forced")
    assert lines_of(out) == ["<6>INFO cgtree.x: forced"]


def test_reconfiguring_replaces_the_handler_and_applies_the_new_level():
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "text", stream=first)
    configure_logging("INFO", "text", stream=second)
    log = get_logger("cgtree.daemon.server")
    log.info("once")
    assert lines_of(first) == []
    assert len(lines_of(second)) == 1
    log.debug("hidden at INFO")
    configure_logging("debug", "json", stream=second)  # SIGHUP: level and format change
    log.debug("shown at DEBUG")
    lines = lines_of(second)
    assert len(lines) == 2
    assert json.loads(lines[1])["msg"] == "shown at DEBUG"
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "cgtree.daemon.logsetup"]
    assert len(ours) == 1


def test_handlers_installed_by_others_are_kept():
    foreign = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(foreign)
    configure_logging("INFO", "text", stream=io.StringIO())
    configure_logging("WARNING", "text", stream=io.StringIO())
    assert foreign in root.handlers


def test_python_warnings_become_log_lines():
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    with request_context("r1"):
        warnings.warn("TF32 is disabled", UserWarning, stacklevel=1)
    # The warning text spans two lines (message, then the source line that warned).
    first, *rest = lines_of(out)
    assert " WARNING py.warnings: " in first and "UserWarning: TF32 is disabled" in first
    assert rest and rest[-1].endswith("[req=r1]")


@pytest.mark.parametrize("level, fmt", [("VERBOSE", "text"), ("INFO", "yaml")])
def test_bad_level_or_format_is_refused_naming_it(level, fmt):
    with pytest.raises(ValueError, match="VERBOSE" if level == "VERBOSE" else "yaml"):
        configure_logging(level, fmt, stream=io.StringIO())


def test_get_logger_places_names_under_cgtree():
    assert get_logger("cgtree.daemon.server").name == "cgtree.daemon.server"
    assert get_logger("cgtree").name == "cgtree"
    assert get_logger("ops").name == "cgtree.ops"
