"""structlog set-up: readable lines on a terminal, JSON lines when configured.

A redaction step runs before rendering so that a secret passed to a log call by mistake never
reaches a terminal or a file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

LogFormat = Literal["console", "json"]

_SECRET_MARKERS = ("private", "secret", "password", "token", "seed", "mask_key", "shared_key")
REDACTED = "[redacted]"


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor that blanks fields whose names suggest a secret (key, token, seed …),
    so a careless log call cannot write one to disk."""
    for key in list(event_dict):
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            event_dict[key] = REDACTED
    return event_dict


def configure_logging(fmt: LogFormat = "console", level: str = "info") -> None:
    """Set up structlog once per process: console or JSON lines at `level`."""
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A named structlog logger; modules log key=value events, never formatted strings."""
    return structlog.get_logger(name)
