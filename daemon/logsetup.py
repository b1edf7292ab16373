"""Logging for cgtreed: one stdlib handler on the root logger, text or JSON lines, and a
per-request context so every line logged while serving a request names that request.

Formats:
- ``text``: ``2025-01-31T12:00:00.123Z INFO cgtree.daemon.server: recorded graph 3 [req=7 session=ab12]``.
  Under journald (``$JOURNAL_STREAM`` names the very stream being written) the timestamp is
  dropped (journald stamps every entry) and each line starts with a syslog priority prefix
  such as ``<4>`` (sd-daemon(3) ``SD_WARNING``), which journald strips and stores as the
  entry's PRIORITY, so ``journalctl -p warning`` works. Every line of a multi-line record
  (a traceback) gets the prefix, because journald makes each line its own entry.
- ``json``: one object per line: ``ts``, ``level``, ``logger``, ``msg``, then ``request_id`` and
  ``session`` inside a request, ``exc`` for an exception, and any ``extra={...}`` fields.
  Under journald the priority prefix is added here too (journald strips it; the JSON stays).

Invariants:
- ``configure_logging`` is idempotent: calling it again (SIGHUP changed ``log_level``) replaces
  the handler it installed earlier; handlers it did not install (pytest's, an embedding
  application's) are left alone. Records never go out twice.
- The request context lives in a ``contextvars.ContextVar``: it follows the code that handles
  the request (threads start empty; asyncio tasks copy it) and is restored when the
  ``request_context`` block exits, even on an exception.
- Formatting never raises on odd ``extra`` values: JSON falls back to ``str(value)``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

__all__ = [
    "configure_logging",
    "request_context",
    "current_request",
    "get_logger",
    "RequestContext",
    "LOG_LEVELS",
    "LOG_FORMATS",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")

# sd-daemon(3) priorities: SD_DEBUG <7>, SD_INFO <6>, SD_NOTICE <5>, SD_WARNING <4>,
# SD_ERR <3>, SD_CRIT <2>. A level between two stdlib levels takes the next more severe one.
_JOURNAL_PRIORITIES = (
    (logging.DEBUG, 7),
    (logging.INFO, 6),
    (logging.WARNING, 4),
    (logging.ERROR, 3),
    (logging.CRITICAL, 2),
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName", "request_id", "session"}


@dataclass(frozen=True)
class RequestContext:
    """The request being served: its id (echoed in the reply) and the client's session."""

    request_id: str
    session: str | None = None


_current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "cgtree_request", default=None
)


class request_context:  # lower case: used as a function, ``with request_context(...)``
    """Within this block every log record carries ``request_id`` (and ``session`` if given).

    A class rather than a ``contextlib.contextmanager`` generator: it wraps every request the
    daemon serves, a prepared submit's included, and the generator costs about three times as
    much (1.6 against 0.5 us on this project's CPU machines)."""

    __slots__ = ("_context", "_token")

    def __init__(self, request_id: object, session: object | None = None) -> None:
        self._context = RequestContext(str(request_id), None if session is None else str(session))

    def __enter__(self) -> RequestContext:
        self._token = _current_request.set(self._context)
        return self._context

    def __exit__(self, *exc: object) -> None:
        _current_request.reset(self._token)


