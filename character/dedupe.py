"""Normalising synthesised messages and telling which to drop, and why (pure functions)."""
from __future__ import annotations

import re
import unicodedata

from datasketch import MinHash, MinHashLSH

_LABEL = re.compile(r"^\s*(?:message|human|user|question|request|prompt)\s*(?:#?\d+)?\s*[:\-]\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
_WORD = re.compile(r"\w+", re.UNICODE)


def normalise_message(raw: str) -> str:
    """Clean a generated message: drop a leading label, surrounding quotes and extra whitespace."""
    text = unicodedata.normalize("NFC", raw).replace("\x00", "")
    text = " ".join(text.split())
    text = _LABEL.sub("", text, count=1)
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1]
    return text.strip()


def exact_key(text: str) -> str:
    """Texts equal under this key are exact duplicates (case, punctuation and spacing ignored)."""
    return " ".join(_WORD.findall(text.casefold()))


def shingles(text: str, n: int = 3) -> set[str]:
    words = _WORD.findall(text.casefold())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _minhash(tokens: set[str], num_perm: int) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=1)
    for token in sorted(tokens):
        m.update(token.encode("utf-8"))
    return m


def drop_reasons(
    texts: list[str],
    *,
    min_chars: int,
    max_chars: int,
    near_threshold: float,
    num_perm: int = 64,
) -> list[str | None]:
    """For each text (in the given order, the first occurrence wins): None to keep, else the reason.

    Reasons: empty, too_short, too_long, exact_duplicate, near_duplicate. Near duplicates are found with
    MinHash LSH over word 3-grams and then confirmed with the exact Jaccard similarity, so a hash
    collision never drops a message.
    """
    lsh = MinHashLSH(threshold=near_threshold, num_perm=num_perm)
    kept_shingles: dict[str, set[str]] = {}
    seen_exact: set[str] = set()
    reasons: list[str | None] = []
    for i, text in enumerate(texts):
        if not text.strip():
            reasons.append("empty")
            continue
        if len(text) < min_chars:
            reasons.append("too_short")
            continue
        if len(text) > max_chars:
            reasons.append("too_long")
            continue
        key = exact_key(text)
        if key in seen_exact:
            reasons.append("exact_duplicate")
            continue
        grams = shingles(text)
        sketch = _minhash(grams, num_perm)
        if any(jaccard(grams, kept_shingles[c]) >= near_threshold for c in lsh.query(sketch)):
            reasons.append("near_duplicate")
            continue
        seen_exact.add(key)
        kept_shingles[str(i)] = grams
        lsh.insert(str(i), sketch)
        reasons.append(None)
    return reasons
