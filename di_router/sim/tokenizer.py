"""The simulator's built-in tokenizer and vocabulary.

Counting rule (documented in the README): a prompt is one BOS token plus one token per
whitespace-separated piece of text; a list of token ids counts as its length. Generated tokens
are words from a fixed vocabulary, each detokenized with a leading space; EOS detokenizes to "".
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence

EOS_TOKEN_ID = 0
BOS_TOKEN_ID = 1
_PIECE = re.compile(r"\S+")
_ONSETS = ("b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "n", "r", "s")
# Word ids start at 2: 0 is EOS and 1 is BOS, as in Llama-style vocabularies.
VOCAB: tuple[str, ...] = (
    "",
    "<s>",
    *(o + n + c for o, n, c in itertools.product(_ONSETS, _NUCLEI, _CODAS)),
)
FIRST_WORD_ID = 2


def count_text_tokens(text: str) -> int:
    return len(_PIECE.findall(text))


def prompt_token_count(prompt: str | Sequence[int]) -> int:
    if isinstance(prompt, str):
        return 1 + count_text_tokens(prompt)
    return len(prompt)


def prompt_key(prompt: str | Sequence[int]) -> int:
    """A stable 64-bit digest of the prompt: generation is a function of it."""
    if isinstance(prompt, str):
        material = " ".join(_PIECE.findall(prompt)).encode()
    else:
        material = b"ids:" + ",".join(map(str, prompt)).encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


def token_text(token_id: int) -> str:
    return "" if token_id == EOS_TOKEN_ID else " " + VOCAB[token_id]


def render_chat(messages: Sequence[dict[str, object]], add_generation_prompt: bool) -> str:
    """A Llama-3-like chat template, rendered as text so the same counting rule applies."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        role = message.get("role")
        parts.append(f"<|start_header_id|> {role} <|end_header_id|> {content or ''} <|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|> assistant <|end_header_id|>")
    return " ".join(parts)
