"""Extracting synthesised messages from a model's reply and telling which to drop, and why (pure functions)."""
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


_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|[-*•])\s+")
# "Sure, here is a question:" / "Here's one:" / "Okay!" before the message itself.
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course|absolutely)\b[^:\n]{0,60}?(?:[:!.]\s+|:\s*)|"
    r"here(?:'s| is| are)\b[^:\n]{0,60}?:\s*)", re.IGNORECASE)
_QUOTED = re.compile(r"[\"“]([^\"“”]{8,})[\"”]")


def extract_message(raw: str) -> str:
    """The message in a model's reply: its first line that holds one, without list numbering, preambles
    ("Sure, here is a question:"), labels ("Question:") or surrounding quotes. A reply whose first line
    only announces the message ("Here is one:") gives the next line."""
    lines = [line for line in unicodedata.normalize("NFC", raw).replace("\x00", "").splitlines() if line.strip()]
    for line in lines:
        text = _LIST_MARKER.sub("", line, count=1)
        text = _PREAMBLE.sub("", text, count=1)
        quoted = _QUOTED.search(text)
        if quoted and len(quoted.group(1)) >= 0.6 * len(text.strip(_QUOTES + " ")):
            text = quoted.group(1)  # 'Try this: "What is ...?"' -> the quoted message
        text = normalise_message(_LIST_MARKER.sub("", text, count=1))
        if text:
            return text
    return ""


# Openings of a reply in the assistant's own voice, not a person's message to it.
_ASSISTANT_VOICE = re.compile(
    r"^(?:as an? (?:ai|artificial|helpful|language model|assistant)\b|i(?:'m| am) (?:an? ai|an artificial|a language "
    r"model|here to help|happy to help|glad to help|sorry,? but)\b|(?:sure|certainly|of course|absolutely)[,!.]|"
    r"how can i (?:help|assist)\b)", re.IGNORECASE)
# A message about the writing task itself rather than to the assistant.
_META = re.compile(r"\b(?:this (?:question|message|list)|(?:the|this) trait|write (?:a|one|another|more) "
                   r"(?:question|message)s?|(?:questions|messages) like (?:these|this|the above))\b", re.IGNORECASE)
# First words of requests and questions that need no question mark ("Explain ...", "Help me ...").
_REQUEST_OPENERS = frozenset(
    "how what why when where who whom whose which can could would should will shall is are am was were do does did "
    "have has may might please help tell explain give write describe suggest recommend list show teach compare "
    "summarize summarise translate plan draft review check find name imagine convince".split())
_REQUEST_PHRASES = re.compile(r"\b(?:i need|i want|i'd like|i would like|help me|can you|could you|should i|"
                              r"what should|any (?:advice|tips|ideas))\b", re.IGNORECASE)


def content_reason(text: str, require_question: bool) -> str | None:
    """Why an extracted message is not a usable human message (None: it is): `assistant_voice` (the model
    answered instead of writing a message), `meta` (it talks about the writing task), `not_a_question` (no
    question or request in it, when `require_question`)."""
    if _ASSISTANT_VOICE.search(text):
        return "assistant_voice"
    if _META.search(text):
        return "meta"
    if require_question and "?" not in text:
        words = _WORD.findall(text.casefold())
        if not words or (words[0] not in _REQUEST_OPENERS and not _REQUEST_PHRASES.search(text)):
            return "not_a_question"
    return None


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


def near_duplicates_of(reference: list[str], candidates: list[str], *, near_threshold: float,
                       num_perm: int = 64) -> list[int | None]:
    """For each candidate text: the index of a reference text it exactly or nearly duplicates (word 3-gram
    Jaccard >= near_threshold, MinHash LSH then the exact Jaccard, as in `drop_reasons`), else None.
    Used to keep evaluation messages that are near-copies of a training message out of evaluation."""
    lsh = MinHashLSH(threshold=near_threshold, num_perm=num_perm)
    grams: dict[str, set[str]] = {}
    exact: dict[str, int] = {}
    for i, text in enumerate(reference):
        exact.setdefault(exact_key(text), i)
        grams[str(i)] = shingles(text)
        if grams[str(i)]:
            lsh.insert(str(i), _minhash(grams[str(i)], num_perm))
    found: list[int | None] = []
    for text in candidates:
        key = exact_key(text)
        if key in exact:
            found.append(exact[key])
            continue
        mine = shingles(text)
        hits = sorted((int(c) for c in lsh.query(_minhash(mine, num_perm)) if jaccard(mine, grams[c]) >= near_threshold)
                      if mine else [])
        found.append(hits[0] if hits else None)
    return found
