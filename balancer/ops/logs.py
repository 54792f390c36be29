"""Logging setup: text or JSON lines on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time

from balancer.config import LogConfig


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any extra fields the record carries."""

    FIELDS = ("server_ip", "campaign_id", "lead_id", "carrier_id")

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(config: LogConfig) -> None:
    """Configure the root logger once, from the [log] section."""
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
