"""Chat turns -> the message list a :class:`~medgemma_demo.host.ChatModel` reads.

A user turn is the typed question followed by the parts of every attached sample, in order
(images as ``uint8 [H, W, 3]`` items, the plugins' text such as ``SLICE 3`` or a FHIR summary as
text items). A text-only model gets the text parts only; :func:`user_turn` reports how many
images it left out so the page can say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medgemma_data import ImagePart, Sample, TextPart


@dataclass(frozen=True)
class Turn:
    """One user turn as sent to the model: ``content`` (str or items), images left out."""

    content: str | list[dict]
    dropped_images: int


def user_turn(text: str, samples: Sequence[Sample], *, multimodal: bool) -> Turn:
    """The user's ``text`` plus the attached ``samples``' parts.

    Multimodal: ``[{"type": "text"}, {"type": "image"}, ...]`` in sample order.
    Text-only: one string, the texts joined by blank lines; images are counted in
    ``dropped_images``.
    """
    text = text.strip()
    if multimodal:
        items: list[dict] = [{"type": "text", "text": text}] if text else []
        for sample in samples:
            for part in sample.parts:
                if isinstance(part, ImagePart):
                    items.append({"type": "image", "image": part.image})
                elif isinstance(part, TextPart) and part.text.strip():
                    items.append({"type": "text", "text": part.text})
        has_image = any(i["type"] == "image" for i in items)
        if not has_image:  # plain text: the simplest form every model takes
            return Turn("\n\n".join(i["text"] for i in items), 0)
        return Turn(items, 0)
    texts = [text] if text else []
    dropped = 0
    for sample in samples:
        for part in sample.parts:
            if isinstance(part, ImagePart):
                dropped += 1
            elif isinstance(part, TextPart) and part.text.strip():
                texts.append(part.text.strip())
    # Slice labels (SLICE 3) mean nothing without their images.
    if dropped:
        texts = [t for t in texts if not t.upper().startswith("SLICE ")]
    return Turn("\n\n".join(texts), dropped)


def messages(system: str, history: Sequence[dict], turn: Turn) -> list[dict]:
    """``[system?] + history + [user turn]``; ``history`` alternates user / assistant."""
    out: list[dict] = []
    if system.strip():
        out.append({"role": "system", "content": system.strip()})
    out.extend(history)
    out.append({"role": "user", "content": turn.content})
    return out
