"""The ``distill`` stage: a tiny student learns a tiny teacher's distributions; the loss counts
only answer tokens; offline top-k files with k = V give the online loss.

References are computed here, independently of the stage: full ``[B, T, V]`` logits from the
model package (``forward_hidden`` + the decoder's ``logits``), the KL and the agreement in
float64 numpy over the answer tokens only.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from train_fixtures import chat_rows, small_tokenizer, tiny_text_checkpoint, write_jsonl

from medgemma_core import Processor
from medgemma_core.checkpoints.export import load_any
from medgemma_core.processor import ProcessorConfig
from medgemma_core.training import TrainBatch, forward_hidden
from medgemma_train.engine.config import load_config
from medgemma_train.engine.distill import Distill, distill_loss
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import train


def _processor():
    tok = small_tokenizer()
    extra = tok.vocab_size
    return Processor(tok.with_added_tokens({extra: "<image_soft_token>"}, special_ids=(extra,)),
                     ProcessorConfig())


def _batch(rows, seq_len=32):
    proc = _processor()
    done = [proc(r["messages"], add_generation_prompt=False) for r in rows]
    return TrainBatch.from_collated(proc.collate(done, max_length=seq_len,
                                                 pad_to_multiple_of=seq_len, mask_prompt=True),
                                    slots=0)


@nnx.jit  # one compiled program (run op by op, each op compiles alone)
def _jit_logits(model, batch):
    return getattr(model, "decoder", model).logits(forward_hidden(model, batch))


def _logits(model, batch):
    """The model's logits (float64)."""
    return np.asarray(_jit_logits(model, batch), np.float64)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(student, teacher, batch, alpha=1.0, t=1.0):
    """(mean KL(teacher||student) per answer token, top-1 agreement, summed loss, count)."""
    s, u = _logits(student, batch)[:, :-1], _logits(teacher, batch)[:, :-1]
    targets = np.where(np.asarray(batch.attention_mask)[:, 1:] != 0,
                       np.asarray(batch.labels)[:, 1:], -100)
    keep = targets >= 0
    logq, logp = _log_softmax(s / t)[keep], _log_softmax(u / t)[keep]
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    ce = -np.take_along_axis(_log_softmax(s)[keep], targets[keep][:, None], -1)[:, 0]
    agree = (s[keep].argmax(-1) == u[keep].argmax(-1)).mean()
    loss = (alpha * t * t * kl + (1 - alpha) * ce).sum()
    return kl.mean(), agree, loss, int(keep.sum())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return root, tiny_text_checkpoint(root / "student", seed=0), tiny_text_checkpoint(
        root / "teacher", seed=1)


def _cfg(root, student, teacher, data, **distill):
    return load_config(base={
        "stage": "distill",
        "model": {"checkpoint": str(student), "loss_chunk": 64},
        "data": {"train": [str(data)], "batch_size": 8, "seq_len": 32, "mask_prompt": True},
        "lora": {"rank": 0},
        "optimizer": {"lr": 3e-3, "warmup_steps": 2},
        "run": {"out": str(root / "run"), "max_steps": 30, "save_every": 0, "keep_best": 0,
                "progress": False, "tensorboard": False},
        "distill": {"teacher": str(teacher) if teacher else "", **distill}},
        settings=get_stage("distill").settings)


def test_student_learns_the_teacher(pair):
    """30 steps of 8 rows, alpha = 1 (pure KL), T = 1, full fine-tuning at lr 3e-3: the
    held-out KL to the teacher per answer token falls >= 50% and top-1 agreement rises."""
    root, student, teacher = pair
    data = write_jsonl(root / "train.jsonl", chat_rows(64, seed=0))
    held = _batch(chat_rows(32, seed=9))
    t_model, s0 = load_any(teacher, "float32"), load_any(student, "float32")
    kl0, agree0, _, _ = _reference(s0, t_model, held)
    cfg = _cfg(root, student, teacher, data, alpha=1.0)
    out = train(cfg, get_stage("distill"))
    kl1, agree1, _, _ = _reference(out["model"].student, t_model, held)
    print(f"held-out KL {kl0:.4f} -> {kl1:.4f}; top-1 agreement {agree0:.3f} -> {agree1:.3f}")
    assert kl1 <= 0.5 * kl0, (kl0, kl1)
    assert agree1 > agree0, (agree0, agree1)


