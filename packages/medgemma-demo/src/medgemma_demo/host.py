"""Models loaded in a background thread, so the page is usable while weights load.

:class:`Loader` runs ``load()`` (and an optional warm-up that triggers XLA compilation) in a
daemon thread and reports its state for the page. :class:`ChatModel` is the narrow interface the
demo needs from a chat model (``medgemma_core.MedGemma`` satisfies it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from medgemma_core import Sampling

log = logging.getLogger("medgemma_demo")

T = TypeVar("T")


class ChatModel(Protocol):
    """What the demo needs from a chat model (``medgemma_core.MedGemma`` has it).

    ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str | list[item]}]`` with
    items ``{"type": "text", "text": str}`` or ``{"type": "image", "image": uint8 [H, W, 3]}``.
    """

    name: str

    @property
    def is_multimodal(self) -> bool: ...

    def chat_stream(self, messages: Sequence[dict], *, max_new_tokens: int = ...,
                    sampling: Sampling = ...) -> Iterator[str]: ...


class Loader(Generic[T]):
    """Load a model in a background thread.

    ``load``: returns the model (its exceptions become :attr:`error`, a one-line message);
    ``warmup``: optional, called with the loaded model (e.g. one short generation, so the first
    user request does not pay for compilation); ``what``: a name for messages.
    """

    def __init__(self, load: Callable[[], T], *, warmup: Callable[[T], Any] | None = None,
                 what: str = "model"):
        self._load = load
        self._warmup = warmup
        self.what = what
        self.value: T | None = None
        self.error: str | None = None
        self.phase = "waiting"  # waiting -> loading -> compiling -> ready | failed
        self.started = time.monotonic()
        self.ready_after: float | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def ready(cls, value: T, *, what: str = "model") -> Loader[T]:
        """A loader that already holds ``value`` (tests, or a model loaded by the caller)."""
        loader = cls(lambda: value, what=what)
        loader.value, loader.phase, loader.ready_after = value, "ready", 0.0
        loader._done.set()
        return loader

    def start(self) -> Loader[T]:
        """Start loading in a daemon thread (idempotent); returns ``self``."""
        if self._thread is None and not self._done.is_set():
            self.started = time.monotonic()
            self._thread = threading.Thread(target=self._run, name=f"load-{self.what}",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.phase = "loading"
            value = self._load()
            if self._warmup is not None:
                self.phase = "compiling"
                self._warmup(value)
            self.value = value
            self.phase = "ready"
            self.ready_after = time.monotonic() - self.started
            log.info("%s ready after %.1f s", self.what, self.ready_after)
        except Exception as exc:  # shown in the page; the app keeps running
            self.error = one_line(exc)
            self.phase = "failed"
            log.error("%s failed to load: %s", self.what, type(exc).__name__)
        finally:
            self._done.set()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait(self, timeout: float | None = None) -> T | None:
        """Block until loaded (or failed, or ``timeout``); the model or ``None``."""
        self._done.wait(timeout)
        return self.value

    @property
    def done(self) -> bool:
        return self._done.is_set()


def text_engine(model: Any) -> bool:
    """Whether ``model`` is a loaded medgemma-core text-only model (not an image-text model,
    not a stand-in without an engine, not None while loading): the one that prompts as a base
    model when it has no chat template, and whose Train-tab runs pack rows."""
    return model is not None and hasattr(model, "engine") and not model.is_multimodal


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, prefixed by its type when the message is empty."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
