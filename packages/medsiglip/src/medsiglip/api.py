"""The Python API: load a checkpoint, embed images and texts, zero-shot classify.

    from medsiglip import MedSigLIP
    model = MedSigLIP.from_pretrained("path/to/medsiglip-448")
    img = model.embed_images(["cxr.png"])                      # [1, 1152], L2-normalized
    probs = model.zero_shot(["cxr.png"], ["pneumothorax", "normal chest x-ray"])  # [1, 2]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medsiglip.checkpoints.hf import load_siglip
from medsiglip.checkpoints.orbax_io import restore_checkpoint
from medsiglip.model import SiglipModel, l2_normalize
from medsiglip.preprocess import ImageLike, Resample, preprocess
from medsiglip.tokenizer import SiglipTokenizer, find_tokenizer_file
from medsiglip.weights import CheckpointError, is_saved


def _compile(model: nnx.Module, fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``jax.jit`` of ``fn(module, *args)`` over the split state (weights are not constants)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state: Any, *args: jax.Array) -> jax.Array:
        return fn(nnx.merge(graphdef, state), *args)

    return lambda *args: run(state, *args)


def _processor_resample(folder: Path) -> Resample:
    """The resize filter of a HF ``preprocessor_config.json`` (PIL codes: 2 bilinear,
    3 bicubic); SiglipImageProcessor's default, bicubic, when absent."""
    path = folder / "preprocessor_config.json"
    try:
        code = json.loads(path.read_text()).get("resample", 3) if path.is_file() else 3
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    return "pil_bilinear" if code == 2 else "bicubic"


class MedSigLIP:
    """A two-tower SigLIP with its tokenizer and preprocessing.

    ``batch_size``: images/texts per compiled call (inputs are padded to it, so one shape is
    compiled). ``resample``: see :func:`medsiglip.preprocess`.
    """

    def __init__(self, model: SiglipModel, tokenizer: SiglipTokenizer | None, *,
                 resample: Resample = "bicubic", pad_to_square: bool = False,
                 batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.resample: Resample = resample
        self.pad_to_square = pad_to_square
        self.batch_size = batch_size
        self.image_size = model.config.vision.image_size
        self._image = _compile(model, lambda m, x: l2_normalize(m.image_features(x)))
        self._text = _compile(model, lambda m, ids: l2_normalize(m.text_features(ids)))
        self._logits = _compile(model, lambda m, i, t: m.logits(i, t))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: jnp.dtype = jnp.float32,
                        image_size: int | None = None, resample: Resample | None = None,
                        **kwargs: Any) -> MedSigLIP:
        """A HF ``SiglipModel`` folder (config.json + safetensors + spiece.model) or an Orbax
        folder written by :func:`medsiglip.save_checkpoint`.

        ``resample=None`` follows the folder's ``preprocessor_config.json`` as transformers'
        processor would (PIL bilinear for ``resample: 2``, bicubic otherwise).
        """
        path = Path(path)
        if resample is None:
            resample = _processor_resample(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint folder")
        if is_saved(path):
            model = restore_checkpoint(path)
            if not isinstance(model, SiglipModel):
                raise CheckpointError(f"{path} holds a vision tower only; a two-tower SigLIP "
                                      "checkpoint is needed")
        else:
            model = load_siglip(path, dtype=dtype, image_size=image_size)
        try:
            tok_file = find_tokenizer_file(path)
        except FileNotFoundError:
            tokenizer = None
        else:
            tokenizer = SiglipTokenizer(tok_file, max_length=model.config.text.max_positions)
        return cls(model, tokenizer, resample=resample, **kwargs)

    def _batched(self, fn: Callable[[jax.Array], jax.Array], x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(fn(jnp.asarray(chunk)))[: self.batch_size - pad])
        return np.concatenate(out)

    def embed_images(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Images (paths, PIL, arrays) -> L2-normalized embeddings ``float32 [B, D]``."""
        pixels = preprocess(images, self.image_size, resample=self.resample,
                            pad_to_square=self.pad_to_square)
        return self.embed_pixels(pixels)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed ``[B, S, S, 3]`` in [-1, 1] -> L2-normalized ``[B, D]``."""
        return self._batched(self._image, np.asarray(pixels, np.float32))

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Texts -> L2-normalized embeddings ``float32 [B, D]``."""
        if self.tokenizer is None:
            raise CheckpointError("this checkpoint has no spiece.model: texts cannot be "
                                  "tokenized; copy the SentencePiece model into its folder")
        return self._batched(self._text, self.tokenizer.encode(texts))

    def logits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """Normalized ``[Bi, D]``, ``[Bt, D]`` -> ``[Bi, Bt]`` scaled, biased cosine logits."""
        return np.asarray(self._logits(jnp.asarray(image_embeds), jnp.asarray(text_embeds)))

    def zero_shot(self, images: ImageLike | Sequence[ImageLike],
                  labels: Sequence[str]) -> np.ndarray:
        """Per-label sigmoid probabilities ``[B, len(labels)]`` (labels scored independently;
        rows need not sum to one)."""
        if isinstance(labels, str) or not labels:
            raise ValueError("labels must be a non-empty list of strings")
        logits = self.logits(self.embed_images(images), self.embed_texts(list(labels)))
        return 1.0 / (1.0 + np.exp(-logits))
