"""The built-in ``sft`` stage: supervised fine-tuning, full or LoRA, text or image-text.

Defaults follow Google's MedGemma fine-tuning notebook: LoRA r=16, alpha=16, dropout 0.05
on every linear projection of the decoder and the vision tower (PEFT's ``all-linear``), lr
2e-4, 1 epoch, batch 16, max grad norm 0.3, warmup 3%, linear decay, AdamW; labels mask
padding, image and ``<start_of_image>`` tokens. ``lora.rank: 0`` trains every parameter.
The notebook also saves ``lm_head``/``embed_tokens`` in full (PEFT ``modules_to_save``); here
the tied embedding stays frozen in LoRA runs unless ``trainable.decoder: full``.

Validation reports ``eval_loss``, ``eval_token_accuracy`` and, with ``sft.exact_match: N``,
``eval_exact_match`` of greedy answers (:mod:`.answers`).

At the end, ``run.export: [peft, hf]`` writes ``RUN/export/peft`` (a PEFT adapter,
:func:`medgemma_core.lora.save_peft_adapter`) and ``RUN/export/hf`` (the merged model in the
transformers layout, :func:`medgemma_core.checkpoints.export.save_hf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .answers import SFTSettings
from .stages import Prepared, StageSpec, hookimpl

__all__ = ["SFT", "export_model", "prepare", "sft_loss", "trainable_modes"]

_MODES = ("lora", "full", "frozen")


def trainable_modes(cfg: Any, image_text: bool) -> dict[str, str]:
    """``{"decoder": ..., "vision": ..., "projector": ...}`` with ``auto`` resolved."""
    lora = cfg.lora.rank > 0
    auto = {"decoder": "lora" if lora else "full", "vision": "lora" if lora else "full",
            "projector": "frozen" if lora else "full"}
    modes = {}
    for part in ("decoder", "vision", "projector"):
        mode = getattr(cfg.trainable, part)
        if mode == "auto":
            mode = auto[part] if (image_text or part == "decoder") else "frozen"
        if mode == "lora" and not lora:
            raise ValueError(f"trainable.{part}=lora but lora.rank=0; set lora.rank (e.g. 16) "
                             f"or trainable.{part}=full")
        if part != "decoder" and not image_text and mode != "frozen":
            raise ValueError(f"trainable.{part}={mode} but the checkpoint is a text-only model; "
                             f"leave trainable.{part}=auto")
        modes[part] = mode
    return modes


def _processor(checkpoint: Path, image_text: bool) -> Any:
    from medgemma_core import Processor, Tokenizer
    from medgemma_core.processor import ProcessorConfig

    if image_text:
        return Processor.from_checkpoint(checkpoint)
    tok = Tokenizer.from_checkpoint(checkpoint)
    if tok.image_token_id is None:
        # A text-only tokenizer: give the processor an image token id just past its pieces.
        # Text rows never hold it; it only lets Processor.collate build the labels.
        extra = tok.vocab_size
        tok = tok.with_added_tokens({extra: "<image_soft_token>"}, special_ids=(extra,))
    return Processor(tok, ProcessorConfig())


def prepare(cfg: Any) -> Prepared:
    """Load ``cfg.model.checkpoint``, attach LoRA adapters to the parts that train by LoRA."""
    from flax import nnx

    from medgemma_core import Gemma3Multimodal
    from medgemma_core.checkpoints.export import load_any
    from medgemma_core.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, trainable_filter

    if not cfg.model.checkpoint:
        raise ValueError("no checkpoint; pass --checkpoint (a Hugging Face folder, a .gguf "
                         "file or an Orbax folder) or set model.checkpoint")
    path = Path(cfg.model.checkpoint).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint {path} not found; pass an existing folder or file")
    model = load_any(path, cfg.model.dtype)
    image_text = isinstance(model, Gemma3Multimodal)
    modes = trainable_modes(cfg, image_text)
    adapted: list[str] = []
    lora_parts = [p for p, m in modes.items() if m == "lora"]
    if lora_parts:
        base = cfg.lora.targets or DEFAULT_TARGETS
        targets = (f"^(?=(?:{'|'.join(lora_parts)})/).*(?:{base})" if image_text else base)
        adapted = apply_lora(model, LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                               dropout=cfg.lora.dropout, targets=targets),
                             rngs=nnx.Rngs(cfg.run.seed))
    if image_text:
        wrt = trainable_filter(model, **modes)
    else:
        wrt = trainable_filter(model, decoder=modes["decoder"])
    return Prepared(model, _processor(path, image_text), wrt, image_text,
                    {"modes": modes, "adapted": len(adapted), "checkpoint": str(path)})


def sft_loss(model: Any, batch: Any, cfg: Any) -> Any:
    from medgemma_core.training import next_token_loss

    return next_token_loss(model, batch, chunk=cfg.model.loss_chunk,
                           compute_dtype=cfg.model.compute_dtype or None,
                           remat=cfg.model.remat)


def export_model(model: Any, checkpoint: str, to: str, folder: Path, *,
                 overwrite: bool = False) -> str:
    """Write ``model`` as a PEFT adapter (``to="peft"``) or a merged Hugging Face folder
    (``to="hf"``; adapters folded into the weights, the model is left merged)."""
    from medgemma_core.checkpoints.export import save_hf
    from medgemma_core.lora import adapters, merge_lora, save_peft_adapter

    if to == "peft":
        if not adapters(model):
            raise ValueError("--to peft: this run trained no LoRA adapters (lora.rank=0); "
                             "export it with --to hf")
        save_peft_adapter(model, folder, base_model_name_or_path=checkpoint,
                          overwrite=overwrite)
    elif to == "hf":
        merge_lora(model)
        source = Path(checkpoint)
        save_hf(model, folder, source=source if source.exists() else None, overwrite=overwrite)
    else:
        raise ValueError(f"--to {to!r}: use hf or peft")
    return str(folder)


def sft_accuracy(model: Any, batch: Any, cfg: Any) -> dict:
    from .answers import token_accuracy

    return token_accuracy(model, batch, cfg)


def sft_evaluate(model: Any, cfg: Any) -> dict:
    """``eval_exact_match`` when ``sft.exact_match`` asks for it (:mod:`.answers`)."""
    from medgemma_core import Gemma3Multimodal

    from .answers import SFTSettings, exact_match
    from .data import read_source
    from .pipeline import Encoder

    opts = cfg.options if isinstance(cfg.options, SFTSettings) else SFTSettings()
    if not opts.exact_match or not cfg.data.eval:
        return {}
    rows = []
    for i, source in enumerate(cfg.data.eval):
        rows += list(read_source(source, i).examples)
        if len(rows) >= opts.exact_match:
            break
    enc = Encoder(None, seq_len=cfg.data.seq_len, slots=0,
                  image_text=isinstance(model, Gemma3Multimodal), system=cfg.data.system)
    return exact_match(model, cfg, rows, enc.messages)


def finish(model: Any, prepared: Prepared, cfg: Any, run_dir: Path) -> dict:
    out = {}
    for to in sorted(cfg.run.export, key=lambda t: t != "peft"):  # peft before merging
        out[to] = export_model(model, prepared.extra["checkpoint"], to,
                               Path(run_dir) / "export" / to, overwrite=True)
    return out


SFT = StageSpec(
    name="sft",
    description="supervised fine-tuning, full or LoRA, on text or image-text chat data",
    prepare=prepare,
    loss=sft_loss,
    evaluate=sft_evaluate,
    eval_batch=sft_accuracy,
    finish=finish,
    settings=SFTSettings,
)


@hookimpl
def medgemma_train_stages(register: Any) -> None:
    register(SFT)
