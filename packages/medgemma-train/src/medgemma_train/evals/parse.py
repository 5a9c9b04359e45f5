"""Answer parsers for the ``generate`` mode: a model's free text -> the answer it gives.

:func:`parse_choice` finds the option letter of a multiple-choice answer. In order, the first
rule that finds an answer wins:

1. Thinking is dropped: text up to the last ``<unused95>`` (MedGemma 27B) or ``</think>``;
   a thinking section never closed gives no answer. Markdown emphasis (``**``, ``__``) and
   backticks are removed.
2. An explicit statement, the last one in the text: ``answer``, ``final answer``, ``correct
   answer/option``, ``option``, ``choice`` followed by ``is`` / ``:`` / ``would be`` ...
   and a letter, bare or in ``()`` / ``[]``: ``Answer: B``, ``The correct answer is (C)``.
   A lower-case letter counts only in brackets, before ``.`` / ``)`` / ``:`` or at the end
   (so ``the answer is a viral infection`` is no ``A``); ``not B`` and ``isn't B`` are skipped, and
   after one, ``it is C`` / ``but C`` / ``rather C`` is the answer.
3. A letter at the start: ``B``, ``(B)``, ``[B]``, ``B.``, ``B)``, ``B:``, ``B - text``,
   ``b)``; a bare ``A`` followed by a word counts only when that word starts option A's
   text (``A 45-year-old...`` is an article, not an answer).
4. The text of exactly one option (case and punctuation ignored, whole words), where an
   option whose text lies inside another found option's text does not count.
5. Exactly one distinct letter in brackets anywhere: ``... so (D) fits``.

Otherwise None (scored wrong, counted as unparsed). :func:`parse_labels` finds the labels a
multi-label answer names; :func:`parse_short` the short answer of a VQA question.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

THINK_ENDS = ("<unused95>", "</think>")
THINK_STARTS = ("<unused94>", "<think>")

_KEYWORDS = (r"(?:final\s+answer|correct\s+answer|correct\s+option|correct\s+choice|"
             r"best\s+answer|right\s+answer|answer|option|choice)")
_LINK = r"(?:\s*(?:is|would\s+be|should\s+be|will\s+be|=|:|-|->)\s*|\s+)"


def strip_thinking(text: str) -> str | None:
    """The text after a thinking section; None when one was opened but never closed."""
    for end in THINK_ENDS:
        if end in text:
            return text.rsplit(end, 1)[1]
    if any(s in text for s in THINK_STARTS):
        return None
    return text


def _clean(text: str) -> str:
    return re.sub(r"\*\*|__|`", "", text).strip()


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def _explicit(text: str, letters: str) -> str | None:
    """The letter of the last explicit answer statement (keywords in any case, the letter
    as rule 2 of the module docstring), skipping negated ones."""
    pattern = re.compile(
        rf"\b(?i:{_KEYWORDS})"
        rf"(?P<neg1>\s+(?i:is\s+not|isn't|cannot\s+be|can't\s+be|is\s+definitely\s+not))?"
        rf"{_LINK}(?:(?i:option|choice|letter)\s+)?(?P<neg2>(?i:not)\s+)?"
        rf"(?:[\(\[](?P<br>[{letters}{letters.lower()}])[\)\]]"
        rf"|(?P<up>[{letters}])(?![\w'-])"
        rf"|(?P<low>[{letters.lower()}])(?=[\.\):]|\s*$))")
    found, negated = None, -1
    for m in pattern.finditer(text):
        if m.group("neg1") or m.group("neg2"):
            negated = m.end()
        else:
            found = (m.group("br") or m.group("up") or m.group("low")).upper()
    if found is None and negated >= 0:  # "the answer is not A, it is C"
        fix = re.search(rf"\b(?i:it\s+is|it's|but|rather|instead)\s+[\(\[]?([{letters}])"
                        rf"(?![\w'-])", text[negated:])
        found = fix.group(1) if fix else None
    return found


def _leading(text: str, options: Mapping[str, str], letters: str) -> str | None:
    m = re.match(rf"^[\(\[]?([{letters}{letters.lower()}])[\)\]]?(?=$|[\s\.\):\-,;])(.*)$",
                 text, re.DOTALL)
    if not m:
        return None
    letter, rest = m.group(1), m.group(2)
    bracketed = text[0] in "([" or text[1:2] in (")", "]")
    if not rest.strip() or bracketed or rest[:1] in (".", ")", ":", "-", ",", ";"):
        if letter.islower() and not (bracketed or rest[:1] in (".", ")", ":")) and rest.strip():
            return None
        return letter.upper()
    if letter.isupper():  # "A word...": an answer only if it is option A's text
        opt = _norm(options.get(letter, ""))
        return letter if opt and _norm(rest).startswith(opt) else None
    return None


def _by_text(text: str, options: Mapping[str, str]) -> str | None:
    said = f" {_norm(text)} "
    found = {k: _norm(v) for k, v in options.items() if _norm(v) and f" {_norm(v)} " in said}
    kept = [k for k, v in found.items()
            if not any(v != w and f" {v} " in f" {w} " for w in found.values())]
    return kept[0] if len(kept) == 1 else None


def parse_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter ``text`` answers with, or None (rules in the module docstring)."""
    body = strip_thinking(text)
    if body is None:
        return None
    body = _clean(body)
    if not body:
        return None
    letters = "".join(sorted(options)) or "ABCDE"
    for rule in (lambda: _explicit(body, letters), lambda: _leading(body, options, letters),
                 lambda: _by_text(body, options)):
        found = rule()
        if found is not None and found in options:
            return found
    bracketed = set(re.findall(rf"[\(\[]([{letters}])[\)\]]", body))
    return bracketed.pop() if len(bracketed) == 1 else None


_NEGATION = re.compile(r"\b(?:no|without|negative\s+for|absence\s+of|not|free\s+of)\s+"
                       r"(?:\w+\s+){0,2}$")


def parse_labels(text: str, labels: Sequence[str]) -> tuple[str, ...]:
    """The labels a free-text answer says are present (case-insensitive, whole words, an
    ``s`` plural allowed); a mention right after ``no``, ``without``, ``negative for``,
    ``absence of``, ``not``, ``free of`` (up to two words between) does not count."""
    body = strip_thinking(text) or ""
    low = _clean(body).lower()
    present = []
    for label in labels:
        words = r"[\s_-]+".join(re.escape(w) for w in label.lower().split())
        for m in re.finditer(rf"\b{words}s?\b", low):
            if not _NEGATION.search(low[max(0, m.start() - 40):m.start()]):
                present.append(label)
                break
    return tuple(present)


def parse_short(text: str, gold: str) -> str:
    """A VQA answer: for a yes/no question (gold ``yes`` or ``no``) the first ``yes`` / ``no``
    word; otherwise the first line, without a leading ``Answer:`` and a trailing period."""
    body = _clean(strip_thinking(text) or "")
    if gold.strip().lower() in ("yes", "no"):
        m = re.search(r"\b(yes|no)\b", body.lower())
        return m.group(1) if m else body.split("\n", 1)[0].strip()
    line = body.split("\n", 1)[0].strip()
    line = re.sub(r"^(?i:answer)\s*[:\-]\s*", "", line)
    return line.rstrip(".").strip()
