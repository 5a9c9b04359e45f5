"""The Gemma 3 chat format (what the checkpoints' ``chat_template`` renders).

::

    format_chat([{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Hi"}])
    # '<bos><start_of_turn>user\\nBe brief.\\n\\nHi<end_of_turn>\\n<start_of_turn>model\\n'

* A system message (first only) is folded into the first user turn, followed by ``"\\n\\n"``.
* ``assistant`` (or ``model``) turns are written as ``model``; turns must alternate
  user / model, starting with user.
* Content is a string or a list of items ``{"type": "text", "text": ...}`` and
  ``{"type": "image", ...}``, joined in order with no separator; text is stripped of
  surrounding whitespace, an image becomes ``<start_of_image>``.
  :class:`~medgemma_core.processor.Processor` then turns each into the full image sequence
  the image-text model consumes (with the image's soft tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BOI", "BOS", "END_OF_TURN", "EOI", "IMAGE_TOKEN", "START_OF_TURN", "THINK_END", "THINK_START",
    "format_chat", "split_thinking",
]

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
BOI = "<start_of_image>"
EOI = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"
THINK_START = "<unused94>"  # MedGemma 27B's thinking section starts here ...
THINK_END = "<unused95>"    # ... and ends here; the answer follows.

Message = Mapping[str, Any]


def _content(content: Any, where: str, *, strip: bool = True) -> str:
    if isinstance(content, str):
        return content.strip() if strip else content
    if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
        raise ValueError(f"{where}: content must be a str or a list of "
                         f"{{'type': 'text'|'image', ...}} items, got {type(content).__name__}")
    parts = []
    for n, item in enumerate(content):
        kind = item.get("type") if isinstance(item, Mapping) else None
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}, item {n}: a text item needs a str under 'text'")
            parts.append(text.strip() if strip else text)
        elif kind == "image":
            parts.append(BOI)
        else:
            raise ValueError(f"{where}, item {n}: expected {{'type': 'text', 'text': ...}} or "
                             f"{{'type': 'image', ...}}, got {item!r:.80}")
    return "".join(parts)


def format_chat(messages: Sequence[Message], *, add_generation_prompt: bool = True,
                bos: bool = True) -> str:
    """Render a conversation in the Gemma 3 chat format.

    Args:
      messages: ``[{"role": "system"|"user"|"assistant"|"model", "content": str | list}]``;
        an optional system message first, then user and model turns alternating.
      add_generation_prompt: end with ``<start_of_turn>model\\n`` for the model to answer.
      bos: start with ``<bos>`` (leave it off if the tokenizer adds it).

    Raises:
      ValueError: empty conversation, unknown role, misplaced system message, roles that do
        not alternate, or malformed content.
    """
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    messages = list(messages)
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {n}: expected a dict with 'role' and 'content', got {m!r:.80}")
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix = _content(messages[0]["content"], "message 0 (system)", strip=False)
        if BOI in prefix:
            raise ValueError("message 0 (system): images are not allowed in the system message; "
                             "put them in the first user message")
        prefix += "\n\n"
        messages = messages[1:]
        if not messages:
            raise ValueError("a system message must be followed by a user message")
    if not messages:
        raise ValueError("messages is empty; pass at least one user message")
    offset = 1 if prefix else 0
    out = [BOS] if bos else []
    for n, m in enumerate(messages):
        where = f"message {n + offset} ({m['role']})"
        role = {"user": "user", "assistant": "model", "model": "model"}.get(m["role"])
        if role is None:
            if m["role"] == "system":
                raise ValueError(f"{where}: only the first message may be a system message")
            raise ValueError(f"{where}: unknown role {m['role']!r}; use system, user, assistant or model")
        if (role == "user") != (n % 2 == 0):
            raise ValueError(f"{where}: conversation roles must alternate user/model/user/model... "
                             "starting with user (after an optional system message)")
        body = _content(m["content"], where)
        out.append(f"{START_OF_TURN}{role}\n{prefix if n == 0 else ''}{body}{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


def split_thinking(text: str) -> tuple[str | None, str]:
    """``(thought, answer)`` of MedGemma 27B output that thinks between ``<unused94>`` and
    ``<unused95>``; the thought loses its leading ``thought`` label and surrounding whitespace.

    Without a thinking section the result is ``(None, text)``; a section never closed (the
    generation stopped while thinking) gives ``(thought so far, "")``.
    """
    start = text.find(THINK_START)
    end = text.find(THINK_END, start + len(THINK_START) if start >= 0 else 0)
    if start < 0 and end < 0:
        return None, text
    if end < 0:
        return _thought(text[start + len(THINK_START):]), ""
    begin = start + len(THINK_START) if 0 <= start < end else 0
    return _thought(text[begin:end]), text[end + len(THINK_END):].strip()


def _thought(body: str) -> str:
    body = body.strip()
    if body.startswith("thought") and body[len("thought"):len("thought") + 1] in ("", "\n"):
        body = body[len("thought"):]
    return body.strip()
