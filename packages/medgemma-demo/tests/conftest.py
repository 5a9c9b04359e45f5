"""Shared fixtures: fixture paths, a recording stand-in model, and running apps."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[3]


def fixtures_dir() -> Path:
    """The repository's ``fixtures/`` folder (``$MEDGEMMA_FIXTURES`` overrides it)."""
    return Path(os.environ.get("MEDGEMMA_FIXTURES", ROOT / "fixtures"))


@pytest.fixture(scope="session")
def cxr_dcm() -> Path:
    path = fixtures_dir() / "cxr" / "siim_pneumothorax_sample.dcm"
    if not path.is_file():
        pytest.fail(f"fixture {path} missing: it ships in the repository's fixtures/ folder "
                    "(or set MEDGEMMA_FIXTURES to a copy)", pytrace=False)
    return path


class RecordingModel:
    """A stand-in chat model: records every message list it gets and streams a reply that
    describes what it received (text length, image shapes), a few characters at a time."""

    def __init__(self, *, multimodal: bool, name: str = "recording-model", delay: float = 0.0):
        self.name = name
        self._multimodal = multimodal
        self.delay = delay
        self.calls: list[list[dict]] = []
        self.kwargs: list[dict] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    @property
    def is_multimodal(self) -> bool:
        return self._multimodal

    def chat_stream(self, messages: Sequence[dict], **kw) -> Iterator[str]:
        import time

        with self.lock:
            self.calls.append(list(messages))
            self.kwargs.append(kw)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            images = [item["image"] for m in messages if isinstance(m["content"], list)
                      for item in m["content"] if item["type"] == "image"]
            if images and not self._multimodal:
                raise ValueError("recording-model is text-only; load an image-text checkpoint")
            reply = f"seen {len(messages)} messages and {len(images)} images " + " ".join(
                f"{img.shape[0]}x{img.shape[1]}" for img in images)
            for k in range(0, len(reply), 4):
                if self.delay:
                    time.sleep(self.delay)
                yield reply[k:k + 4]
        finally:
            with self.lock:
                self.active -= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(app, config) -> str:
    from medgemma_demo import launch_kwargs

    app.launch(**launch_kwargs(config, server_name="127.0.0.1", server_port=free_port(),
                               prevent_thread_lock=True, quiet=True))
    return app.local_url


def solid_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Path:
    from PIL import Image

    Image.fromarray(np.full((size[1], size[0], 3), rgb, np.uint8)).save(path)
    return path


def save_tiny_checkpoint(folder: Path) -> Path:
    """A tiny random Gemma 3 decoder with the real Gemma 3 tokenizer, saved as an Orbax folder
    that ``medgemma_core.load`` (and ``medgemma-train``) read. Needs no torch."""
    from flax import nnx

    from medgemma_core import Gemma3, Gemma3Config, save_decoder
    from medgemma_core.testing import gemma3_tokenizer

    save_decoder(Gemma3(Gemma3Config.tiny(vocab_size=262144), rngs=nnx.Rngs(0)), folder)
    gemma3_tokenizer().save(folder)
    return folder
