"""The loop: it only feeds batches, writes metrics and calls the checkpoint manager.

``train(cfg, stage)`` reads and checks the data (every bad row before any compile), lets the
stage build the model, splits it into trainable parameters and the rest, places both on the
mesh by the logical-axis rules, and runs the jitted step. The run folder ``cfg.run.out``
holds ``config.yaml`` (the config as resolved), ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/`` and, after the stage's ``finish``, ``export/``.

SIGTERM (preemption) saves a checkpoint, waits for it and exits with status 143; rerun with
``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint import Checkpoints
from .config import RunConfig, to_dict
from .data import DataError, check_bad_rows, medical_mixture, read_source
from .lengths import drop_bad_lengths, scan_lengths
from .mesh import batch_sharding, build_mesh, initialize
from .metrics import MetricsWriter, flops_per_token, peak_flops
from .packing import pack_sources
from .pipeline import Encoder, EvalPipeline, Pipeline, mixture_table
from .stages import StageSpec
from .step import build_steps, make_optimizer, warmup_steps

__all__ = ["Preempted", "TrainError", "train"]


class TrainError(ValueError):
    """A user mistake found while setting up a run (one line)."""


class Preempted(SystemExit):
    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


def _count(state: Any) -> int:
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(state)))


def _image_slots(cfg: RunConfig, sources: list, image_text: bool) -> int:
    if not image_text:
        return 0
    if cfg.data.image_slots > 0:
        return cfg.data.image_slots
    return max([1] + [ex.images for s in sources for ex in s.examples])


def _decoder_shape(model: Any) -> tuple[int, int]:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text", cfg)
    return int(getattr(text, "num_layers", 0) or 0), int(getattr(text, "hidden_size", 0) or 0)


def _put(batch: dict, shardings: dict, processes: int, global_rows: int) -> dict:
    if processes == 1:
        return jax.device_put(batch, shardings)
    out = {}
    for k, v in batch.items():
        shape = (v.shape[0], global_rows, *v.shape[2:])
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, shape)
    return out


def _place(tree: Any, shardings: Any) -> Any:
    """``tree`` (the same values in every process) on global ``shardings``: ``device_put``
    in one process, else each process fills its own shards (``make_array_from_callback``)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x: Any, sh: Any) -> Any:
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            rep = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
            placed = jax.make_array_from_callback(data.shape, rep, lambda i: data[i])
            return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sh, lambda i: host[i])

    return jax.tree.map(one, tree, shardings)