def test_loss_counts_answer_tokens_only(pair):
    """The stage's loss equals the float64 reference over the answer tokens, and changing the
    tokens and targets at padded positions (or padding further) leaves it unchanged."""
    root, student, teacher = pair
    data = write_jsonl(root / "pad.jsonl", chat_rows(8, seed=3))
    cfg = _cfg(root, student, teacher, data, alpha=0.3, temperature=2.0)
    model = Distill(load_any(student, "float32"), load_any(teacher, "float32"))
    batch = _batch(chat_rows(4, seed=3))
    graphdef, state = nnx.split(model)
    loss = jax.jit(lambda st, b: distill_loss(nnx.merge(graphdef, st), b, cfg))
    got, n = map(float, loss(state, batch))
    _, _, want, count = _reference(model.student, model.teacher, batch, alpha=0.3, t=2.0)
    assert n == count and abs(got - want) <= 1e-4 * abs(want), (got, want)

    pads = np.asarray(batch.attention_mask) == 0
    assert pads.any()
    rng = np.random.default_rng(0)
    tokens = np.where(pads, rng.integers(5, 300, pads.shape), batch.tokens).astype(np.int32)
    labels = np.where(pads, rng.integers(5, 300, pads.shape), batch.labels).astype(np.int32)
    changed = dataclasses.replace(batch, tokens=tokens, labels=labels)
    again, n2 = map(float, loss(state, changed))
    assert n2 == n and abs(again - got) <= 1e-6 * abs(got), (again, got)
    longer = _batch(chat_rows(4, seed=3), seq_len=48)
    more, n3 = map(float, jax.jit(lambda st, b: distill_loss(nnx.merge(graphdef, st), b, cfg))(
        state, longer))
    assert n3 == n and abs(more - got) <= 1e-5 * abs(got), (more, got)


def test_offline_top_k_equals_online(pair, tmp_path, capsys):
    """``teacher-logits`` with k = V, read back through grain, gives the online loss within
    1e-6 (per token)."""
    from medgemma_train.cli import main
    from medgemma_train.engine.data import read_source
    from medgemma_train.engine.distill import _Encoder
    from medgemma_train.engine.stages import Prepared

    root, student, teacher = pair
    data = write_jsonl(tmp_path / "off.jsonl", chat_rows(12, seed=4))
    vocab = int(load_any(teacher, "float32").embedding.shape[0])
    logits = tmp_path / "logits"
    assert main(["teacher-logits", "--teacher", str(teacher), "--data", str(data),
                 "--seq-len", "32", "--set", "data.mask_prompt=true", "--top-k", str(vocab),
                 "--shard-rows", "5", "--json", str(logits)]) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta["top_k"] == vocab and meta["bytes_per_token"] == vocab * 8
    assert meta["rows"] == 12 and meta["shards"] == 3 and meta["tokens"] > 0

    cfg_on = _cfg(tmp_path, student, teacher, data, alpha=0.4, temperature=1.5)
    off = dict(alpha=0.4, temperature=1.5, logits=str(logits))
    cfg_off = _cfg(tmp_path, student, "", data, **off)
    model = Distill(load_any(student, "float32"), load_any(teacher, "float32"))
    proc = _processor()
    src = [read_source(s, i) for i, s in enumerate(cfg_on.data.train)]
    rows = list(src[0].examples[:8])
    graphdef, state = nnx.split(model)
    results = []
    for cfg in (cfg_on, cfg_off):
        enc = _Encoder(cfg, Prepared(model, proc, None, False), src)
        batch = {k: v[0] for k, v in enc(rows, 1).items()}
        fn = jax.jit(lambda st, b, c=cfg: distill_loss(nnx.merge(graphdef, st), b, c))
        loss_sum, n = fn(state, batch)
        results.append((float(loss_sum) / int(n), int(n)))
    (on, n_on), (offl, n_off) = results
    print(f"online {on:.9f} offline {offl:.9f} per token over {n_on} tokens")
    assert n_on == n_off and abs(on - offl) <= 1e-6, (on, offl)


