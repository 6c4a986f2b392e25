"""Token counting for prompts and outputs, offline: the simulator's rule, or a real tokenizer.json.

llmperf sizes its prompts with a Hugging Face tokenizer it downloads at import time; here the
default is the simulator's own counting rule (so prompt sizes are exact against the simulator),
and `--tokenizer` may name a local tokenizer.json, a model directory holding one (the tutorial
passes `--tokenizer=$MODEL_PATH`) or an installed package that ships one. Real tokenizers are
read with the optional `tokenizers` package.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any, Protocol

from di_router.sim import tokenizer as sim_tokenizer

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """`--tokenizer` names nothing loadable; the message says what was tried."""


class Tokenizer(Protocol):
    name: str

    def count_prompt(self, text: str) -> int:
        """Tokens of a prompt, special tokens (BOS) included, as llmperf counts prompts."""
        ...

    def count_output(self, text: str) -> int:
        """Tokens of generated text, without special tokens (what the server generated)."""
        ...


class SimTokenizer:
    """The simulator's rule: BOS plus one token per whitespace-separated piece."""

    name = "simulator"

    def count_prompt(self, text: str) -> int:
        return sim_tokenizer.prompt_token_count(text)

    def count_output(self, text: str) -> int:
        return sim_tokenizer.count_text_tokens(text)


class JsonTokenizer:
    """A Hugging Face tokenizer.json, through the `tokenizers` package."""

    def __init__(self, path: Path) -> None:
        if importlib.util.find_spec("tokenizers") is None:
            raise TokenizerError(
                f"reading {path} needs the 'tokenizers' package: pip install tokenizers"
            )
        from tokenizers import Tokenizer as HFTokenizer

        self.name = str(path)
        self._tokenizer: Any = HFTokenizer.from_file(str(path))

    def count_prompt(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def count_output(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def load_tokenizer(name: str | None) -> Tokenizer:
    """None or "" -> the simulator's; else a file, a directory, or a package with tokenizer.json."""
    if not name:
        return SimTokenizer()
    path = Path(name).expanduser()
    if path.is_file():
        return JsonTokenizer(path)
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            return JsonTokenizer(path / TOKENIZER_FILE)
        raise TokenizerError(f"no {TOKENIZER_FILE} in directory {path}")
    packaged = _packaged(name)
    if packaged is None:
        raise TokenizerError(
            f"--tokenizer {name!r} is neither a file, a directory with {TOKENIZER_FILE}, "
            f"nor an installed package that ships one"
        )
    return JsonTokenizer(packaged)


def _packaged(package: str) -> Path | None:
    """The first tokenizer.json inside an installed package, if the name is importable."""
    try:
        root = Path(str(importlib.resources.files(package)))
    except (ModuleNotFoundError, TypeError, ValueError):
        return None
    return next(iter(sorted(root.rglob(TOKENIZER_FILE))), None)
