"""A copy-pasteable shell script for a planned command, for `--dry-run`."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence


def _arg_lines(argv: Sequence[str]) -> list[str]:
    """The program on the first line, then one `--flag values...` group per line."""
    lines: list[list[str]] = [[]]
    for arg in argv:
        if arg.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(shlex.quote(arg))
    return [" ".join(line) for line in lines]


def render_script(argv: Sequence[str], env: Mapping[str, str], comment: str) -> str:
    """Bash that exports `env` and execs `argv`, every word quoted so it survives pasting."""
    exports = [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    command = "exec " + " \\\n    ".join(_arg_lines(argv))
    return (
        "\n".join(["#!/usr/bin/env bash", f"# {comment}", "set -euo pipefail", *exports, command])
        + "\n"
    )
