"""``medgemma-train stages``, ``medgemma-train sft`` and ``medgemma-train export``.

A first run needs no file::

    medgemma-train sft --checkpoint medgemma-4b-it/ --data train.jsonl --eval-data val.jsonl \\
        --out run1 --max-steps 500 --lora-rank 16 --lr 2e-4 --batch-size 16 --export peft

or a YAML config with dotted overrides (flags win over the file, ``--set`` over both)::

    medgemma-train sft --config run.yaml --set optimizer.lr=1e-4 --set run.max_steps=200

``--dry-run`` prints the parameter and trainable counts, the per-device memory, the steps
per epoch and the data mixture, then exits; ``--json`` prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cli import Command, UsageError

__all__ = ["EXPORT", "PRETRAIN", "SFT", "SIGLIP", "STAGES", "export_checkpoint", "run_stage"]


def _err(exc: BaseException) -> UsageError:
    return UsageError(" ".join(str(exc).split()))


def _user_errors() -> tuple[type[BaseException], ...]:
    from medgemma_core import CheckpointError

    from .config import ConfigError
    from .data import DataError
    from .trainer import TrainError

    return ConfigError, DataError, TrainError, CheckpointError


# ---- stages -----------------------------------------------------------------------------------
def _stages_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _stages_run(args: argparse.Namespace) -> int:
    from .stages import list_stages, stage_problems

    for info in list_stages():
        if args.json:
            print(json.dumps({"name": info.name, "description": info.description,
                              "plugin": info.plugin, "distribution": info.distribution,
                              "version": info.version}))
        else:
            print(f"{info.name:12} {info.distribution} {info.version} ({info.plugin}): "
                  f"{info.description}")
    for prob in stage_problems():
        print(f"problem: plugin {prob.plugin} ({prob.distribution}): {prob.problem}",
              file=sys.stderr)
    return 0


STAGES = Command("stages", "list the training stages (built-in and plugins)", _stages_args,
                 _stages_run)


# ---- sft (and any stage) ------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="run config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. optimizer.lr=1e-4 (repeatable)")
    g = p.add_argument_group("common settings (flags override the config file)")
    g.add_argument("--checkpoint", help="model: a Hugging Face folder, .gguf or Orbax folder")
    g.add_argument("--data", action="append", metavar="FILE",
                   help="training data: chat JSONL, a JSONL/CSV manifest or a QA set "
                        "(repeatable: a mixture of equal weights)")
    g.add_argument("--eval-data", action="append", metavar="FILE", help="validation data")
    g.add_argument("--out", help="run folder (config, metrics, checkpoints, export/)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: run.epochs)")
    g.add_argument("--epochs", type=float)
    g.add_argument("--lora-rank", type=int, help="LoRA rank; 0 = full fine-tuning")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--batch-size", type=int, help="rows per step over all devices")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step")
    g.add_argument("--seq-len", type=int, help="tokens per row (padded or cut)")
    g.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (-1 = the rest)")
    g.add_argument("--export", action="append", choices=("hf", "peft"),
                   help="write RUN/export/hf (merged) and/or RUN/export/peft at the end")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--save-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--skip-bad", action="store_true", help="drop bad data rows (reported)")
    p.add_argument("--pack", action="store_true",
                   help="pack several text-only rows into each --seq-len sequence (data.pack)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--json", action="store_true", help="print one JSON summary line at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


_FLAGS = {"checkpoint": "model.checkpoint", "data": "data.train", "eval_data": "data.eval",
          "out": "run.out", "max_steps": "run.max_steps", "epochs": "run.epochs",
          "lora_rank": "lora.rank", "lr": "optimizer.lr", "batch_size": "data.batch_size",
          "grad_accum": "optimizer.grad_accum", "seq_len": "data.seq_len", "mesh": "run.mesh",
          "export": "run.export", "eval_every": "run.eval_every",
          "save_every": "run.save_every"}


def _nested(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def resolve_config(args: argparse.Namespace, stage_name: str) -> Any:
    from .config import load_config
    from .stages import get_stage

    try:
        stage = get_stage(stage_name)
    except ValueError as exc:
        raise _err(exc) from None
    flags = {dotted: getattr(args, name) for name, dotted in _FLAGS.items()
             if getattr(args, name, None) is not None}
    if args.resume:
        flags["run.resume"] = True
    if args.skip_bad:
        flags["data.skip_bad"] = True
    if getattr(args, "pack", False):
        flags["data.pack"] = True
    if args.no_progress or args.json:
        flags["run.progress"] = False
    base = _nested({"stage": stage_name, **dict(stage.defaults)})
    try:
        cfg = load_config(args.config, overrides=args.overrides, base=base,
                          flags=_nested(flags), settings=stage.settings)
    except _user_errors() as exc:
        raise _err(exc) from None
    return cfg, stage


def _human(plan: dict) -> str:
    lines = [f"stage {plan['stage']}: {plan['params']:,} parameters, {plan['trainable']:,} "
             f"trainable ({100 * plan['trainable'] / max(1, plan['params']):.2f}%)",
             f"steps {plan['steps']} ({plan['steps_per_epoch']} per epoch, "
             f"{plan['rows_per_step']} rows per step, warmup {plan['warmup_steps']}); mesh "
             + ",".join(f"{k}={v}" for k, v in plan["mesh"].items())
             + f"; {plan['processes']} process(es)",
             "data mixture:"]
    for m in plan["mixture"]:
        lines.append(f"  {m['name']:16} {m['kind']:8} {m['rows']:7} rows  weight {m['weight']:.3f}"
                     f"  {m['epochs']:.2f} epochs in the run  ({m['path']})")
    lines.append(f"eval rows: {plan['eval_rows']}; bad rows skipped: {plan['bad_rows']}")
    if plan.get("packing"):
        pk = plan["packing"]
        lines.append(f"packed: {pk['rows']} rows into {pk['sequences']} sequences of "
                     f"data.seq_len (filled {100 * pk['fill']:.1f}%); steps count sequences")
    if plan.get("cut_rows"):
        lines.append(f"rows cut at data.seq_len: {plan['cut_rows']} (first {plan['cut_first']}; "
                     f"the longest has {plan['longest_row_tokens']} tokens), "
                     f"{plan['answer_cut_rows']} of them with no answer left")
    if "memory_text" in plan:
        lines.append(plan["memory_text"])
    return "\n".join(lines)


def run_stage(args: argparse.Namespace, stage_name: str) -> int:
    from .trainer import train

    cfg, stage = resolve_config(args, stage_name)

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    try:
        result = train(cfg, stage, dry_run=args.dry_run, say=say)
    except _user_errors() as exc:
        raise _err(exc) from None
    if args.dry_run:
        if args.json:
            print(json.dumps({k: v for k, v in result.items() if k != "memory_text"}))
        else:
            print(_human(result))
        return 0
    result.pop("model", None)
    summary = {k: v for k, v in result.items() if k != "plan"}
    if args.json:
        print(json.dumps(summary))
    else:
        extra = "".join(f", {k.removeprefix('eval_').replace('_', ' ')} {v:.4f}"
                        for k, v in (summary.get("final_eval") or {}).items()
                        if k in ("eval_token_accuracy", "eval_exact_match") and v is not None)
        print(f"{summary['steps']} steps; train loss {summary['final_train_loss']}, "
              f"eval loss {summary['final_eval_loss']}{extra}; run folder {summary['run']}")
        for kind, path in (summary.get("exports") or {}).items():
            print(f"exported {kind}: {path}")
    return 0


SFT = Command("sft", "supervised fine-tuning (full or LoRA) on chat, manifest or QA data",
              _train_args, lambda args: run_stage(args, "sft"),
              description="Supervised fine-tuning, full or LoRA, of a text or image-text "
                          "model.\n\n" + (__doc__ or "").split("\n\n", 1)[-1])


SIGLIP = Command("siglip", "MedSigLIP contrastive tuning on image-caption mixtures (stage 1)",
                 _train_args, lambda args: run_stage(args, "siglip"),
                 description="Contrastive tuning of a two-tower SigLIP (MedSigLIP) on caption "
                             "manifests (path, caption), the sigmoid loss chunked over the "
                             "devices.\n\nSettings: --set siglip.resolution=448, "
                             "siglip.labels=[...], siglip.export_resolution=896; mixtures: "
                             "data.train with weights (general 98 : medical 2).")
PRETRAIN = Command("pretrain", "multimodal pretraining of a Gemma 3 image-text model (stage 2)",
                   _train_args, lambda args: run_stage(args, "pretrain"),
                   description="Next-token pretraining on image-caption and text mixtures, the "
                               "vision tower trainable, frozen or LoRA (--set pretrain.vision="
                               "frozen), its own learning rate (pretrain.vision_lr), checkpoint "
                               "selection by CXR classification and VQA (pretrain.cxr_data, "
                               "pretrain.vqa_data); the chosen checkpoint is in "
                               "RUN/selection.json.")


# ---- export -----------------------------------------------------------------------------------
def _find_step(path: Path, which: str) -> tuple[Path, int | None]:
    """(run folder, step) of a run folder, its checkpoints/ or one step folder."""
    path = path.absolute()
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if path.name == "checkpoints":
        return path.parent, None
    return path, None


def export_checkpoint(checkpoint: str | Path, to: str, out: str | Path, *,
                      step: str = "latest", overwrite: bool = False) -> dict:
    """Rebuild a run's model from ``RUN/config.yaml`` and one checkpoint, then export it."""
    import yaml
    from flax import nnx

    from .checkpoint import Checkpoints
    from .config import config_from_dict
    from .sft import export_model
    from .stages import get_stage

    run, chosen = _find_step(Path(checkpoint), step)
    if not (run / "config.yaml").is_file() or not (run / "checkpoints").is_dir():
        raise UsageError(f"{checkpoint} is not a medgemma-train run (no config.yaml and "
                         f"checkpoints/); pass RUN, RUN/checkpoints or RUN/checkpoints/STEP")
    data = yaml.safe_load((run / "config.yaml").read_text())
    try:
        settings = get_stage(str(data.get("stage", "sft"))).settings
    except ValueError as exc:
        raise _err(exc) from None
    cfg = config_from_dict(data, settings)
    ckpt = Checkpoints(run / "checkpoints", read_only=True, best_metric=cfg.run.best_metric,
                       best_mode=cfg.run.best_mode)
    if chosen is None:
        chosen = ckpt.best_step() if step == "best" else (
            ckpt.latest_step() if step == "latest" else int(step))
    if chosen is None or chosen not in ckpt.steps():
        raise UsageError(f"{run}: no checkpoint {step if chosen is None else chosen} "
                         f"(have {ckpt.steps()})")
    prepared = get_stage(cfg.stage).prepare(cfg)
    model = prepared.model
    _, params, _ = nnx.split(model, prepared.trainable, ...)
    params, _, meta = ckpt.restore(chosen, params)
    nnx.update(model, params)
    model.eval()
    try:
        if cfg.stage == "siglip":  # a two-tower SigLIP: a MedSigLIP Hugging Face folder
            from .siglip import export_siglip

            if to != "hf":
                raise ValueError("a siglip run exports with --to hf (a MedSigLIP folder)")
            written = export_siglip(model, Path(out), source=cfg.model.checkpoint,
                                    resolution=getattr(cfg.options, "export_resolution", 0),
                                    overwrite=overwrite)
        else:
            written = export_model(model, cfg.model.checkpoint, to, Path(out),
                                   overwrite=overwrite)
    except (ValueError, FileExistsError) as exc:
        raise _err(exc) from None
    return {"run": str(run), "step": chosen, "to": to, "out": written}


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a run folder, RUN/checkpoints or RUN/checkpoints/STEP")
    p.add_argument("--to", required=True, choices=("hf", "peft"),
                   help="hf: merged Hugging Face folder; peft: a PEFT adapter folder")
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--step", default="latest", help="latest, best or a step number")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")


def _export_run(args: argparse.Namespace) -> int:
    try:
        result = export_checkpoint(args.checkpoint, args.to, args.out, step=args.step,
                                   overwrite=args.overwrite)
    except _user_errors() as exc:
        raise _err(exc) from None
    print(json.dumps(result) if args.json else
          f"exported step {result['step']} of {result['run']} as {args.to}: {result['out']}")
    return 0


EXPORT = Command("export", "export a run's checkpoint as a merged HF folder or a PEFT adapter",
                 _export_args, _export_run)
