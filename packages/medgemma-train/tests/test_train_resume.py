"""Checkpoints: exact resume, a SIGKILL during a save, best-K (tiny text model, LoRA)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from train_fixtures import ENV, chat_rows, metrics, tiny_text_checkpoint, write_jsonl

from medgemma_train.engine.checkpoint import Checkpoints
from medgemma_train.engine.config import load_config
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import Preempted, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # one compiled program serves every run of this module (same shapes and schedule)
    jax.config.update("jax_compilation_cache_dir", str(root / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    ck = tiny_text_checkpoint(root / "ck", layers=1)  # one layer: a shorter compile
    data = write_jsonl(root / "train.jsonl", chat_rows(24, seed=1))
    return root, ck, data


def _cfg(root, ck, data, out, **run):
    return load_config(base={
        "model": {"checkpoint": str(ck)},
        "data": {"train": [str(data)], "batch_size": 4, "seq_len": 24, "seed": 3},
        "lora": {"rank": 4, "dropout": 0.1},  # dropout on: its masks must resume too
        "optimizer": {"lr": 1e-2, "grad_accum": 2},
        "run": {"out": str(root / out), "max_steps": 10, "save_every": 5, "progress": False,
                "keep_best": 0, **run}})


def _params(model):
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def test_exact_resume(setup):
    """10 steps straight == 5 steps, a restart with resume, 5 more: the same rows in the
    same order (the per-step data fingerprints), the same losses and parameters within 1e-6.
    The 24 rows make 3 steps of 8 an epoch: the restart is inside the second epoch and the
    resumed steps cross two epoch boundaries, so the reshuffle resumes too."""
    root, ck, data = setup
    straight = train(_cfg(root, ck, data, "straight"), get_stage("sft"))
    with pytest.raises(Preempted):
        train(_cfg(root, ck, data, "split", stop_at=5), get_stage("sft"))
    assert Checkpoints(root / "split" / "checkpoints", read_only=True).latest_step() == 5
    resumed = train(_cfg(root, ck, data, "split", resume=True), get_stage("sft"))
    assert resumed["resumed_from"] == 5 and resumed["steps"] == 10
    a, b = metrics(root / "straight"), metrics(root / "split")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["data_digest"] for r in a] == [r["data_digest"] for r in b]
    assert len({r["data_digest"] for r in a}) == 10  # the fingerprint does tell rows apart
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], atol=1e-6)
    pa, pb = _params(straight["model"]), _params(resumed["model"])
    assert pa.keys() == pb.keys() and len(pa) > 0
    base = _params_base(ck)
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-6, err_msg=k)
    moved = max(float(np.abs(pa[k] - base[k]).max()) for k in pa if k.endswith("/b"))
    assert moved > 1e-3  # training changed the adapters (b starts at zero)


def _params_base(ck):
    from medgemma_core.checkpoints.export import load_any
    from medgemma_core.lora import LoRAConfig, apply_lora

    m = load_any(ck)
    apply_lora(m, LoRAConfig(rank=4, dropout=0.1), rngs=nnx.Rngs(0))
    return _params(m)


@pytest.mark.slow  # a kill inside the save (CI time; exact resume stays in the default run)
def test_kill_during_save_restarts_from_last_complete(setup):
    """SIGKILL while Orbax writes a checkpoint (its temporary folder exists): the restart
    resumes from the last checkpoint whose save had completed, and finishes the run."""
    root, ck, data = setup
    out = root / "killed"
    code = ("import sys; from medgemma_train.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["sft", "--checkpoint", str(ck), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--seq-len", "24", "--lora-rank", "4", "--max-steps", "400",
            "--save-every", "1", "--no-progress", "--set", "run.keep_last=3", "--grad-accum", "2",
            "--lr", "1e-2", "--set", "lora.dropout=0.1", "--set", "data.seed=3",
            "--set", "run.keep_best=0"]
    env = {**os.environ, **ENV}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckdir = out / "checkpoints"
    killed_at = None
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckdir.is_dir():
                done = [p for p in ckdir.iterdir() if p.name.isdigit()]
                tmp = [p for p in ckdir.iterdir() if "tmp" in p.name]
                if len(done) >= 2 and tmp:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = [p.name for p in tmp]
                    break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert killed_at, "never caught a save in progress"
    complete = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    last = Checkpoints(ckdir, read_only=True).latest_step()
    assert last is not None and str(last) not in [n.split(".")[0] for n in killed_at]
    assert last == max(complete)
    cfg = _cfg(root, ck, data, "killed", resume=True, max_steps=last + 2)
    result = train(cfg, get_stage("sft"))
    assert result["resumed_from"] == last and result["steps"] == last + 2


def test_best_k_keeps_the_best_validation_checkpoint(setup):
    """Train on one answer ("Paris"), validate on another (twelve "Rome"s, tokens training
    never rewards): the validation loss rises as the model fits the training answer, so the
    best checkpoint is an early one that keep-last alone would delete. best_step must be the step of the lowest eval_loss in metrics.jsonl."""
    root, _, _ = setup
    ck = tiny_text_checkpoint(root / "ck2")  # two layers: the measured task below
    train_data = write_jsonl(root / "fit.jsonl", chat_rows(8, answers=["Paris"]))
    val = write_jsonl(root / "val.jsonl", chat_rows(4, answers=[" ".join(["Rome"] * 12)]))
    cfg = load_config(base={
        "model": {"checkpoint": str(ck)},
        "data": {"train": [str(train_data)], "eval": [str(val)], "batch_size": 4,
                 "seq_len": 24, "mask_prompt": True},
        "lora": {"rank": 4},
        "optimizer": {"lr": 3e-2, "warmup_ratio": 0.0, "decay": "constant"},
        "run": {"out": str(root / "best"), "max_steps": 12, "eval_every": 2, "save_every": 0,
                "keep_last": 1, "keep_best": 1, "progress": False}})
    result = train(cfg, get_stage("sft"))
    evals = metrics(root / "best", "eval")
    losses = {r["step"]: r["eval_loss"] for r in evals}
    best = min(losses, key=losses.get)
    assert best < 12, losses  # the task makes an early checkpoint the best
    kept = Checkpoints(root / "best" / "checkpoints", read_only=True).steps()
    assert kept == sorted({best, 12})
    assert result["best_step"] == best
