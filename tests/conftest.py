"""Session-wide: every temporary file of the run (server logs, metrics dirs) in one place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_tmpdir() -> Iterator[None]:
    """Server processes inherit TMPDIR, so their files go here too; all removed at the end."""
    root = tempfile.mkdtemp(prefix="di-router-tests-")
    os.chmod(root, 0o755)  # traversable, like /tmp: some tests act as another user
    previous_env, previous_default = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = root
    try:
        yield
    finally:
        tempfile.tempdir = previous_default
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env
        shutil.rmtree(root, ignore_errors=True)
