"""The ``pretrain`` stage: tower modes, separate learning rates, learning the image from
caption rows, checkpoint selection by the evaluation harness.

The tiny image-text model is test_train_image's (train_fixtures.tiny_mm_checkpoint: SigLIP
2 layers, a width-32 decoder of 2 layers, 4 soft tokens per 32 px image, the cut Gemma 3
tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from stage_fixtures import stage_config, write_manifest
from train_fixtures import metrics, tiny_mm_checkpoint, write_jsonl

from medgemma_core.checkpoints.export import load_any
from medgemma_train.engine.trainer import Preempted, train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 20)}
NAMES = list(COLOURS)


def _squares(folder, n, seed):
    """32 px noise with a 16 px square of one of four colours (balanced) at a random place."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        img = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
        colour = NAMES[i % 4]
        y, x = rng.integers(0, 17, 2)
        img[y:y + 16, x:x + 16] = COLOURS[colour]
        Image.fromarray(img).save(folder / f"{i}.png")
        rows.append({"path": str(folder / f"{i}.png"), "caption": colour})
    return rows


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    ck = tiny_mm_checkpoint(root / "ck", hidden_size=32, intermediate_size=64, head_dim=8,
                            query_pre_attn_scalar=8, num_layers=2)
    rows = _squares(root / "train", 256, 0)
    held_out = _squares(root / "test", 64, 1)
    return root, ck, rows, held_out


def _flat(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _run(root, ck, data, out, *, steps, lr, overrides=(), seq=32, schedule=None, **run):
    """``schedule`` None: constant lr, no warmup, no clipping (the tower-mode checks);
    "sft": test_train_image's recipe (warmup 3%, linear decay, grad norm 0.3)."""
    opt = ({"warmup_ratio": 0.03, "decay": "linear", "max_grad_norm": 0.3} if schedule == "sft"
           else {"warmup_ratio": 0.0, "decay": "constant", "max_grad_norm": 0.0})
    base = {"model": {"checkpoint": str(ck)},
            "data": {"train": [str(data)], "batch_size": 16, "seq_len": seq,
                     "mask_prompt": True},
            "optimizer": {"lr": lr, **opt},
            "run": {"out": str(root / out), "max_steps": steps, "save_every": 0,
                    "keep_best": 0, "progress": False, **run}}
    cfg, stage = stage_config("pretrain", base, tuple(overrides))
    return train(cfg, stage)


def _parts(root, ck, rows):
    data = write_manifest(root / "captions.jsonl", rows[:64])
    base = _flat(load_any(ck))
    vision = [k for k in base if k.startswith("vision/")]
    others = [k for k in base if not k.startswith("vision/")]
    return data, base, vision, others


def test_frozen_tower_is_bitwise_unchanged(task):
    """``pretrain.vision=frozen``: after 2 steps the vision tower is bitwise the checkpoint's
    while the decoder and the projector (always trained) moved."""
    root, ck, rows, _ = task
    data, base, vision, others = _parts(root, ck, rows)

    frozen = _flat(_run(root, ck, data, "frozen", steps=2, lr=1e-2,
                        overrides=["pretrain.vision=frozen"])["model"])
    assert vision and all(frozen[k].tobytes() == base[k].tobytes() for k in vision)
    assert any(k.startswith("projector/") and not np.array_equal(frozen[k], base[k])
               for k in others)
    assert any(k.startswith("decoder/") and not np.array_equal(frozen[k], base[k])
               for k in others)


@pytest.mark.slow
def test_trainable_tower_moves_at_its_own_learning_rate(task):
    """``vision=full`` with ``vision_lr=1e-3`` under ``lr=1e-2``: one AdamW step moves a
    parameter by at most its group's lr (the first Adam update is lr * g / (|g| + eps)); the
    tower's largest change is 1e-3 and the decoder's 1e-2 (to 1%), and most tower weights
    change (their gradients are non-zero)."""
    root, ck, rows, _ = task
    data, base, vision, others = _parts(root, ck, rows)
    full = _flat(_run(root, ck, data, "full", steps=1, lr=1e-2,
                      overrides=["pretrain.vision=full", "pretrain.vision_lr=1e-3"])["model"])
    dv = np.concatenate([np.abs(full[k] - base[k]).ravel() for k in vision])
    dd = np.concatenate([np.abs(full[k] - base[k]).ravel() for k in others
                         if k.startswith(("decoder/", "projector/"))])
    assert np.mean(dv > 0) > 0.5, np.mean(dv > 0)
    np.testing.assert_allclose(dv.max(), 1e-3, rtol=1e-2)
    np.testing.assert_allclose(dd.max(), 1e-2, rtol=1e-2)


def _accuracy(model, ck, held_out):
    """The caption (of the four colours) with the lowest summed next-token loss after the
    image (medgemma_core.training.next_token_loss)."""
    import jax

    from medgemma_core import Processor
    from medgemma_core.training import TrainBatch, next_token_loss

    proc = Processor.from_checkpoint(ck)
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, batch):
        m = nnx.merge(graphdef, state)
        return jax.vmap(lambda b: next_token_loss(m, jax.tree.map(lambda x: x[None], b))[0])(
            batch)

    correct = 0
    for row in held_out:
        examples = [proc([{"role": "user", "content": [{"type": "image", "image": row["path"]}]},
                          {"role": "assistant", "content": c}], add_generation_prompt=False)
                    for c in NAMES]
        batch = TrainBatch.from_collated(proc.collate(examples, mask_prompt=True), slots=1)
        correct += NAMES[int(np.argmin(np.asarray(losses(state, batch))))] == row["caption"]
    return correct / len(held_out)