def train(cfg: RunConfig, stage: StageSpec, *, dry_run: bool = False,
          say: Any = None) -> dict[str, Any]:
    """Run (or with ``dry_run`` only plan) ``stage`` under ``cfg``; returns the summary."""
    say = say or (lambda text: None)
    if stage.run is not None:  # a stage with its own loop (StageSpec.run), e.g. rl
        return stage.run(cfg, stage, dry_run=dry_run, say=say)
    process, processes = initialize()
    out = Path(cfg.run.out)
    # ---- data, checked before anything heavy
    if not cfg.data.train:
        raise DataError("no training data; pass --data FILE or set data.train")
    custom = stage.data if stage.data is not None else None  # a stage's own rows / batches
    read = custom.read if custom is not None and custom.read is not None else read_source
    train_sources = [read(s, i) for i, s in enumerate(cfg.data.train)]
    eval_sources = [read(s, i) for i, s in enumerate(cfg.data.eval)]
    share = getattr(cfg.options, "medical_share", None)
    if share is not None:
        train_sources, mixed = medical_mixture(train_sources, float(share))
        if mixed:
            say(f"data mixture: the sources named medical* get {100 * share:g}% of the rows "
                f"({cfg.stage}.medical_share; give data.train weights to choose others)")
    bad = check_bad_rows(train_sources + eval_sources, skip_bad=cfg.data.skip_bad)
    ckpt_dir = out / "checkpoints"
    if not dry_run and not cfg.run.resume and ckpt_dir.is_dir() and any(
            p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise TrainError(f"{out} already holds checkpoints; pass --resume to continue that "
                         f"run or choose a new --out")
    # ---- model
    from medgemma_core import CheckpointError

    try:
        prepared = stage.prepare(cfg)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        raise TrainError(str(exc)) from None
    model = prepared.model
    own_batches = custom is not None and custom.encoder is not None
    lengths = None
    packing: dict = {}
    packed_sources: list = []
    if own_batches:
        slots = 0
        encoder = custom.encoder(cfg, prepared, train_sources + eval_sources)
        keys = list(custom.keys(cfg, prepared) if callable(custom.keys) else custom.keys)
    else:
        slots = _image_slots(cfg, train_sources + eval_sources, prepared.image_text)
        encoder = Encoder(prepared.processor, seq_len=cfg.data.seq_len, slots=slots,
                          image_text=prepared.image_text, mask_prompt=cfg.data.mask_prompt,
                          system=cfg.data.system, skip_bad=cfg.data.skip_bad)
        keys = ["tokens", "labels", "attention_mask"] + (["pixels", "image_mask"] if slots
                                                         else [])
        lengths = scan_lengths(encoder, train_sources + eval_sources)
        if lengths.warning():
            say(lengths.warning())
        kept, row_lengths = drop_bad_lengths(train_sources + eval_sources, lengths,
                                             skip_bad=cfg.data.skip_bad)
        train_sources, eval_sources = kept[:len(train_sources)], kept[len(train_sources):]
        bad = bad + list(lengths.bad)
    if cfg.data.pack:
        if own_batches or prepared.image_text:
            why = (f"stage {stage.name} builds its own batches" if own_batches else
                   f"{cfg.model.checkpoint} is an image-text model and its rows carry images")
            raise TrainError(f"data.pack packs text-only rows for a text-only model, but {why}; "
                             f"set data.pack=false (drop --pack)")
        packed_sources, packing = pack_sources(train_sources, row_lengths[:len(train_sources)],
                                               cfg.data.seq_len, cfg.data.seed)
        keys.append("segment_ids")
    if bad:
        say(f"skipping {len(bad)} bad data row(s), first {bad[0]} (all in "
            f"{out / 'bad_rows.jsonl'})")
        if process == 0:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "bad_rows.jsonl", "w", encoding="utf-8") as f:
                for b in bad:
                    f.write(json.dumps({"where": b.where, "reason": b.reason}) + "\n")
    accum, batch_size = cfg.optimizer.grad_accum, cfg.data.batch_size
    pipeline = Pipeline(packed_sources if packing else train_sources, encoder,
                        batch_size=batch_size, accum=accum,
                        seed=cfg.data.seed, process=process, processes=processes)
    per_epoch = pipeline.steps_per_epoch()
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * per_epoch))
    tx, schedule = (stage.optimizer(cfg, total) if stage.optimizer is not None
                    else make_optimizer(cfg.optimizer, total))
    mesh = build_mesh(cfg.run.mesh)
    model.train()
    train_def, params, rest = nnx.split(model, prepared.trainable, ...)
    model.eval()
    eval_def, _, _ = nnx.split(model, prepared.trainable, ...)
    n_params = _count(nnx.state(model, nnx.Param))
    n_train = _count(params)
    if n_train == 0:
        raise TrainError("nothing to train: every parameter is frozen; set trainable.* or "
                         "lora.rank")
    mixture = mixture_table(pipeline.sources, batch_size * accum, total)
    if packing:  # the table counted sequences; give the rows too
        for m, s in zip(mixture, train_sources, strict=True):
            m["sequences"], m["rows"] = m["rows"], len(s.examples)
            m["sequences_seen"] = m.pop("rows_seen")
    plan = {"stage": stage.name, "params": n_params, "trainable": n_train,
            "steps": total, "steps_per_epoch": per_epoch, "rows_per_step": batch_size * accum,
            "warmup_steps": warmup_steps(cfg.optimizer, total), "image_slots": slots,
            "mesh": dict(mesh.shape), "processes": processes, "mixture": mixture,
            "eval_rows": sum(len(s.examples) for s in eval_sources), "bad_rows": len(bad),
            **(lengths.as_dict() if lengths is not None else {}),
            **({"packing": packing} if packing else {})}
    if dry_run:
        from medgemma_core.sharding import memory_report

        report = memory_report(model, dict(mesh.shape),
                               optimizer="adamw" if cfg.optimizer.name == "adamw" else tx,
                               trainable=prepared.trainable)
        plan["memory"] = {"param_bytes_per_device": report.param_bytes_per_device,
                          "grad_bytes_per_device": report.grad_bytes_per_device,
                          "optimizer_bytes_per_device": report.optimizer_bytes_per_device,
                          "total_bytes_per_device": report.total_bytes_per_device}
        plan["memory_text"] = str(report)
        return plan
    # ---- placement and compile
    from medgemma_core.sharding import shardings, tree_shardings

    params_sh, rest_sh = shardings(params, mesh), shardings(rest, mesh)
    params = _place(params, params_sh)
    rest = _place(rest, rest_sh)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = tree_shardings(opt_abstract, params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = {"params": params_sh, "opt": opt_sh, "step": replicated}
    batch_sh = {k: batch_sharding(mesh, batch_size, 0) for k in keys}
    def loss(m: Any, b: Any) -> Any:
        return stage.loss(m, b, cfg)

    fns = build_steps(train_def, eval_def, loss, tx, schedule, accum=accum,
                      shardings=(state_sh, rest_sh, None), batch_shardings=batch_sh,
                      eval_extra=(None if stage.eval_batch is None else
                                  lambda m, b: stage.eval_batch(m, b, cfg)),
                      **({"as_batch": lambda mb: mb, "tokens_key": custom.tokens_key}
                         if own_batches else {}))
    ckpt = Checkpoints(ckpt_dir, keep_last=cfg.run.keep_last, keep_best=cfg.run.keep_best,
                       best_metric=cfg.run.best_metric, best_mode=cfg.run.best_mode)
    start = 0
    if cfg.run.resume and ckpt.latest_step() is not None:
        start = int(ckpt.latest_step())
        params, opt_state, meta = ckpt.restore(start, params, opt_state)
        if meta.get("data_rows") != pipeline.rows or meta.get("rows_per_step") != batch_size * accum \
                or meta.get("packed", False) != bool(packing):
            raise TrainError(f"--resume: the data or batch size changed since step {start} "
                             f"({meta.get('data_rows')} rows, {meta.get('rows_per_step')} per "
                             f"step then); resume with the same data and settings")
        pipeline.set_state(meta["data_state"])
        say(f"resumed from step {start} ({ckpt_dir / str(start)})")
    state = {"params": params, "opt": opt_state,
             "step": _place(jnp.asarray(start, jnp.int32), replicated)}
    if process == 0:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    writer = MetricsWriter(out, total_steps=total, tensorboard=cfg.run.tensorboard,
                           progress=cfg.run.progress, primary=process == 0, start_step=start)
    layers, width = _decoder_shape(model)
    fpt = flops_per_token(n_params, layers, cfg.data.seq_len, width)
    peak = peak_flops(jax.devices()[0])
    stop = {"flag": False}
    try:  # only the main thread may install handlers
        old = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    except ValueError:
        old = None

    def meta(step: int, metrics: dict | None) -> dict:
        return {"step": step, "seed": cfg.run.seed, "data_state": pipeline.get_state(),
                "data_rows": pipeline.rows, "rows_per_step": batch_size * accum,
                "packed": bool(packing),
                "stage": stage.name, "base_checkpoint": cfg.model.checkpoint,
                "metrics": metrics or {}, "config": to_dict(cfg)}

    def evaluate(p: Any) -> dict:
        values: dict = {}
        if stage.evaluate is not None:  # a stage's own validation may need no data.eval
            nnx.update(model, p)
            values.update(stage.evaluate(model, cfg))
        if not eval_sources:
            return values
        ev = EvalPipeline(eval_sources, encoder, batch_size=batch_size, process=process,
                          processes=processes, pad=not own_batches)
        total_loss, total_n = 0.0, 0
        extra: dict[str, list[float]] = {}
        sh = {k: batch_sharding(mesh, batch_size, 0) for k in keys if k != "segment_ids"}
        for b in ev:
            b = _put(b, sh, processes, batch_size)
            r = fns.evaluate(p, rest, {k: v[0] for k, v in b.items()})
            total_loss += float(r["loss_sum"])
            total_n += int(r["tokens"])
            for name, (num, den) in r.get("extra", {}).items():
                acc = extra.setdefault(name, [0.0, 0.0])
                acc[0] += float(num)
                acc[1] += float(den)
        if own_batches and total_n == 0:  # fewer eval rows than one whole batch
            return values
        sums = {name: num / den if den else None for name, (num, den) in extra.items()}
        return {"eval_loss": total_loss / max(1, total_n), "eval_tokens": total_n, **sums,
                **values}

    warned = {"best": False}

    def check_best(values: dict) -> None:
        """One line when run.best_metric is not among the validation metrics."""
        if values and cfg.run.keep_best and cfg.run.best_metric not in values \
                and not warned["best"]:
            warned["best"] = True
            known = ", ".join(k for k, v in values.items() if isinstance(v, int | float))
            say(f"warning: run.best_metric={cfg.run.best_metric} is not among the validation "
                f"metrics ({known}); no checkpoint is kept as best; set run.best_metric to one")

    history: list[dict] = []
    last_eval: dict = {}
    step = start
    t_last, logged = time.time(), start
    try:
        with jax.set_mesh(mesh):
            if cfg.run.eval_on_start and start == 0 and (eval_sources or stage.evaluate):
                baseline = evaluate(state["params"])
                if baseline:
                    writer.write(0, baseline, split="eval")
            while step < total:
                local = next(pipeline)
                first = local[keys[0]]  # tokens (a custom encoder: its first key)
                digest = int(np.sum(np.asarray(first).astype(np.int64)
                                    * (1 + np.arange(first.size).reshape(first.shape)))
                             % (1 << 31))
                batch = _put(local, batch_sh, processes, batch_size)
                state, m = fns.train(state, rest, batch)
                step += 1
                writer.advance()
                if step % cfg.run.log_every == 0 or step == total:
                    values = {k: float(v) for k, v in jax.device_get(m).items()}
                    now = time.time()
                    dt = max(now - t_last, 1e-9)  # the last step's tokens stand for each since
                    values["tokens_per_s"] = values["input_tokens"] * (step - logged) / dt
                    values["data_digest"] = digest  # a fingerprint of this step's rows
                    if peak:
                        values["mfu"] = values["tokens_per_s"] * fpt / (peak * jax.device_count())
                    t_last, logged = now, step
                    writer.write(step, values)
                    history.append({"step": step, "loss": values["loss"]})
                evaluated = None
                if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < total:
                    evaluated = last_eval = evaluate(state["params"])
                    check_best(evaluated)
                    writer.write(step, evaluated, split="eval")
                saving = (cfg.run.save_every and step % cfg.run.save_every == 0) or evaluated
                if stop["flag"] or step == cfg.run.stop_at:
                    ckpt.save(step, state["params"], state["opt"], meta(step, evaluated),
                              evaluated, wait=True)
                    why = "SIGTERM" if stop["flag"] else "run.stop_at"
                    say(f"{why}: saved step {step}; rerun with --resume to continue")
                    raise Preempted(step)
                if saving and step < total:
                    ckpt.save(step, state["params"], state["opt"], meta(step, evaluated),
                              evaluated)
            final_eval = evaluate(state["params"])
            check_best(final_eval)
            if final_eval:
                last_eval = final_eval
                writer.write(step, final_eval, split="eval")
            if step > start or ckpt.latest_step() != step:
                ckpt.save(step, state["params"], state["opt"], meta(step, final_eval or None),
                          final_eval or None, wait=True)
            best = ckpt.best_step() if cfg.run.keep_best else None
    finally:
        writer.close()
        ckpt.close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    nnx.update(model, state["params"])
    model.eval()
    summary = {"stage": stage.name, "steps": step, "resumed_from": start or None,
               "final_train_loss": history[-1]["loss"] if history else None,
               "first_train_loss": history[0]["loss"] if history else None,
               "final_eval_loss": last_eval.get("eval_loss"),
               "final_eval": {k: v for k, v in last_eval.items()
                              if isinstance(v, int | float) or v is None},
               "run": str(out), "checkpoints": str(ckpt_dir), "metrics": str(out / "metrics.jsonl"),
               "best_step": best,
               "bad_rows": len(bad) + len(getattr(encoder, "bad", ())), "plan": plan}
    if stage.finish is not None and process == 0:
        summary["exports"] = stage.finish(model, prepared, cfg, out)
    summary["model"] = model
    return summary


def replace_run(cfg: RunConfig, **changes: Any) -> RunConfig:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **changes))