@pytest.mark.slow  # a teacher-logits run and a distill run (two more compiles)
def test_offline_run_trains_through_the_pipeline(pair, tmp_path, capsys):
    """top-k 16 in float16 (16 * 6 bytes per token), read back by the engine's pipeline: the
    offline run's training loss falls."""
    from medgemma_train.cli import main

    root, student, teacher = pair
    data = write_jsonl(tmp_path / "off.jsonl", chat_rows(32, seed=4))
    logits = tmp_path / "logits16"
    assert main(["teacher-logits", "--teacher", str(teacher), "--data", str(data),
                 "--seq-len", "32", "--set", "data.mask_prompt=true", "--top-k", "16",
                 "--logits-dtype", "float16", "--json", str(logits)]) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta["bytes_per_token"] == 16 * 6
    cfg = _cfg(tmp_path, student, "", data, alpha=1.0, logits=str(logits))
    out = train(dataclasses.replace(cfg, run=dataclasses.replace(
        cfg.run, max_steps=12, out=str(tmp_path / "offrun"))), get_stage("distill"))
    assert out["steps"] == 12 and out["final_train_loss"] < out["first_train_loss"]


@pytest.mark.slow  # about a minute on the shared CPU: several generation compiles
def test_teacher_generate_writes_the_corpus(pair, tmp_path, capsys):
    """The teacher's batched answers become the assistant turns of a chat JSONL corpus, the
    same answers as asking it one question at a time."""
    from medgemma_core import load
    from medgemma_train.cli import main

    root, _, teacher = pair
    rows = chat_rows(5, seed=7)
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "corpus.jsonl"
    assert main(["teacher-generate", "--teacher", str(teacher), "--data", str(data),
                 "--batch-size", "4", "--max-new-tokens", "6", "--json", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = [json.loads(line) for line in out.open()]
    assert meta["rows"] == 5 and len(written) == 5
    model = load(teacher)
    for row, got in zip(rows, written):
        assert got["messages"][:-1] == row["messages"][:-1]
        assert got["reference"] == row["messages"][-1]["content"]
        one = model.chat_completion(row["messages"][:-1], max_new_tokens=6)
        assert got["messages"][-1] == {"role": "assistant", "content": one.text}


@pytest.mark.slow  # two command runs in fresh processes
def test_distill_on_eight_devices_same_loss_curve(pair, tmp_path):
    """Student and online teacher sharded by the rules on 8 fake CPU devices
    (data=2,fsdp=2,tensor=2) give one device's loss curve within 1e-5."""
    from train_fixtures import metrics, run_cli

    root, student, teacher = pair
    data = write_jsonl(tmp_path / "s.jsonl", chat_rows(32, seed=2))
    curves = []
    for name, extra, env in (("one", [], {}), ("eight", ["--mesh", "data=2,fsdp=2,tensor=2"],
                                                {"XLA_FLAGS": "--xla_force_host_platform_"
                                                              "device_count=8"})):
        run_cli(["distill", "--checkpoint", str(student), "--data", str(data), "--out",
                 str(tmp_path / name), "--batch-size", "8", "--seq-len", "24",
                 "--lora-rank", "4", "--lr", "1e-2", "--max-steps", "4", "--no-progress",
                 "--set", f"distill.teacher={teacher}", "--set", "distill.alpha=0.7",
                 "--set", "run.save_every=0", "--set", "run.keep_best=0", *extra], env=env)
        curves.append([r["loss"] for r in metrics(tmp_path / name)])
    assert len(curves[0]) == 4 and curves[0][-1] < curves[0][0]
    np.testing.assert_allclose(curves[1], curves[0], atol=1e-5)
