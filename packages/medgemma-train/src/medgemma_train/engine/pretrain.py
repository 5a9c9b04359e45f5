"""The built-in ``pretrain`` stage: multimodal pretraining (MedGemma's stage 2).

Training continues from a Gemma 3 image-text checkpoint with the next-token loss on
interleaved image-text rows and text-only rows: caption manifests (:mod:`.captions`, ``path,
caption``: the image, then its caption) mixed with any data the ``sft`` stage reads (chat
rows with or without images, manifests, QA sets). The medical share is the sources' weights
(the report: 10% medical, e.g. ``{path: general.jsonl, weight: 9}, {path: medical.jsonl,
weight: 1}``); ``run.epochs`` (the report: 5) or ``run.max_steps`` sets the length.

Settings (section ``pretrain:``):

* ``vision``: the vision tower ``full`` (trainable, the report's setting), ``frozen`` or
  ``lora`` (adapters of ``lora.rank`` on its linear layers). The decoder and the projector
  always train in full.
* ``vision_lr``: the vision tower's peak learning rate (0 = ``optimizer.lr``); the two groups
  are separate optax transformations (``optax.multi_transform``) under one global-norm clip
  and one warmup / decay shape.
* checkpoint selection (:mod:`.selection`): ``cxr_data`` (a chest X-ray label manifest) and
  ``vqa_data`` (a VQA-RAD style JSON) are answered by generation at every validation; their
  ``cxr_weight`` / ``vqa_weight`` mean, ``selection_score``, drives best-K retention and
  ``RUN/selection.json`` names the chosen checkpoint. ``eval_limit`` caps the items of each.

Long rows (many images, CT series) train with ``model.remat`` and the decoder's
memory-efficient masked attention, as in ``sft``. ``run.export: [hf]`` writes the final
model to ``RUN/export/hf``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .captions import read_caption_source
from .stages import DataSpec, Prepared, StageSpec, hookimpl

__all__ = ["PRETRAIN", "PretrainSettings", "param_groups", "pretrain_optimizer"]


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    vision: str = "full"
    vision_lr: float = 0.0
    cxr_data: str = ""
    vqa_data: str = ""
    cxr_weight: float = 1.0
    vqa_weight: float = 1.0
    eval_limit: int = 0
    eval_batch: int = 8
    max_new_tokens: int = 0
    #: share of the draws for the sources named medical* when no weight is given (90:10)
    medical_share: float = 0.10

    def __post_init__(self) -> None:
        if self.vision not in ("full", "frozen", "lora"):
            raise ValueError(f"pretrain.vision={self.vision!r}: choose 'full', 'frozen' or "
                             f"'lora'")
        if self.vision_lr < 0:
            raise ValueError("pretrain.vision_lr must be 0 (= optimizer.lr) or positive")
        for name in ("cxr_data", "vqa_data"):
            value = getattr(self, name)
            if value and not Path(value).expanduser().is_file():
                raise ValueError(f"pretrain.{name}={value}: no such file")


def _opts(cfg: Any) -> PretrainSettings:
    return cfg.options if isinstance(cfg.options, PretrainSettings) else PretrainSettings()


def prepare(cfg: Any) -> Prepared:
    """sft's loading, with the decoder and projector in full and the tower as set."""
    from .config import TrainableConfig
    from .sft import prepare as sft_prepare

    opts = _opts(cfg)
    lora = cfg.lora.rank if opts.vision == "lora" else 0
    if opts.vision == "lora" and lora == 0:
        raise ValueError("pretrain.vision=lora needs lora.rank > 0 (e.g. 16)")
    trainable = TrainableConfig(decoder="full",
                                vision="auto" if opts.vision == "full" else opts.vision,
                                projector="full" if opts.vision == "lora" else "auto")
    inner = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=lora),
                                trainable=trainable)
    prepared = sft_prepare(inner)
    prepared.extra["vision"] = opts.vision if prepared.image_text else "none"
    return prepared


def _path_key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_groups(params: Any) -> Any:
    """The optimizer group of each parameter: ``vision`` (the tower) or ``decoder``."""
    import jax

    return jax.tree_util.tree_map_with_path(
        lambda path, _: "vision" if path and _path_key(path[0]) == "vision" else "decoder",
        params)


def pretrain_optimizer(cfg: Any, total: int) -> tuple[Any, Any]:
    """Global-norm clipping, then AdamW (or Adafactor) per group, the vision tower at
    ``pretrain.vision_lr`` (same warmup and decay shape)."""
    import jax
    import jax.numpy as jnp
    import optax

    from .step import make_schedule

    opt = cfg.optimizer
    vision_lr = _opts(cfg).vision_lr or opt.lr
    schedules = {"decoder": make_schedule(opt, total),
                 "vision": make_schedule(dataclasses.replace(opt, lr=vision_lr), total)}

    def decay_mask(params: Any) -> Any:
        return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)

    def inner(schedule: Any) -> Any:
        if opt.name == "adamw":
            return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                               weight_decay=opt.weight_decay, mask=decay_mask)
        return optax.adafactor(schedule, weight_decay_rate=opt.weight_decay or None)

    groups = optax.multi_transform({k: inner(s) for k, s in schedules.items()}, param_groups)
    parts = [optax.clip_by_global_norm(opt.max_grad_norm)] if opt.max_grad_norm > 0 else []
    return optax.chain(*parts, groups), schedules["decoder"]


def pretrain_loss(model: Any, batch: Any, cfg: Any) -> Any:
    from .sft import sft_loss

    return sft_loss(model, batch, cfg)


def evaluate(model: Any, cfg: Any) -> dict:
    from .selection import selection_scores

    opts = _opts(cfg)
    return selection_scores(model, cfg.model.checkpoint, cxr_data=opts.cxr_data,
                            vqa_data=opts.vqa_data, cxr_weight=opts.cxr_weight,
                            vqa_weight=opts.vqa_weight, limit=opts.eval_limit,
                            batch_size=opts.eval_batch, max_new_tokens=opts.max_new_tokens)


def finish(model: Any, prepared: Prepared, cfg: Any, run_dir: Path) -> dict:
    from .selection import write_selection
    from .sft import finish as sft_finish

    out = {}
    chosen = write_selection(Path(run_dir), cfg.run.best_metric, cfg.run.best_mode)
    if chosen is not None:
        out["selection"] = str(Path(run_dir) / "selection.json")
    out.update(sft_finish(model, prepared, cfg, run_dir))
    return out


PRETRAIN = StageSpec(
    name="pretrain",
    description="multimodal pretraining: next-token loss on image-caption and text mixtures, "
                "vision tower trainable / frozen / LoRA, checkpoint selection by CXR + VQA",
    prepare=prepare,
    loss=pretrain_loss,
    defaults={"lora.rank": 0, "optimizer.lr": 1e-4, "optimizer.decay": "cosine",
              "optimizer.max_grad_norm": 1.0, "run.best_metric": "selection_score",
              "run.best_mode": "max"},
    evaluate=evaluate,
    finish=finish,
    settings=PretrainSettings,
    data=DataSpec(read=read_caption_source),
    optimizer=pretrain_optimizer,
)


@hookimpl
def medgemma_train_stages(register: Any) -> None:
    register(PRETRAIN)
