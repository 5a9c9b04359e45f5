"""MedGemma's processor: chat messages with text and images -> token ids + pixel arrays.

What transformers' ``Gemma3Processor`` does, on our tokenizer and medsiglip's preprocessing::

    proc = Processor.from_checkpoint("medgemma-4b-it/")
    out = proc([{"role": "user", "content": [
        {"type": "text", "text": "Describe this X-ray."},
        {"type": "image", "image": "cxr.png"}]}])
    out.input_ids      # [T]: <bos><start_of_turn>user\\nDescribe this X-ray.\\n\\n<start_of_image>
                       #      + 256 x <image_soft_token> + <end_of_image>\\n\\n<end_of_turn>...
    out.pixel_values   # float32 [N, 896, 896, 3] in [-1, 1] (NHWC)

Images: file paths, PIL images, or arrays ``[H, W]`` / ``[H, W, C]`` of uint8, uint16 or float
in [0, 1] (window/level medical images first). Each is squashed to ``image_size`` (PIL bilinear,
antialiased when shrinking: ``medsiglip.preprocess(resample="pil_bilinear")``), rescaled by 1/255
(1/65535 for uint16) and normalized with the checkpoint's mean/std (0.5 / 0.5). Optional
pan-and-scan adds crops of elongated images, each with its own image sequence.

Training: :meth:`Processor.collate` right-pads a batch and builds labels in which pad,
image-soft and ``<start_of_image>`` tokens are ``-100`` (REFERENCE.md section 5).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medsiglip import load_image, preprocess

from .chat import BOI, EOI, IMAGE_TOKEN, format_chat
from .tokenizer import Tokenizer

__all__ = ["IGNORE_INDEX", "Processed", "Processor", "ProcessorConfig", "TrainingBatch",
           "pan_and_scan_boxes"]

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """Image size and soft tokens per image (from ``config.json``), normalization and
    pan-and-scan (from ``preprocessor_config.json``; transformers' defaults otherwise)."""

    image_size: int = 896
    mm_tokens_per_image: int = 256
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    def __post_init__(self) -> None:
        if self.mm_tokens_per_image < 1:
            raise ValueError(f"mm_tokens_per_image must be positive, got {self.mm_tokens_per_image}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    @classmethod
    def from_checkpoint(cls, folder: str | Path, **overrides: Any) -> ProcessorConfig:
        folder = Path(folder)
        kw: dict[str, Any] = {}
        for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
            path = folder / name
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
            data = data.get("image_processor", data)
            if "vision_config" in data:
                kw["image_size"] = int(data["vision_config"].get("image_size", 224))
            if data.get("mm_tokens_per_image") is not None:
                kw["mm_tokens_per_image"] = int(data["mm_tokens_per_image"])
            if data.get("image_seq_length") is not None:
                kw["mm_tokens_per_image"] = int(data["image_seq_length"])
            for key in ("image_mean", "image_std"):
                if data.get(key) is not None:
                    value = data[key]
                    kw[key] = tuple(float(v) for v in (value if isinstance(value, list)
                                                       else [value] * 3))
            for key in ("do_pan_and_scan", "pan_and_scan_min_crop_size",
                        "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate"):
                if data.get(key) is not None:
                    kw[key] = type(getattr(cls, key))(data[key])
        kw.update(overrides)
        return cls(**kw)


@dataclasses.dataclass
class Processed:
    """One prompt: ``input_ids [T]``, ``pixel_values`` float32 ``[N, S, S, 3]`` (NHWC, images
    and their pan-and-scan crops in reading order), ``num_crops`` per input image."""

    input_ids: list[int]
    pixel_values: np.ndarray
    num_crops: list[int]
    image_token_id: int

    @property
    def token_type_ids(self) -> list[int]:
        """1 at image soft tokens, 0 elsewhere (transformers' ``token_type_ids``)."""
        return [int(i == self.image_token_id) for i in self.input_ids]


@dataclasses.dataclass
class TrainingBatch:
    """A right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` where no
    loss), ``token_type_ids`` all int32 ``[B, T]``; ``pixel_values`` ``[N, S, S, 3]`` of every
    row's images in order; ``images_per_row`` ``[B]``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    token_type_ids: np.ndarray
    pixel_values: np.ndarray
    images_per_row: list[int]


def pan_and_scan_boxes(height: int, width: int, *, min_crop_size: int = 256,
                       max_num_crops: int = 4, min_ratio_to_activate: float = 1.2
                       ) -> list[tuple[int, int, int, int]]:
    """Crop boxes ``(top, left, bottom, right)`` for an elongated image (Gemma 3 pan-and-scan):
    2..``max_num_crops`` equal crops along the long side, none when the aspect ratio is below
    ``min_ratio_to_activate`` or a crop would be smaller than ``min_crop_size``."""
    long, short = max(height, width), min(height, width)
    if long / short < min_ratio_to_activate:
        return []
    n = int(math.floor(long / short + 0.5))
    n = min(int(math.floor(long / min_crop_size)), n)
    n = min(max_num_crops, max(2, n))
    n_h, n_w = (1, n) if width >= height else (n, 1)
    crop_h, crop_w = int(math.ceil(height / n_h)), int(math.ceil(width / n_w))
    if min(crop_h, crop_w) < min_crop_size:
        return []
    return [(top, left, min(top + crop_h, height), min(left + crop_w, width))
            for top, left in itertools.product(range(0, crop_h * n_h, crop_h),
                                               range(0, crop_w * n_w, crop_w))]


def _config_image_token(folder: Path) -> int | None:
    """``image_token_index`` (or ``image_token_id``) of the folder's config.json, if any."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    for key in ("image_token_index", "image_token_id"):
        if data.get(key) is not None:
            return int(data[key])
    return None


def _open(image: Any) -> Any:
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype == object or arr.ndim not in (2, 3):
        raise ValueError(f"an image must be a path, a PIL image or an [H, W(, C)] array, got "
                         f"{type(image).__name__} of shape {list(arr.shape)}")
    return arr


def _crop(image: Any, box: tuple[int, int, int, int]) -> Any:
    top, left, bottom, right = box
    if isinstance(image, Image.Image):
        return image.crop((left, top, right, bottom))
    return image[top:bottom, left:right]


def _size(image: Any) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


class Processor:
    """Chat messages / text with ``<start_of_image>`` placeholders + images -> :class:`Processed`."""

    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig = ProcessorConfig()):
        image_id = tokenizer.image_token_id
        if image_id is None:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN}; load the tokenizer of an "
                             f"image-text checkpoint (its tokenizer.json / tokenizer_config.json "
                             f"adds it as id 262144)")
        self.tokenizer = tokenizer
        self.config = config
        self.image_token_id = image_id
        self.boi_id = tokenizer.boi_id
        self.pad_id = tokenizer.pad_id
        tokens = IMAGE_TOKEN * config.mm_tokens_per_image
        self.image_sequence = f"\n\n{BOI}{tokens}{EOI}\n\n"

    @classmethod
    def from_checkpoint(cls, folder: str | Path, tokenizer: Tokenizer | None = None,
                        **overrides: Any) -> Processor:
        """The tokenizer and sizes of a Hugging Face (or our Orbax) image-text folder.

        Where the tokenizer files lack ``<image_soft_token>``, its id comes from config.json
        (``image_token_index``), as the model itself reads it (transformers does the same);
        the tokenizer then gains that token (``processor.tokenizer``)."""
        folder = Path(folder)
        tok = tokenizer if tokenizer is not None else Tokenizer.from_checkpoint(folder)
        if tok.image_token_id is None:
            index = _config_image_token(folder)
            if index is None:
                raise ValueError(
                    f"{folder}: neither its tokenizer files nor config.json (image_token_index) "
                    f"name the image token {IMAGE_TOKEN}; copy the checkpoint's "
                    f"tokenizer_config.json / tokenizer.json there")
            try:
                tok = tok.with_added_tokens({index: IMAGE_TOKEN}, special_ids=(index,))
            except ValueError as exc:
                raise ValueError(f"{folder}: config.json says image_token_index={index}, but "
                                 f"{exc}") from None
        return cls(tok, ProcessorConfig.from_checkpoint(folder, **overrides))

    # ---- images ---------------------------------------------------------------------------
    def _images_with_crops(self, images: Sequence[Any]) -> tuple[list[Any], list[int]]:
        c = self.config
        out, num_crops = [], []
        for image in images:
            image = _open(image)
            boxes = []
            if c.do_pan_and_scan:
                boxes = pan_and_scan_boxes(
                    *_size(image), min_crop_size=c.pan_and_scan_min_crop_size,
                    max_num_crops=c.pan_and_scan_max_num_crops,
                    min_ratio_to_activate=c.pan_and_scan_min_ratio_to_activate)
            out += [image] + [_crop(image, b) for b in boxes]
            num_crops.append(len(boxes))
        return out, num_crops

    def preprocess_images(self, images: Sequence[Any]) -> tuple[np.ndarray, list[int]]:
        """Images -> (float32 ``[N, S, S, 3]`` with the crops after each image, crops per image)."""
        flat, num_crops = self._images_with_crops(images)
        size = self.config.image_size
        if not flat:
            return np.zeros((0, size, size, 3), np.float32), num_crops
        pixels = preprocess(flat, size, resample="pil_bilinear")  # (x - 0.5) / 0.5
        mean = np.asarray(self.config.image_mean, np.float32)
        std = np.asarray(self.config.image_std, np.float32)
        if not (np.all(mean == 0.5) and np.all(std == 0.5)):
            pixels = ((pixels * 0.5 + 0.5) - mean) / std
        return pixels.astype(np.float32), num_crops

    def _replacement(self, crops: int) -> str:
        if not crops:
            return self.image_sequence
        return (f"Here is the original image {self.image_sequence} and here are some crops to "
                f"help you see better " + " ".join([self.image_sequence] * crops))

    # ---- prompts --------------------------------------------------------------------------
    def process_text(self, text: str, images: Sequence[Any] = ()) -> Processed:
        """Text holding one ``<start_of_image>`` per image (e.g. :func:`format_chat` output) ->
        ids with each image expanded, and the pixels (what ``Gemma3Processor(text, images)``
        gives with ``add_special_tokens=False``)."""
        images = list(images)
        if text.count(BOI) != len(images):
            raise ValueError(f"the text has {text.count(BOI)} {BOI} placeholder(s) but "
                             f"{len(images)} image(s) were given; put one image item per image")
        pixels, num_crops = self.preprocess_images(images)
        pieces = text.split(BOI)
        expanded = pieces[0] + "".join(self._replacement(n) + p
                                       for n, p in zip(num_crops, pieces[1:]))
        return Processed(self.tokenizer.encode(expanded), pixels, num_crops, self.image_token_id)

    @staticmethod
    def images_of(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The images of the messages' image items, in order (``image`` or ``path`` key)."""
        found = []
        for n, m in enumerate(messages):
            content = m.get("content") if isinstance(m, Mapping) else None
            if isinstance(content, str) or not isinstance(content, Sequence):
                continue
            for item in content:
                if isinstance(item, Mapping) and item.get("type") == "image":
                    image = item.get("image", item.get("path"))
                    if image is None:
                        raise ValueError(f"message {n}: an image item needs the image under "
                                         f"'image' (a path, PIL image or array)")
                    found.append(image)
        return found

    def __call__(self, messages: Sequence[Mapping[str, Any]], *,
                 add_generation_prompt: bool = True) -> Processed:
        """A conversation in the chat template, its images expanded and preprocessed."""
        text = format_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.process_text(text, self.images_of(messages))

    # ---- training -------------------------------------------------------------------------
    def labels(self, ids: Sequence[int]) -> list[int]:
        """``ids`` with pad, image-soft and ``<start_of_image>`` tokens set to -100."""
        masked = {self.pad_id, self.image_token_id, self.boi_id}
        return [IGNORE_INDEX if i in masked else int(i) for i in ids]

    def collate(self, examples: Sequence[Processed], *, max_length: int | None = None,
                pad_to_multiple_of: int | None = None, mask_prompt: bool = False
                ) -> TrainingBatch:
        """Right-pad processed conversations (prompt + answer, ``add_generation_prompt=False``)
        into a :class:`TrainingBatch`. ``mask_prompt``: also no loss up to and including the
        last ``<start_of_turn>model\\n`` (train on the final answer only). Rows longer than
        ``max_length`` are cut, unless that would cut an image (an error)."""
        if not examples:
            raise ValueError("collate needs at least one example")
        rows, cuts = [], []
        answer = self.tokenizer.encode("<start_of_turn>model\n")
        for n, ex in enumerate(examples):
            ids = list(ex.input_ids)
            # the final answer's start, found before any cut (a cut row whose final answer is
            # past max_length then has no loss, not labels on its prompt or earlier turns)
            cuts.append(_last_occurrence(ids, answer) if mask_prompt else None)
            if max_length is not None and len(ids) > max_length:
                if self.image_token_id in ids[max_length:]:
                    raise ValueError(f"example {n}: {len(ids)} tokens; cutting it to max_length="
                                     f"{max_length} would cut an image; raise max_length")
                ids = ids[:max_length]
            rows.append(ids)
        t = max(len(r) for r in rows)
        if pad_to_multiple_of:
            t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
        b = len(rows)
        input_ids = np.full((b, t), self.pad_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        labels = np.full((b, t), IGNORE_INDEX, np.int32)
        for r, ids in enumerate(rows):
            input_ids[r, :len(ids)] = ids
            mask[r, :len(ids)] = 1
            lab = self.labels(ids)
            if mask_prompt:
                cut = min(len(ids), cuts[r]) if cuts[r] is not None else len(ids)
                lab[:cut] = [IGNORE_INDEX] * cut
            labels[r, :len(ids)] = lab
        pixels = [ex.pixel_values for ex in examples if len(ex.pixel_values)]
        size = self.config.image_size
        return TrainingBatch(
            input_ids, mask, labels, (input_ids == self.image_token_id).astype(np.int32),
            np.concatenate(pixels) if pixels else np.zeros((0, size, size, 3), np.float32),
            [len(ex.pixel_values) for ex in examples])


def _last_occurrence(ids: Sequence[int], pattern: Sequence[int]) -> int | None:
    """Index just after the last occurrence of ``pattern`` in ``ids``."""
    k = len(pattern)
    for i in range(len(ids) - k, -1, -1):
        if list(ids[i:i + k]) == list(pattern):
            return i + k
    return None
