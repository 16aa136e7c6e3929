"""Structured logs: one JSON object per line (worker, beat, CLI), secrets scrubbed.

Telemetry events (logger ``openbanking.telemetry``) are already JSON documents: they are written as
they are, one per line, so a log shipper can route them by their ``event`` key.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from app.jsonio import dumps

# ``color_message``: uvicorn's copy of its message with ANSI colour codes, for its own console.
_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "color_message"}
# Bearer tokens, Powens sandbox tokens, Fernet tokens, IBANs: never in a log line, whatever the code did.
_SCRUB = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[redacted]"),
    (re.compile(r"\bsbx_[0-9a-f]{8,}\b"), "[redacted]"),
    (re.compile(r"\bgAAAAA[A-Za-z0-9_=-]{20,}"), "[redacted]"),
    (
        re.compile(r"(?i)(client_secret|auth_token|access_token|token)(['\"]?\s*[:=]\s*['\"]?)[^'\"\s&,}]+"),
        r"\1\2[redacted]",
    ),
    (re.compile(r"(?i)\b([A-Z]{2}\d{2})[A-Z0-9]{6,26}([A-Z0-9]{4})\b"), r"\1****\2"),
    # An IBAN written in groups of four ("FR76 3000 4000 ...").
    (re.compile(r"(?i)\b([A-Z]{2}\d{2})(?: [A-Z0-9]{4}){2,6} ?([A-Z0-9]{1,4})\b"), r"\1 **** \2"),
]


# What each pattern needs before it can match, checked first: a substring test costs well under a
# microsecond, where the six patterns cost about 115 µs on every telemetry line (measured), one line
# per refreshed account. Each gate matches wherever its pattern could, with the patterns' own
# case-insensitivity: ``(?i)`` also folds the dotless i, the dotted capital I and the long s, which
# ``str.lower`` leaves alone, hence ``_FOLD`` (a gate may say yes too often, never too rarely).
_FOLD = str.maketrans({"\u0131": "i", "\u017f": "s", "\u0307": None})
_IBAN_START = re.compile(r"\b[A-Za-z\u0130\u0131\u017f\u212a]{2}\d{2}")  # = (?i)\b[A-Z]{2}\d{2}


def scrub(text: str) -> str:
    folded = ""
    iban: bool | None = None
    for index, (pattern, repl) in enumerate(_SCRUB):
        # Gates see the text as the patterns before them left it (a replacement can make a match).
        if not folded:
            folded = text.lower().translate(_FOLD) or " "
        if index == 0:
            gate = "bearer" in folded
        elif index == 1:
            gate = "sbx_" in text
        elif index == 2:
            gate = "gAAAAA" in text
        elif index == 3:
            gate = "token" in folded or "client_secret" in folded
        else:
            if iban is None:
                iban = _IBAN_START.search(text) is not None
            gate = iban
        if gate:
            replaced = pattern.sub(repl, text)
            if replaced != text:
                text, folded, iban = replaced, "", None
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            # The one timestamp format (RFC 3339, UTC, Z), to the millisecond.
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_") and value is not None:
                doc[key] = value
        try:
            from celery._state import get_current_task

            task = get_current_task()
            if task is not None and task.request.id:
                doc.setdefault("task_id", task.request.id)
                doc.setdefault("task_name", task.name)
        except ImportError:  # pragma: no cover
            pass
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        # The whole line, once serialised: values that are not strings (a task's arguments in a
        # dict, a result) are scrubbed too.
        return scrub(dumps(doc))


class TextFormatter(logging.Formatter):
    """``BALANCES_LOG_FORMAT=text``: one human line per record, scrubbed like every other format."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class RawFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(record.getMessage())


def configure(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    stream = stream or sys.stderr
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())

    tel = logging.getLogger("openbanking.telemetry")
    for h in list(tel.handlers):
        tel.removeHandler(h)
    th = logging.StreamHandler(stream)
    th.setFormatter(RawFormatter())
    tel.addHandler(th)
    tel.setLevel(logging.INFO)
    tel.propagate = False
    for noisy in ("urllib3", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