@pytest.mark.slow
def test_pretraining_learns_the_image(task):
    """Caption rows (the image, then its colour's name), 150 steps of 16 at lr 3e-3 (warmup
    3%, linear decay, grad norm 0.3, loss on the caption), vision tower trainable: held-out accuracy >= 95%; the same with the images permuted across rows
    stays near chance (<= 45%; 25% expected)."""
    root, ck, rows, held_out = task
    real = write_manifest(root / "real.jsonl", rows)
    model = _run(root, ck, real, "learn", steps=150, lr=3e-3, schedule="sft")["model"]
    accuracy = _accuracy(model, ck, held_out)
    assert accuracy >= 0.95, accuracy

    paths = list(np.random.default_rng(5).permutation([r["path"] for r in rows]))
    shuffled = write_manifest(root / "shuffled.jsonl",
                              [{**r, "path": p} for r, p in zip(rows, paths)])
    control = _run(root, ck, shuffled, "shuffled", steps=150, lr=3e-3,
                   schedule="sft")["model"]
    chance = _accuracy(control, ck, held_out)
    assert chance <= 0.45, chance


# ---- checkpoint selection ------------------------------------------------------------------------
def _selection_data(root, rows):
    """Validation: a CXR label manifest (every image: Cardiomegaly) and a VQA JSON of closed
    questions (every answer: yes); training rows asking the same prompts with ``cxr`` /
    ``vqa`` as the answers."""
    from medgemma_train.evals import EvalItem, get_task
    from medgemma_train.evals.prompts import user_text

    cxr, vqa = get_task("cxr_labels"), get_task("vqa_rad")
    val = root / "val"
    (val / "images").mkdir(parents=True)
    cxr_rows, vqa_items = [], []
    for i, r in enumerate(rows[:8]):
        cxr_rows.append({"image": r["path"], "labels": ["Cardiomegaly"]})
        name = f"v{i}.png"
        Image.open(r["path"]).save(val / "images" / name)
        vqa_items.append({"qid": i, "question": "Is the square coloured?", "answer": "yes",
                          "image_name": name, "answer_type": "CLOSED"})
    cxr_file = write_manifest(val / "cxr.jsonl", cxr_rows)
    vqa_file = val / "vqa.json"
    vqa_file.write_text(json.dumps(vqa_items))
    cxr_prompt = user_text(EvalItem("x", "", ()), cxr)
    vqa_prompt = user_text(EvalItem("x", "Is the square coloured?", "yes"), vqa)

    def chat(cxr_answer, vqa_answer):
        out = []
        for r in rows[8:40]:
            for prompt, answer in ((cxr_prompt, cxr_answer), (vqa_prompt, vqa_answer)):
                out.append({"messages": [
                    {"role": "user", "content": [{"type": "text", "text": prompt},
                                                 {"type": "image", "image": r["path"]}]},
                    {"role": "assistant", "content": answer}]})
        return out

    return cxr_file, vqa_file, chat


@pytest.mark.slow
def test_checkpoint_selection_keeps_the_mid_run_peak(task):
    """A run built to peak mid-run: 20 steps on rows answering as the validation sets do
    (Cardiomegaly; yes), a stop with a checkpoint, then the same number of rows answering
    otherwise (Edema; no) for 20 steps after --resume. Validated every 10 steps by the
    harness (generation; CXR macro F1 parsed from the text, VQA closed accuracy), best-K (1)
    keeps the peak's checkpoint, not the last, and RUN/selection.json names it."""
    root, ck, rows, _ = task
    cxr_file, vqa_file, chat = _selection_data(root, rows)
    data = write_jsonl(root / "select.jsonl", chat("Cardiomegaly", "yes"))
    sets = [f"pretrain.cxr_data={cxr_file}", f"pretrain.vqa_data={vqa_file}",
            "pretrain.max_new_tokens=8", "run.keep_best=1", "run.keep_last=1"]
    with pytest.raises(Preempted):
        _run(root, ck, data, "select", steps=40, lr=3e-3, overrides=sets, eval_every=10,
             stop_at=20, eval_on_start=True, seq=96)
    write_jsonl(data, chat("Edema", "no"))  # the same rows, the other answers
    summary = _run(root, ck, data, "select", steps=40, lr=3e-3, overrides=sets,
                   eval_every=10, resume=True, seq=96)
    evals = {r["step"]: r for r in metrics(root / "select", "eval")}
    scores = {s: r["selection_score"] for s, r in evals.items()}
    assert scores[0] < 0.3 and max(scores[10], scores[20]) >= 0.5, scores
    assert scores[40] < max(scores.values()) - 0.3, scores
    best = summary["best_step"]
    assert best in (10, 20) and scores[best] == max(scores.values()), (best, scores)
    chosen = json.loads((root / "select" / "selection.json").read_text())
    assert chosen["step"] == best and chosen["scores"]["selection_score"] == scores[best]
    assert sorted(int(s) for s in chosen["kept"]) == [best, 40]
