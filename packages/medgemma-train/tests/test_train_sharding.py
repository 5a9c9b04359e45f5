"""The same loss curve on one device, on 8 fake CPU devices (data=2,fsdp=2,tensor=2) and in
two processes joined by ``jax.distributed.initialize`` on localhost (CPU collectives)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from train_fixtures import ENV, chat_rows, metrics, run_cli, tiny_text_checkpoint, write_jsonl

from medgemma_train.engine.config import load_config
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import train

STEPS = 5


def _args(ck, data, out, *extra):
    return ["sft", "--checkpoint", str(ck), "--data", str(data), "--out", str(out),
            "--batch-size", "8", "--seq-len", "24", "--lora-rank", "4", "--lr", "1e-2",
            "--max-steps", str(STEPS), "--no-progress", "--set", "run.save_every=0",
            "--set", "run.keep_best=0", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    # An Orbax base checkpoint saved by this one process: the two-process run below restores
    # it in each process (Orbax would restore the saving topology unless told otherwise).
    ck = tiny_text_checkpoint(root / "orbax", layers=1)  # one layer: shorter compiles
    data = write_jsonl(root / "train.jsonl", chat_rows(32, seed=2))
    cfg = load_config(base={
        "model": {"checkpoint": str(ck)},
        "data": {"train": [str(data)], "batch_size": 8, "seq_len": 24},
        "lora": {"rank": 4}, "optimizer": {"lr": 1e-2},
        "run": {"out": str(root / "one"), "max_steps": STEPS, "save_every": 0,
                "keep_best": 0, "progress": False}})
    train(cfg, get_stage("sft"))
    losses = [r["loss"] for r in metrics(root / "one")]
    assert len(losses) == STEPS and losses[-1] < losses[0]  # it trains at all
    return root, ck, data, losses


def test_eight_devices_same_loss_curve(reference):
    root, ck, data, losses = reference
    flags = "--xla_force_host_platform_device_count=8"
    run_cli(_args(ck, data, root / "eight", "--mesh", "data=2,fsdp=2,tensor=2"),
            env={"XLA_FLAGS": flags})
    got = [r["loss"] for r in metrics(root / "eight")]
    np.testing.assert_allclose(got, losses, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_same_loss_curve(reference):
    root, ck, data, losses = reference
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, **ENV, "MEDGEMMA_COORDINATOR": f"127.0.0.1:{port}",
               "MEDGEMMA_NUM_PROCESSES": "2", "MEDGEMMA_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "medgemma_train.cli",
             *_args(ck, data, root / "two", "--mesh", "data=-1")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        finally:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = [r["loss"] for r in metrics(root / "two")]
    np.testing.assert_allclose(got, losses, atol=1e-5)
