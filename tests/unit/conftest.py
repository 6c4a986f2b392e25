"""In-process tests of the router core: no sockets, no subprocesses; the directory runs in
seconds. Coroutine tests run on asyncio through anyio's pytest plugin (anyio comes with httpx)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """The router is written for asyncio (task cancel messages, `uncancel`)."""
    return "asyncio"
