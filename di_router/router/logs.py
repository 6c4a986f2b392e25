"""Logging setup: the tutorial's `LEVEL:logger:message` lines; access lines as text or JSON."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, access_format: str = "text") -> None:
    logging.basicConfig(
        level=level.upper(), format="%(levelname)s:%(name)s:%(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    access = logging.getLogger("di_router.access")
    if access_format == "json" and not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.propagate = False  # one JSON object per line, nothing around it
