"""Structured logging: one JSON event per line (or console lines for humans).

Context (association, calling AE, destination, UIDs, syntax) is bound once per association or
job. Patient names, IDs and birth dates never go into a log line.

Everything a process writes to stderr goes through here, in the one format: structlog events,
the standard library's logging (pynetdicom, pydicom) and Python warnings (pydicom warns about
the values it reads), each as an event. Values from the network are escaped: JSON escapes them
itself; console lines show them through `router.text.escape` (no raw control character, no
forged line, no live terminal escape).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import structlog

from router.text import escape, field

_PLAIN = (int, float, bool, type(None))
_COLUMNS = frozenset({"timestamp", "level", "event", "logger", "logger_name"})  # printed as they are


class _Shown:
    """A value as a console line shows it; ConsoleRenderer prints the repr of what is not a str."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _escaped(logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN401
    """Console lines: every value through `router.text` (`field` for key=value, a traceback line
    by line), so that none forges a line, a field or a terminal escape."""
    for key, value in event_dict.items():
        if key.startswith("_") or isinstance(value, _PLAIN):
            continue
        if key == "exception" and isinstance(value, str):
            event_dict[key] = "\n".join(escape(line) for line in value.split("\n"))
        elif key in _COLUMNS:
            event_dict[key] = escape(value)
        else:
            event_dict[key] = _Shown(field(value) if isinstance(value, str) else escape(repr(value)))
    return event_dict


class _NotTwice(logging.Filter):
    """pydicom's `warn_and_log` both logs and warns the same text; the warning (with its
    category and where it was raised) is the one kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "warn_and_log"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:  # noqa: ANN401 - warnings' signature
    structlog.get_logger("warnings").warning("python_warning", category=category.__name__,
                                             message=str(message), source=f"{filename}:{lineno}")


def configure(fmt: str = "json", level: str = "info") -> None:
    """Route structlog, the standard library's logging (pynetdicom, pydicom) and Python warnings
    to stderr in one format."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        rendering = [structlog.processors.JSONRenderer()]
    else:
        rendering = [_escaped, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info, *rendering],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # pynetdicom narrates every PDU at INFO; its warnings and errors are what an operator needs
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))
    pydicom = logging.getLogger("pydicom")
    if not any(isinstance(f, _NotTwice) for f in pydicom.filters):
        pydicom.addFilter(_NotTwice())
    warnings.showwarning = _show_warning


def get(name: str = "dicom-router") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
