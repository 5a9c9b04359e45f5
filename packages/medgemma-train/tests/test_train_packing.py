"""data.pack: text-only rows packed into seq_len sequences (medgemma_core's pack_rows, segment
ids). The same rows give the same loss per token packed or not; --dry-run counts sequences;
exact resume holds with packing on; an image-text model refuses it in one line."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from train_fixtures import (
    chat_rows,
    metrics,
    small_tokenizer,
    tiny_mm_checkpoint,
    tiny_text_checkpoint,
    write_jsonl,
)

from medgemma_core.chat import format_chat
from medgemma_train.engine.config import load_config
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import Preempted, TrainError, train

SEQ = 45


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    jax.config.update("jax_compilation_cache_dir", str(root / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return root, tiny_text_checkpoint(root / "ck", layers=1)  # one layer: a shorter compile


def _cfg(root, ck, data, out, *, pack, batch, steps, **run):
    return load_config(base={
        "model": {"checkpoint": str(ck)},
        "data": {"train": [str(data)], "batch_size": batch, "seq_len": SEQ, "seed": 3,
                 "pack": pack},
        "lora": {"rank": 4, "dropout": 0.0},
        "optimizer": {"lr": 1e-2},
        "run": {"out": str(root / out), "max_steps": steps, "save_every": 3, "keep_best": 0,
                "progress": False, **run}})


def test_packed_rows_give_the_same_loss_per_token(setup):
    """8 rows of 16-22 tokens (by hand below): 2 fit in 45 tokens, 3 do not, so packing makes
    4 sequences, and one step of batch 4 sees every row. That step's loss per token (before
    its update: the base parameters, the LoRA b = 0) equals the unpacked rows' loss per
    token, transformers running each row alone, within 1e-5, over the same tokens."""
    import torch
    import transformers

    from medgemma_core.checkpoints.export import load_any, save_hf

    root, ck = setup
    hf = save_hf(load_any(ck), root / "hf", source=ck)
    rows = chat_rows(8, seed=5)
    tok = small_tokenizer()
    ids = [tok.encode(format_chat(r["messages"], add_generation_prompt=False)) for r in rows]
    lengths = [len(i) for i in ids]
    assert 2 * max(lengths) <= SEQ < 3 * min(lengths), lengths
    data = write_jsonl(root / "eight.jsonl", rows)
    plan = train(_cfg(root, hf, data, "plan", pack=True, batch=4, steps=1), get_stage("sft"),
                 dry_run=True)
    assert plan["packing"]["rows"] == 8 and plan["packing"]["sequences"] == 4
    assert plan["packing"]["fill"] == pytest.approx(sum(lengths) / (4 * SEQ), abs=1e-4)
    assert plan["steps_per_epoch"] == 1 and plan["mixture"][0]["sequences"] == 4
    packed = train(_cfg(root, hf, data, "packed", pack=True, batch=4, steps=1),
                   get_stage("sft"))
    step = metrics(root / "packed")[0]
    lm = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    total = 0.0
    with torch.no_grad():
        for row in ids:
            logits = lm(torch.tensor([row])).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:]),
                                                             reduction="sum"))
    count = sum(lengths) - 8  # every token but each row's first
    assert step["tokens"] == count and step["input_tokens"] == sum(lengths)
    assert step["loss"] == pytest.approx(total / count, abs=1e-5)
    assert packed["steps"] == 1


def _lora(model):
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


@pytest.mark.slow
def test_exact_resume_with_packing(setup):
    """24 rows -> 12 sequences, 4 per step: 6 steps straight == 3, a restart, 3 more (an
    epoch boundary crossed): the same sequences in the same order, losses and parameters."""
    root, ck = setup
    data = write_jsonl(root / "many.jsonl", chat_rows(24, seed=1))
    straight = train(_cfg(root, ck, data, "straight", pack=True, batch=4, steps=6),
                     get_stage("sft"))
    with pytest.raises(Preempted):
        train(_cfg(root, ck, data, "split", pack=True, batch=4, steps=6, stop_at=3),
              get_stage("sft"))
    with pytest.raises(TrainError, match="resume with the same data and settings"):
        train(_cfg(root, ck, data, "split", pack=False, batch=4, steps=6, resume=True),
              get_stage("sft"))
    resumed = train(_cfg(root, ck, data, "split", pack=True, batch=4, steps=6, resume=True),
                    get_stage("sft"))
    assert resumed["resumed_from"] == 3
    a, b = metrics(root / "straight"), metrics(root / "split")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["data_digest"] for r in a] == [r["data_digest"] for r in b]
    assert len({r["data_digest"] for r in a}) > 3
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], atol=1e-6)
    pa, pb = _lora(straight["model"]), _lora(resumed["model"])
    assert pa.keys() == pb.keys() and pa
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_image_text_models_do_not_pack(setup, tmp_path):
    root, _ = setup
    ck = tiny_mm_checkpoint(tmp_path / "mm")
    data = write_jsonl(tmp_path / "t.jsonl", chat_rows(4))
    with pytest.raises(TrainError) as info:
        train(_cfg(tmp_path, ck, data, "mm", pack=True, batch=2, steps=1), get_stage("sft"),
              dry_run=True)
    msg = str(info.value)
    assert "\n" not in msg and "image-text" in msg and "data.pack=false" in msg


def test_plan_is_first_fit_in_the_order_given():
    from medgemma_train.engine.packing import plan_packs

    # by hand: 10+30 fill the first sequence; 20 opens the second, the unknown length gets its
    # own, 5 joins the 20; 50 (> 40) counts as 40 and fills one alone
    assert plan_packs([10, 30, 20, None, 5, 50], 40, range(6)) == [(0, 1), (2, 4), (3,), (5,)]
    assert plan_packs([10, 30, 20], 40, [2, 0, 1]) == [(2, 0), (1,)]
