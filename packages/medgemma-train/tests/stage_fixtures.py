"""Builders the siglip and pretrain stage tests share: synthetic shape / colour images with
their captions, caption manifests, and a tiny random two-tower SigLIP checkpoint (a Hugging
Face folder written by medsiglip, with a SentencePiece model trained on the captions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 20)}
SHAPES = ("square", "circle", "cross", "bar")
#: a second, disjoint vocabulary of concepts ("medical" in the mixture tests)
TEXTURES = ("stripes", "dots", "checks", "rings")


def _mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    s = size // 2
    yy, xx = np.mgrid[:s, :s]
    c = (s - 1) / 2
    if shape == "square":
        m = np.ones((s, s), bool)
    elif shape == "circle":
        m = (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2) ** 2
    elif shape == "cross":
        m = (np.abs(yy - c) < s / 6) | (np.abs(xx - c) < s / 6)
    else:  # a horizontal bar
        m = np.abs(yy - c) < s / 5
    out = np.zeros((size, size), bool)
    y, x = rng.integers(0, size - s + 1, 2)
    out[y:y + s, x:x + s] = m
    return out


def shape_image(colour: str, shape: str, rng: np.random.Generator, size: int = 32
                ) -> np.ndarray:
    """A ``colour`` ``shape`` at a random place on dim noise (uint8 ``[size, size, 3]``)."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    img[_mask(shape, size, rng)] = COLOURS[colour]
    return img


def texture_image(texture: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A grey ``texture`` (stripes, dots, checks, rings) with a random phase."""
    yy, xx = np.mgrid[:size, :size] + rng.integers(0, 8, 2)[:, None, None]
    if texture == "stripes":
        m = (xx // 4) % 2 == 0
    elif texture == "dots":
        m = ((yy % 8) < 3) & ((xx % 8) < 3)
    elif texture == "checks":
        m = ((yy // 8) + (xx // 8)) % 2 == 0
    else:
        c = size / 2
        m = (np.sqrt((yy - c) ** 2 + (xx - c) ** 2) // 4) % 2 == 0
    img = np.full((size, size, 3), 40, np.uint8)
    img[m] = 200
    return img


def shape_pairs(folder: Path, n: int, seed: int) -> list[dict]:
    """``n`` shape images (the 16 colour x shape classes in turn) saved as PNG, with their
    captions ("red circle")."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n):
        colour, shape = classes[i % len(classes)]
        Image.fromarray(shape_image(colour, shape, rng)).save(folder / f"{i}.png")
        rows.append({"path": str(folder / f"{i}.png"), "caption": f"{colour} {shape}"})
    return rows


def texture_pairs(folder: Path, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        texture = TEXTURES[i % len(TEXTURES)]
        Image.fromarray(texture_image(texture, rng)).save(folder / f"{i}.png")
        rows.append({"path": str(folder / f"{i}.png"), "caption": f"grey {texture}"})
    return rows


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus() -> list[str]:
    return ([f"{c} {s}" for c in COLOURS for s in SHAPES] + [f"grey {t}" for t in TEXTURES]
            + list(COLOURS) + list(SHAPES) + list(TEXTURES))


def word_sentencepiece(path: Path, words: list[str]) -> Path:
    """A unigram SentencePiece model whose pieces are ``words`` (plus the lower-case letters
    as a fallback) and SigLIP's specials (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), built as a
    ``ModelProto`` (instant, where training one takes seconds on a busy machine)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    kinds = pb.ModelProto.SentencePiece.Type
    for piece, kind in (("<pad>", kinds.CONTROL), ("</s>", kinds.CONTROL),
                        ("<unk>", kinds.UNKNOWN)):
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    for w in sorted(set(words)):
        proto.pieces.add(piece="\u2581" + w, score=-1.0, type=kinds.NORMAL)
    for c in "\u2581abcdefghijklmnopqrstuvwxyz":
        proto.pieces.add(piece=c, score=-10.0, type=kinds.NORMAL)
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = 2, -1
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 1, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def tiny_siglip_checkpoint(folder: Path, *, seed: int = 0, image_size: int = 32,
                           layers: int = 2) -> Path:
    """A random tiny two-tower SigLIP (width 32) as a Hugging Face folder with spiece.model
    (:func:`word_sentencepiece` over the captions' words)."""
    from flax import nnx

    from medsiglip import (
        SiglipConfig,
        SiglipModel,
        SiglipTextConfig,
        SiglipTokenizer,
        SiglipVisionConfig,
        save_hf,
    )

    spiece = word_sentencepiece(folder.parent / f"{folder.name}-spiece.model",
                                [w for line in corpus() for w in line.split()])
    vocab = SiglipTokenizer(spiece).vocab_size
    cfg = SiglipConfig(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4,
                           patch_size=8, image_size=image_size),
        SiglipTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_layers=layers, num_heads=4, max_positions=8, projection_size=32))
    save_hf(nnx.jit(lambda: SiglipModel(cfg, rngs=nnx.Rngs(seed)))(), folder)  # one compile
    (folder / "spiece.model").write_bytes(spiece.read_bytes())
    return folder


def stage_config(name: str, base: dict, overrides: tuple[str, ...] = ()):
    """``(config, stage)``: the stage's defaults, then ``base`` (nested dicts), then the
    dotted ``overrides``, as ``medgemma-train NAME`` resolves them."""
    from medgemma_train.engine.config import load_config
    from medgemma_train.engine.stages import get_stage

    stage = get_stage(name)
    defaults: dict = {"stage": name}
    for key, value in stage.defaults.items():
        node = defaults
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return load_config(base=defaults, flags=base, overrides=overrides,
                       settings=stage.settings), stage
