"""Shared fixtures: a SentencePiece model trained here, tiny random transformers checkpoints
saved with ``save_pretrained`` (the independent reference for parity tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medsiglip.config import SiglipConfig, SiglipVisionConfig  # noqa: E402
from medsiglip.testing import train_sentencepiece  # noqa: E402

CORPUS = [
    "a chest x-ray showing pneumonia", "normal chest radiograph",
    "the patient has a left pleural effusion", "histopathology of colorectal adenocarcinoma",
    "benign nevus on dermoscopy", "fundus photograph with diabetic retinopathy",
    "ct scan of the abdomen", "résumé café naïve über straße", "mri brain t2 weighted lesion",
    "pneumothorax on the right side", "cardiomegaly with mild edema",
]


@pytest.fixture(scope="session")
def spiece_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small unigram SentencePiece model with SigLIP's special pieces (pad 0, eos 1, unk 2)."""
    return train_sentencepiece(tmp_path_factory.mktemp("spm"), CORPUS, vocab_size=90)


TINY = SiglipConfig.tiny(vocab_size=128, image_size=32)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (HF inits LayerNorms to 1/0, biases to 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + offset)


@pytest.fixture(scope="session")
def hf_siglip_dir(tmp_path_factory: pytest.TempPathFactory, spiece_model: Path) -> Path:
    """A tiny random transformers ``SiglipModel`` (MAP head) + spiece.model, saved to disk."""
    _seed(0)
    model = transformers.SiglipModel(transformers.SiglipConfig(**TINY.to_hf_dict())).eval()
    _randomize(model, 1)
    folder = tmp_path_factory.mktemp("hf_siglip")
    model.save_pretrained(folder)
    shutil.copyfile(spiece_model, folder / "spiece.model")
    return folder


@pytest.fixture(scope="session")
def hf_siglip(hf_siglip_dir: Path) -> torch.nn.Module:
    return transformers.SiglipModel.from_pretrained(hf_siglip_dir).eval()


def vision_hf_model(config: SiglipVisionConfig, seed: int) -> torch.nn.Module:
    _seed(seed)
    model = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**config.to_hf_dict())
    ).eval()
    _randomize(model, seed + 1)
    return model


def pixels(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Random normalized images ``[B, S, S, 3]`` in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def jit_call(module, method: str = "__call__", *args):
    """``getattr(module, method)(*args)`` compiled once (eager flax runs op by op: slow)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a))
    return fn(state, *args)
