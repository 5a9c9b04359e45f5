"""Samples -> chat messages, the form MedGemma's processor and chat template read.

    >>> [ct] = medgemma_data.load("series_folder/")
    >>> ct.to_messages(question="Any acute findings?", system="You are a radiologist.")
    [{"role": "system", "content": "You are a radiologist."},
     {"role": "user", "content": [{"type": "text", "text": "Any acute findings?"},
                                  {"type": "image", "image": <uint8 [H, W, 3]>},
                                  {"type": "text", "text": "SLICE 1"}, ...]}]

The user turn is the question followed by every sample's parts, in order: image parts as
``{"type": "image", "image": uint8 [H, W, 3]}`` items, text parts (``SLICE k`` after its CT
slice, a FHIR summary, a QA question) as ``{"type": "text", "text": ...}`` items; blank text
parts are skipped. A turn without images is one string, the texts joined by blank lines, the
simplest form every chat model takes. Numpy only: no model package is needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .sample import ImagePart, Sample, TextPart

#: Text parts that label the image before them (``SLICE 3``, ``FRAME 12 (t = 0.40 s)``);
#: without their images (``images=False``) they mean nothing and are left out too.
IMAGE_LABEL = re.compile(r"(SLICE|FRAME) \d+\b", re.IGNORECASE)


def to_messages(samples: Sample | Sequence[Sample], question: str | None = None, *,
                answer: str | None = None, system: str | None = None,
                images: bool = True) -> list[dict]:
    """``[system?, user, assistant?]`` for one sample or several (their parts in order).

    ``question``: text put before the samples' parts (stripped; none when empty).
    ``answer``: when given, an assistant turn with it (for training); ``system``: a system
    turn first when not blank. ``images=False`` (a text-only model): image parts and their
    ``SLICE k`` / ``FRAME k`` labels are dropped and the user turn is one string.
    """
    if isinstance(samples, Sample):
        samples = [samples]
    items: list[dict] = []
    question = (question or "").strip()
    if question:
        items.append({"type": "text", "text": question})
    for sample in samples:
        if not isinstance(sample, Sample):
            raise TypeError(f"to_messages takes Sample records, got {type(sample).__name__}; "
                            "load files with medgemma_data.load first")
        for part in sample.parts:
            if isinstance(part, ImagePart):
                if images:
                    items.append({"type": "image", "image": part.image})
            elif isinstance(part, TextPart) and part.text.strip():
                if images or not IMAGE_LABEL.match(part.text.strip()):
                    items.append({"type": "text", "text": part.text})
    content: str | list[dict] = items
    if not any(item["type"] == "image" for item in items):
        content = "\n\n".join(item["text"].strip() for item in items)
    out: list[dict] = []
    if system is not None and system.strip():
        out.append({"role": "system", "content": system.strip()})
    out.append({"role": "user", "content": content})
    if answer is not None:
        out.append({"role": "assistant", "content": answer})
    return out
