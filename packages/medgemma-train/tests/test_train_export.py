"""A LoRA SFT run's exports load in transformers and peft with our logits (within 1e-4): the
merged Hugging Face folder and the PEFT adapter, for the text model (Gemma3ForCausalLM) and
the image-text model (Gemma3ForConditionalGeneration, vision LoRA included). The export
command rebuilds the same adapter from the run's checkpoint."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file
from train_fixtures import (
    chat_rows,
    metrics,
    small_tokenizer,
    tiny_mm_checkpoint,
    tiny_text_checkpoint,
    write_jsonl,
)

from medgemma_core.training import TrainBatch, forward_hidden
from medgemma_train.cli import main
from medgemma_train.engine.config import load_config
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import train


def _run(root, base, data, out, *, run=(), **data_kw):
    cfg = load_config(base={
        "model": {"checkpoint": str(base)},
        "data": {"train": [str(data)], "batch_size": 4, "seq_len": 40, **data_kw},
        "lora": {"rank": 4, "dropout": 0.0},
        "optimizer": {"lr": 5e-2, "warmup_ratio": 0.0},
        "run": {"out": str(root / out), "max_steps": 4, "save_every": 0, "keep_best": 0,
                "progress": False, "export": ["peft", "hf"], **dict(run)}})
    return train(cfg, get_stage("sft"))


@nnx.jit  # one compiled program (run op by op, each op compiles alone)
def _jit_logits(model, batch):
    return getattr(model, "decoder", model).logits(forward_hidden(model, batch))


def _ours(model, batch):
    """Our logits."""
    return np.asarray(_jit_logits(model, batch))


def _hf_base(root, orbax):
    from medgemma_core.checkpoints.export import load_any, save_hf

    return save_hf(load_any(orbax), root / "base-hf", source=orbax)


def _check_command_export(root, run_folder):
    assert main(["export", str(run_folder), "--to", "peft", str(root / "again")]) == 0
    a = load_file(str(run_folder / "export" / "peft" / "adapter_model.safetensors"))
    b = load_file(str(root / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert max(float(np.abs(v).max()) for k, v in a.items() if "lora_B" in k) > 1e-3


def test_text_exports_match_transformers_and_peft(tmp_path):
    base = _hf_base(tmp_path, tiny_text_checkpoint(tmp_path / "orbax"))
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    val_rows = chat_rows(3, seed=9)
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    result = _run(tmp_path, base, data, "run", eval=[str(val)], mask_prompt=True,
                  run={"eval_on_start": True})
    run = tmp_path / "run"
    # the validation loss before training: the base model in transformers on labels built
    # here by hand (no loss up to and including "<start_of_turn>model\n")
    from medgemma_core.chat import format_chat

    tok, total, count = small_tokenizer(), 0.0, 0
    base_lm = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    for row in val_rows:
        ids = tok.encode(format_chat(row["messages"], add_generation_prompt=False))
        prompt = len(tok.encode(format_chat(row["messages"][:1], add_generation_prompt=True)))
        with torch.no_grad():
            logits = base_lm(torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(ids[1:])
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        total += float(ce[prompt - 1:].sum())
        count += len(ids) - prompt
    evals = {r["step"]: r["eval_loss"] for r in metrics(run, "eval")}
    assert evals[0] == pytest.approx(total / count, abs=1e-5)
    assert evals[4] != pytest.approx(evals[0], abs=1e-3)
    model = result["model"]  # merged by the hf export
    ids = np.asarray([tok.encode("<bos><start_of_turn>user\nWhat comes after 41?<end_of_turn>\n"
                                 "<start_of_turn>model\n42")], np.int32)
    ours = _ours(model, TrainBatch(ids, ids, np.ones_like(ids)))
    t_ids = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(run / "export" / "hf").eval()
        np.testing.assert_allclose(merged(t_ids).logits.numpy(), ours, atol=1e-4)
        plain = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        before = plain(t_ids).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(plain, run / "export" / "peft").eval()
        np.testing.assert_allclose(adapted(t_ids).logits.numpy(), ours, atol=1e-4)
    assert np.abs(before - ours).max() > 1e-2  # the adapters changed the model
    config = json.loads((run / "export" / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(base)
    _check_command_export(tmp_path, run)


def test_image_text_exports_match_transformers_and_peft(tmp_path):
    orbax = tiny_mm_checkpoint(tmp_path / "orbax", hidden_size=32, intermediate_size=64,
                               head_dim=8, query_pre_attn_scalar=8, num_layers=2)
    base = _hf_base(tmp_path, orbax)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(path)
        rows.append({"messages": [{"role": "user", "content": [
            {"type": "image", "image": str(path)}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": ["red", "blue"][i % 2]}]})
    result = _run(tmp_path, base, write_jsonl(tmp_path / "train.jsonl", rows), "run")
    run = tmp_path / "run"
    from medgemma_core import Processor

    proc = Processor.from_checkpoint(base)
    ex = proc([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "0.png")},
                                            {"type": "text", "text": "Colour?"}]}])
    batch = TrainBatch.from_collated(proc.collate([ex]), slots=1)
    ours = _ours(result["model"], batch)
    ids = torch.tensor(batch.tokens, dtype=torch.long)
    kw = {"pixel_values": torch.tensor(ex.pixel_values).permute(0, 3, 1, 2),
          "token_type_ids": torch.tensor((batch.tokens == proc.image_token_id).astype(np.int64))}
    cls = transformers.Gemma3ForConditionalGeneration
    with torch.no_grad():
        merged = cls.from_pretrained(run / "export" / "hf").eval()
        np.testing.assert_allclose(merged(ids, **kw).logits.numpy(), ours, atol=1e-4)
        plain = cls.from_pretrained(base).eval()
        adapted = peft.PeftModel.from_pretrained(plain, run / "export" / "peft").eval()
        np.testing.assert_allclose(adapted(ids, **kw).logits.numpy(), ours, atol=1e-4)
    names = load_file(str(run / "export" / "peft" / "adapter_model.safetensors"))
    assert any("vision_tower" in k for k in names)  # the vision tower was LoRA-adapted