def current_request() -> RequestContext | None:
    """The request being served by this thread/task, or None outside ``request_context``."""
    return _current_request.get()


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``cgtree`` hierarchy (``get_logger(__name__)`` in cgtree modules)."""
    if name != "cgtree" and not name.startswith("cgtree."):
        name = "cgtree." + name
    return logging.getLogger(name)


def configure_logging(
    level: str,
    fmt: str = "text",
    stream: TextIO | None = None,
    *,
    journald: bool | None = None,
) -> logging.Handler:
    """Install (or replace) cgtree's handler on the root logger and set the root level.

    level: ``DEBUG``/``INFO``/``WARNING``/``ERROR``/``CRITICAL`` (any case); records below it
        are dropped, including torch's and inductor's, which log under the root too.
    fmt: ``"text"`` or ``"json"`` (see the module docstring).
    stream: where lines go; None means ``sys.stderr`` as it is now (the journal under systemd).
    journald: force journald mode on or off; None detects it from ``$JOURNAL_STREAM``.
    Returns the installed handler. Raises ValueError naming a bad level or format.
    """
    level_name = level.upper() if isinstance(level, str) else level
    if level_name not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be \"text\" or \"json\", got {fmt!r}")
    if stream is None:
        stream = sys.stderr
    if journald is None:
        journald = stream_is_journal(stream)

    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_RequestContextFilter())
    formatter_class = _JsonFormatter if fmt == "json" else _TextFormatter
    handler.setFormatter(formatter_class(journald=journald))

    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "name", None) == _HANDLER_NAME:
            root.removeHandler(existing)
            existing.close()
    root.addHandler(handler)
    root.setLevel(level_name)
    # Python warnings (torch's UserWarnings) become log records instead of raw stderr text,
    # so they get the same format, priority and request id.
    logging.captureWarnings(True)
    return handler


def stream_is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journald connection systemd set up (``$JOURNAL_STREAM``).

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` of the stdout/stderr socket; comparing it
    with the stream's own ``fstat`` (as sd-daemon(3) asks) rejects an inherited variable
    after stderr was redirected to a file or a pipe.
    """
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        device_text, inode_text = value.split(":", 1)
        device, inode = int(device_text), int(inode_text)
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        # Malformed value, or a stream without a file descriptor (StringIO): not the journal.
        return False
    return info.st_dev == device and info.st_ino == inode


_HANDLER_NAME = "cgtree.daemon.logsetup"


class _RequestContextFilter(logging.Filter):
    """Stamps ``request_id``/``session`` from the current request onto each record.

    On the handler, not a logger: logger filters do not see records propagated from child
    loggers. An explicit ``extra={"request_id": ...}`` wins over the context.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current_request.get()
        if not hasattr(record, "request_id"):
            record.request_id = context.request_id if context else None
        if not hasattr(record, "session"):
            record.session = context.session if context else None
        return True


def _journal_priority(levelno: int) -> int:
    for threshold, priority in _JOURNAL_PRIORITIES:
        if levelno <= threshold:
            return priority
    return 2


def _iso_utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class _TextFormatter(logging.Formatter):
    def __init__(self, *, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        request_id = getattr(record, "request_id", None)
        session = getattr(record, "session", None)
        if request_id is not None or session is not None:
            tags = []
            if request_id is not None:
                tags.append(f"req={request_id}")
            if session is not None:
                tags.append(f"session={session}")
            line += " [" + " ".join(tags) + "]"
        extra_text = _exception_and_stack(self, record)
        if extra_text:
            line += "\n" + extra_text
        if self.journald:
            prefix = f"<{_journal_priority(record.levelno)}>"
            return "\n".join(prefix + part for part in line.split("\n"))
        return f"{_iso_utc(record.created)} {line}"


class _JsonFormatter(logging.Formatter):
    def __init__(self, *, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        session = getattr(record, "session", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if session is not None:
            entry["session"] = session
        for key, value in vars(record).items():
            if key in _STANDARD_RECORD_ATTRS or key.startswith("_"):
                continue
            # An extra field may not overwrite the core fields: keep both, renamed.
            entry["extra_" + key if key in entry else key] = value
        extra_text = _exception_and_stack(self, record)
        if extra_text:
            entry["exc"] = extra_text
        # default=str: a tensor shape, a Path or an exception in extra= must not break logging.
        line = json.dumps(entry, default=str, ensure_ascii=False)
        if self.journald:
            return f"<{_journal_priority(record.levelno)}>{line}"
        return line


def _exception_and_stack(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """Traceback and ``stack_info`` text of ``record`` (cached on it like stdlib does)."""
    parts = []
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts)
