"""The built-in ``siglip`` stage: MedSigLIP contrastive tuning (MedGemma's stage 1).

The two-tower SigLIP (``model.checkpoint``: a Hugging Face ``SiglipModel`` folder such as
google/medsiglip-448, or an Orbax folder written by medsiglip) is fine-tuned on image-caption
pairs (:mod:`.captions` manifests) with the sigmoid pairwise loss, chunked across the
data-parallel devices (:mod:`.contrastive`: texts travel round the ring, no device holds the
global ``B x B`` logits). The temperature and bias are learned, starting from the
checkpoint's. The report mixes medical pairs in at 2% of the original general data: give two
sources with weights, e.g. ``data.train: [{path: general.jsonl, weight: 98}, {path:
medical.jsonl, weight: 2}]``.

Settings (section ``siglip:``): ``resolution`` trains at 448 or 896 (or any multiple of the
patch size; 0 = the checkpoint's), with the position embeddings resized; ``export_resolution``
writes the exported folder at another resolution (0 = the training one); ``labels`` and
``template`` give the zero-shot label set. Validation (``run.eval_every``) on
``data.eval`` caption manifests reports image-to-text retrieval top-1 per source
(``retrieval_top1/NAME``; candidates: that source's distinct captions) and over all
(``retrieval_top1``), and with ``labels``, zero-shot accuracy and macro one-vs-rest AUC over
the rows whose ``label`` (or caption) is one of them. At the end ``RUN/export/hf`` is a
MedSigLIP Hugging Face folder (``siglip.export: false`` skips it).

A step's "tokens" are its rows: ``tokens_per_s`` in ``metrics.jsonl`` is image-text pairs
per second.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .captions import CaptionExample, read_caption_source
from .data import DataError
from .stages import DataSpec, Prepared, StageSpec, hookimpl

__all__ = ["SIGLIP", "CaptionEncoder", "SiglipSettings", "at_resolution", "export_siglip",
           "load_siglip_model", "retrieval_metrics", "siglip_loss"]


@dataclasses.dataclass(frozen=True)
class SiglipSettings:
    """The ``siglip:`` section. ``ring``: the loss over the devices' ring (False: each
    device's rows only against its own texts, the per-device loss of big_vision's
    ``local_loss``); ``chunk``: texts per block of the loss on one device (0 = all);
    ``text_length``: tokens per caption (0 = the text tower's positions);
    ``image_cache``: decoded images kept in memory (0 = none)."""

    resolution: int = 0
    export_resolution: int = 0
    text_length: int = 0
    labels: tuple[str, ...] = ()
    template: str = "{}"
    ring: bool = True
    chunk: int = 0
    export: bool = True
    image_cache: int = 4096
    eval_batch: int = 64
    #: share of the draws for the sources named medical* when no weight is given (98:2)
    medical_share: float = 0.02


def _opts(cfg: Any) -> SiglipSettings:
    return cfg.options if isinstance(cfg.options, SiglipSettings) else SiglipSettings()


# ---- the model --------------------------------------------------------------------------------
def at_resolution(model: Any, size: int) -> Any:
    """``model`` (a ``SiglipModel``) at ``size`` pixels: the same weights, the position
    embedding resampled to the new grid (:func:`medsiglip.resize_position_embedding`)."""
    from flax import nnx

    from medsiglip import SiglipModel, resize_position_embedding

    vision = model.config.vision
    if size == vision.image_size:
        return model
    if size % vision.patch_size:
        raise ValueError(f"siglip.resolution={size} is not a multiple of the patch size "
                         f"{vision.patch_size}; use e.g. 448 or 896")
    config = model.config.replace(vision=vision.replace(image_size=size))
    new = nnx.eval_shape(lambda: SiglipModel(config, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(new)):
        old = flat[path]
        value = old.get_value()
        if path[0] == "vision" and path[-1] == "position_embedding":
            value = resize_position_embedding(value, config.vision.grid_size)
        out.append((path, var.replace(value=value)))
    nnx.update(new, nnx.from_flat_state(out))
    return new


def load_siglip_model(path: Path, size: int = 0) -> Any:
    """A ``SiglipModel`` from a Hugging Face or Orbax folder, at ``size`` (0: its own)."""
    from medsiglip import SiglipModel
    from medsiglip.checkpoints.export import load_any

    model = load_any(path)
    if not isinstance(model, SiglipModel):
        raise ValueError(f"{path} holds a vision tower only; the siglip stage needs a two-tower "
                         f"SigLIP checkpoint (model_type 'siglip', e.g. google/medsiglip-448)")
    return at_resolution(model, size) if size else model


def prepare(cfg: Any) -> Prepared:
    from flax import nnx

    from medsiglip import CheckpointError, SiglipTokenizer
    from medsiglip.tokenizer import find_tokenizer_file

    opts = _opts(cfg)
    if not cfg.model.checkpoint:
        raise ValueError("no checkpoint; pass --checkpoint (a Hugging Face SigLIP folder, e.g. "
                         "medsiglip-448, or an Orbax folder) or set model.checkpoint")
    path = Path(cfg.model.checkpoint).expanduser()
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} not found; pass an existing SigLIP folder")
    if cfg.lora.rank:
        raise ValueError("the siglip stage trains every parameter; set lora.rank=0")
    try:
        model = load_siglip_model(path, opts.resolution)
        tok_file = find_tokenizer_file(path)
    except (CheckpointError, FileNotFoundError) as exc:
        raise ValueError(str(exc)) from None
    length = opts.text_length or model.config.text.max_positions
    if length > model.config.text.max_positions:
        raise ValueError(f"siglip.text_length={length} exceeds the text tower's "
                         f"{model.config.text.max_positions} positions")
    tokenizer = SiglipTokenizer(tok_file, max_length=length)
    return Prepared(model, tokenizer, nnx.Param, True,
                    {"checkpoint": str(path), "size": model.config.vision.image_size})


# ---- batches ----------------------------------------------------------------------------------
class CaptionEncoder:
    """Rows -> ``{"ids": int32 [A, b, L], "pixels": float32 [A, b, S, S, 3]}``: captions by
    the SigLIP tokenizer, images read by their medgemma-data plugin (the first image of the
    file) and preprocessed to ``S`` (:func:`medsiglip.preprocess`)."""

    def __init__(self, tokenizer: Any, size: int, *, cache: int = 0):
        self.tokenizer, self.size = tokenizer, int(size)
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = int(cache)

    def image(self, ex: Any) -> np.ndarray:
        hit = self.cache.get(ex.load_path)
        if hit is not None:
            self.cache.move_to_end(ex.load_path)
            return hit
        import medgemma_data
        from medsiglip import preprocess

        try:
            samples = medgemma_data.load(ex.load_path, modality=ex.modality or None,
                                         options=dict(ex.options) or None)
            images = [im for s in samples for im in s.images]
            if not images:
                raise ValueError("the file holds no image")
            x = preprocess(images[0], self.size)[0]
        except Exception as exc:  # noqa: BLE001 (any decoder error names the row)
            raise DataError(f"{ex.where}: {type(exc).__name__}: {str(exc)[:160]}") from None
        if self.cache_size:
            self.cache[ex.load_path] = x
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return x

    def __call__(self, rows: Sequence[Any], accum: int = 1) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode([ex.answer for ex in rows]).astype(np.int32)
        pixels = np.stack([self.image(ex) for ex in rows]).astype(np.float32)
        b = len(rows) // accum
        return {"ids": ids.reshape(accum, b, *ids.shape[1:]),
                "pixels": pixels.reshape(accum, b, *pixels.shape[1:])}


def _encoder(cfg: Any, prepared: Prepared, sources: Any) -> CaptionEncoder:
    for s in sources:
        for ex in s.examples:
            if not isinstance(ex, CaptionExample):
                raise DataError(f"{ex.where}: the siglip stage reads caption manifests "
                                f"(path, caption); this source ({s.path}) is {s.kind} data")
    return CaptionEncoder(prepared.processor, prepared.extra["size"],
                          cache=_opts(cfg).image_cache)


# ---- the loss ---------------------------------------------------------------------------------
def siglip_loss(model: Any, batch: dict, cfg: Any) -> tuple[Any, Any]:
    """``(B * sigmoid loss, B)`` of one micro-batch (the engine divides by the rows)."""
    import jax.numpy as jnp

    from medsiglip.model import l2_normalize

    from .contrastive import ring_sigmoid_loss, sigmoid_loss_sum

    opts = _opts(cfg)
    img = l2_normalize(model.image_features(batch["pixels"]))
    txt = l2_normalize(model.text_features(batch["ids"]))
    scale, bias = model.logit_scale[...][0], model.logit_bias[...][0]
    if opts.ring:
        total = ring_sigmoid_loss(img, txt, scale, bias, chunk=opts.chunk)
    else:
        total = sigmoid_loss_sum(img, txt, scale, bias, chunk=opts.chunk)
    return total, jnp.asarray(img.shape[0], jnp.int32)


# ---- validation -------------------------------------------------------------------------------
_EMBED: dict[str, Any] = {}


def _embed_fns() -> tuple[Any, Any]:
    if not _EMBED:
        from flax import nnx

        from medsiglip.model import l2_normalize

        _EMBED["image"] = nnx.jit(lambda m, x: l2_normalize(m.image_features(x)))
        _EMBED["text"] = nnx.jit(lambda m, ids: l2_normalize(m.text_features(ids)))
    return _EMBED["image"], _EMBED["text"]


def _batched(fn: Any, model: Any, x: np.ndarray, size: int) -> np.ndarray:
    out = []
    for start in range(0, len(x), size):
        chunk = x[start:start + size]
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(fn(model, chunk))[:size - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return None
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def retrieval_metrics(image_embeds: np.ndarray, captions: Sequence[str],
                      caption_embeds: dict[str, np.ndarray]) -> float:
    """Image-to-text top-1: the share of images whose best caption, among the distinct
    ``caption_embeds``, is their own."""
    names = list(caption_embeds)
    table = np.stack([caption_embeds[c] for c in names])
    best = np.argmax(image_embeds @ table.T, axis=1)
    return float(np.mean([names[i] == c for i, c in zip(best, captions)]))


def evaluate(model: Any, cfg: Any) -> dict:
    """Retrieval top-1 per ``data.eval`` source and over all; zero-shot with labels."""
    opts = _opts(cfg)
    image_fn, text_fn = _embed_fns()
    tok = _tokenizer(cfg, model)
    size = model.config.vision.image_size
    enc = _eval_encoder(tok, size, opts.image_cache)
    out: dict[str, float] = {}
    hits, count = 0.0, 0
    all_img, all_rows = [], []
    for i, src_cfg in enumerate(cfg.data.eval):
        source = read_caption_source(src_cfg, i)
        rows = [ex for ex in source.examples if isinstance(ex, CaptionExample)]
        if not rows:
            continue
        pixels = np.stack([enc.image(ex) for ex in rows])
        img = _batched(image_fn, model, pixels, opts.eval_batch)
        distinct = sorted({ex.answer for ex in rows})
        txt = _batched(text_fn, model, tok.encode(distinct).astype(np.int32), opts.eval_batch)
        top1 = retrieval_metrics(img, [ex.answer for ex in rows], dict(zip(distinct, txt)))
        out[f"retrieval_top1/{source.name}"] = top1
        hits, count = hits + top1 * len(rows), count + len(rows)
        all_img.append(img)
        all_rows += rows
    if count:
        out["retrieval_top1"] = hits / count
    if opts.labels and all_rows:
        texts = [opts.template.format(label) for label in opts.labels]
        lab = _batched(text_fn, model, tok.encode(texts).astype(np.int32), opts.eval_batch)
        img = np.concatenate(all_img)
        index = {label: k for k, label in enumerate(opts.labels)}
        gold = np.array([index.get(ex.label or ex.answer, -1) for ex in all_rows])
        keep = gold >= 0
        if keep.any():
            scale = float(np.exp(np.asarray(model.logit_scale[...])[0]))
            bias = float(np.asarray(model.logit_bias[...])[0])
            logits = img[keep] @ lab.T * scale + bias
            out["zeroshot_accuracy"] = float(np.mean(np.argmax(logits, 1) == gold[keep]))
            aucs = [_auc(logits[:, k], gold[keep] == k) for k in range(len(texts))]
            aucs = [a for a in aucs if a is not None]
            if aucs:
                out["zeroshot_auc"] = float(np.mean(aucs))
    return out


_CACHE: dict[tuple, Any] = {}


def _tokenizer(cfg: Any, model: Any) -> Any:
    from medsiglip import SiglipTokenizer
    from medsiglip.tokenizer import find_tokenizer_file

    path = Path(cfg.model.checkpoint).expanduser()
    length = _opts(cfg).text_length or model.config.text.max_positions
    key = ("tok", str(path), length)
    if key not in _CACHE:
        _CACHE[key] = SiglipTokenizer(find_tokenizer_file(path), max_length=length)
    return _CACHE[key]


def _eval_encoder(tok: Any, size: int, cache: int) -> CaptionEncoder:
    key = ("enc", id(tok), size)
    if key not in _CACHE:
        _CACHE[key] = CaptionEncoder(tok, size, cache=cache)
    return _CACHE[key]


# ---- export -----------------------------------------------------------------------------------
def export_siglip(model: Any, folder: Path, *, source: str = "", resolution: int = 0,
                  overwrite: bool = True) -> str:
    """Write ``model`` as a MedSigLIP Hugging Face folder at ``resolution`` (0: its own),
    with the tokenizer and processor files of ``source`` when it has them."""
    from medsiglip import save_hf

    if resolution:
        model = at_resolution(model, resolution)
    src = Path(source) if source and Path(source).is_dir() else None
    save_hf(model, folder, source=src, overwrite=overwrite)
    if src is not None and not (Path(folder) / "spiece.model").is_file():
        import shutil

        from medsiglip.tokenizer import find_tokenizer_file

        try:
            shutil.copy(find_tokenizer_file(src), Path(folder) / "spiece.model")
        except FileNotFoundError:
            pass
    if resolution:
        import json

        pre = Path(folder) / "preprocessor_config.json"
        if pre.is_file():
            data = json.loads(pre.read_text())
            data["size"] = {"height": resolution, "width": resolution}
            pre.write_text(json.dumps(data, indent=2) + "\n")
    return str(folder)


def finish(model: Any, prepared: Prepared, cfg: Any, run_dir: Path) -> dict:
    opts = _opts(cfg)
    if not opts.export:
        return {}
    folder = Path(run_dir) / "export" / "hf"
    return {"hf": export_siglip(model, folder, source=prepared.extra["checkpoint"],
                                resolution=opts.export_resolution)}


SIGLIP = StageSpec(
    name="siglip",
    description="MedSigLIP contrastive tuning on image-caption mixtures (sigmoid loss, "
                "chunked over the devices' ring)",
    prepare=prepare,
    loss=siglip_loss,
    defaults={"lora.rank": 0, "optimizer.lr": 1e-5, "optimizer.decay": "cosine",
              "optimizer.warmup_ratio": 0.05, "optimizer.max_grad_norm": 1.0,
              "optimizer.weight_decay": 1e-4, "data.batch_size": 32,
              "run.best_metric": "retrieval_top1", "run.best_mode": "max"},
    evaluate=evaluate,
    finish=finish,
    settings=SiglipSettings,
    data=DataSpec(read=read_caption_source, encoder=_encoder, keys=("ids", "pixels")),
)


@hookimpl
def medgemma_train_stages(register: Any) -> None:
    register(SIGLIP)
