"""The ``siglip`` and ``pretrain`` rows of ``benchmarks/train.py``: medgemma-train against
transformers + torch doing the same step on the same batch, each side in its own process.

* ``siglip``: a random two-tower SigLIP (``--siglip-width``, ``--siglip-layers``, 224 px in
  16 px patches, 16 caption tokens) saved as a Hugging Face folder; ``medgemma-train siglip``
  on a caption manifest of synthetic images against ``transformers.SiglipModel`` with the
  sigmoid loss written in torch (``-sum log_sigmoid(y * z) / B``), AdamW, grad-norm clip 1.0,
  on the pixels and ids our pipeline made. Reported: images/s (and caption tokens/s).
* ``pretrain``: medgemma-core's tiny random Gemma 3 image-text model (transformers writes it,
  the real 262k vocabulary) with ``medgemma-train pretrain`` on captioned images against
  ``Gemma3ForConditionalGeneration`` on our collated rows (input_ids, token_type_ids,
  pixel_values, labels), AdamW. Reported: tokens/s (non-padding input tokens).

Both: median step after ``--warmup`` steps, float32, CPU; ours includes its whole pipeline.

Recorded 2026-12-01 on the 2-core CPU shared with other jobs (load average 10-19, so the
ratios are rough): ``--steps 6 --threads 2``; siglip (width 256, 4 layers, batch 8) 3.5
images/s against 4.7 (0.73x; our first step, compile, 67 s); pretrain (tiny model, batch 4,
seq 64) 111 tokens/s against 26 (4.3x; compile 80 s). ``pretrain-memory`` (XLA's planned
peak of one step, remat none / full): 1 image (99 tokens) 24 / 20 MB, 8 images (561) 118 /
90 MB, 32 images (2,145) 310 / 188 MB, 85 slices (5,643) 742 / 581 MB: no faster than
linear in the row length (57x the tokens, 31x the memory).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

THEIRS_SIGLIP = r"""
import json, resource, statistics, sys, time
import numpy as np, torch, torch.nn.functional as F, transformers
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
model = transformers.SiglipModel.from_pretrained(a["ck"], dtype=torch.float32).train()
data = np.load(a["batch"])
ids, pixels = torch.tensor(data["ids"]), torch.tensor(data["pixels"])
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
times, losses = [], []
for step in range(a["steps"]):
    t = time.perf_counter()
    k = step % ids.shape[0]
    out = model(input_ids=ids[k], pixel_values=pixels[k])
    img = out.image_embeds; txt = out.text_embeds   # L2-normalized
    z = img @ txt.T * model.logit_scale.exp() + model.logit_bias
    y = 2 * torch.eye(z.shape[0]) - 1
    loss = -F.logsigmoid(y * z).sum() / z.shape[0]
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    times.append(time.perf_counter() - t); losses.append(float(loss))
step_s = statistics.median(times[a["warmup"]:] or times)
print(json.dumps({"images_per_s": ids.shape[1] / step_s, "step_s": step_s,
                  "first_loss": losses[0], "last_loss": losses[-1],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

THEIRS_PRETRAIN = r"""
import json, resource, statistics, sys, time
import numpy as np, torch, transformers
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
    a["ck"], dtype=torch.float32, attn_implementation="eager").train()
data = np.load(a["batch"])
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
steps = data["input_ids"].shape[0]
times, losses = [], []
for step in range(a["steps"]):
    t = time.perf_counter()
    k = step % steps
    out = model(input_ids=torch.tensor(data["input_ids"][k]),
                attention_mask=torch.tensor(data["attention_mask"][k]),
                token_type_ids=torch.tensor(data["token_type_ids"][k]),
                pixel_values=torch.tensor(data["pixel_values"][k]),
                labels=torch.tensor(data["labels"][k]))
    opt.zero_grad(); out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    times.append(time.perf_counter() - t); losses.append(float(out.loss))
step_s = statistics.median(times[a["warmup"]:] or times)
tokens = float(data["attention_mask"].sum(axis=(1, 2)).mean())
print(json.dumps({"tokens_per_s": tokens / step_s, "step_s": step_s, "first_loss": losses[0],
                  "last_loss": losses[-1],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _images(folder: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["red square", "green circle", "blue cross", "yellow bar"]
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20)]
    rows = []
    for i in range(n):
        img = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
        y, x = rng.integers(0, 33, 2)
        img[y:y + 32, x:x + 32] = colours[i % 4]
        Image.fromarray(img).save(folder / f"{i}.png")
        rows.append({"path": str(folder / f"{i}.png"), "caption": names[i % 4]})
    manifest = folder / "captions.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _ours(stage: str, args: list[str], out: Path, warmup: int, script: str) -> dict:
    stats = out.with_suffix(".json")
    run = subprocess.run([sys.executable, "-c", script, str(stats), stage, *args, "--out",
                          str(out), "--no-progress", "--set", "run.save_every=0", "--set",
                          "run.keep_best=0"], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"medgemma-train {stage} failed: {run.stderr[-2000:]}")
    train = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    times = [b["time"] - p["time"] for p, b in zip(train, train[1:])]
    step = statistics.median(times[max(0, warmup - 1):] or times)
    return {"step_s": step, "input": statistics.mean(r["input_tokens"] for r in train),
            "compile_s": max(0.0, train[0]["time"] - step), "first_loss": train[0]["loss"],
            "last_loss": train[-1]["loss"], **json.loads(stats.read_text())}


def _theirs(script: str, spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"transformers side failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def siglip_row(a, tmp: Path, ours_script: str) -> dict:
    from flax import nnx

    from medgemma_train.engine.captions import read_caption_source
    from medgemma_train.engine.config import SourceConfig
    from medgemma_train.engine.siglip import CaptionEncoder
    from medsiglip import (
        SiglipConfig,
        SiglipModel,
        SiglipTextConfig,
        SiglipTokenizer,
        SiglipVisionConfig,
        save_hf,
    )
    from medsiglip.testing import train_sentencepiece

    manifest = _images(tmp / "siglip-data", 4 * a.batch)
    ck = tmp / "siglip-ck"
    spiece = train_sentencepiece(tmp / "spm", [r.split(" ", 1)[1] for r in
                                               ["x red square", "x green circle",
                                                "x blue cross", "x yellow bar"]],
                                 vocab_size=40)
    vocab = SiglipTokenizer(spiece).vocab_size
    w, n = a.siglip_width, a.siglip_layers
    cfg = SiglipConfig(
        SiglipVisionConfig(hidden_size=w, intermediate_size=4 * w, num_layers=n,
                           num_heads=w // 64, patch_size=16, image_size=224),
        SiglipTextConfig(vocab_size=vocab, hidden_size=w, intermediate_size=4 * w,
                         num_layers=n, num_heads=w // 64, max_positions=16,
                         projection_size=w))
    save_hf(SiglipModel(cfg, rngs=nnx.Rngs(0)), ck)
    (ck / "spiece.model").write_bytes(spiece.read_bytes())
    # the torch side trains on the batches our pipeline makes (the same rows, in order)
    src = read_caption_source(SourceConfig(path=str(manifest)))
    enc = CaptionEncoder(SiglipTokenizer(spiece, max_length=16), 224)
    rows = list(src.examples)
    batches = [enc(rows[i:i + a.batch], 1) for i in range(0, len(rows), a.batch)]
    np.savez(tmp / "siglip-batch.npz",
             ids=np.stack([b["ids"][0] for b in batches]).astype(np.int64),
             pixels=np.stack([b["pixels"][0].transpose(0, 3, 1, 2) for b in batches]))
    mine = _ours("siglip", ["--checkpoint", str(ck), "--data", str(manifest), "--max-steps",
                            str(a.steps), "--batch-size", str(a.batch), "--set",
                            "siglip.export=false"], tmp / "ours-siglip", a.warmup, ours_script)
    mine["images_per_s"] = a.batch / mine["step_s"]
    peer = _theirs(THEIRS_SIGLIP, {"ck": str(ck), "batch": str(tmp / "siglip-batch.npz"),
                                   "steps": a.steps, "warmup": a.warmup,
                                   "threads": a.threads})
    return {"medgemma_train": mine, "transformers_torch": peer,
            "model": {"width": w, "layers": n, "image_size": 224, "patch": 16,
                      "text_tokens": 16, "batch": a.batch},
            "speedup": mine["images_per_s"] / peer["images_per_s"]}


def pretrain_row(a, tmp: Path, ours_script: str) -> dict:
    from medgemma_core import Processor
    from medgemma_core.testing import save_tiny_mm, save_tokenizer_files
    from medgemma_train.engine.captions import read_caption_source
    from medgemma_train.engine.config import SourceConfig

    manifest = _images(tmp / "pretrain-data", 4 * a.batch)
    tok = tmp / "tok"
    save_tokenizer_files(tok)
    ck = tmp / "mm-ck"
    save_tiny_mm(ck, tok, seed=0)
    proc = Processor.from_checkpoint(ck)
    src = read_caption_source(SourceConfig(path=str(manifest)))
    batches = []
    for i in range(0, len(src.examples), a.batch):
        msgs = [[{"role": "user", "content": [{"type": "image", "image": ex.load_path}]},
                 {"role": "assistant", "content": ex.answer}]
                for ex in src.examples[i:i + a.batch]]
        b = proc.collate([proc(m, add_generation_prompt=False) for m in msgs],
                         max_length=a.pretrain_seq, pad_to_multiple_of=a.pretrain_seq)
        batches.append(b)
    np.savez(tmp / "pretrain-batch.npz",
             input_ids=np.stack([b.input_ids for b in batches]).astype(np.int64),
             attention_mask=np.stack([b.attention_mask for b in batches]).astype(np.int64),
             token_type_ids=np.stack([b.token_type_ids for b in batches]).astype(np.int64),
             labels=np.stack([b.labels for b in batches]).astype(np.int64),
             pixel_values=np.stack([np.asarray(b.pixel_values).transpose(0, 3, 1, 2)
                                    for b in batches]).astype(np.float32))
    mine = _ours("pretrain", ["--checkpoint", str(ck), "--data", str(manifest), "--max-steps",
                              str(a.steps), "--batch-size", str(a.batch), "--seq-len",
                              str(a.pretrain_seq)], tmp / "ours-pretrain", a.warmup,
                 ours_script)
    mine["tokens_per_s"] = mine["input"] / mine["step_s"]
    peer = _theirs(THEIRS_PRETRAIN, {"ck": str(ck), "batch": str(tmp / "pretrain-batch.npz"),
                                     "steps": a.steps, "warmup": a.warmup,
                                     "threads": a.threads})
    return {"medgemma_train": mine, "transformers_torch": peer,
            "model": {"checkpoint": "medgemma_core.testing.save_tiny_mm", "seq": a.pretrain_seq,
                      "batch": a.batch},
            "speedup": mine["tokens_per_s"] / peer["tokens_per_s"]}


def memory_rows(a) -> dict:
    """Planned peak memory of one pretrain step (forward, backward, AdamW) per row length:
    one row of ``n`` images (a CT series of up to 85 slices) on a small image-text model
    (64 px images, 64 soft tokens each, a width-128 decoder of 2 layers), with and without
    remat. XLA's own accounting of the compiled step (``memory_analysis``: arguments, outputs
    and temporaries; the optimizer state is among the arguments), not a run's RSS."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medgemma_core import Gemma3Config, Gemma3Multimodal, MultimodalConfig
    from medgemma_core.training import next_token_loss
    from medgemma_train.engine.config import OptimizerConfig
    from medgemma_train.engine.step import build_steps, make_optimizer
    from medsiglip import SiglipVisionConfig

    cfg = MultimodalConfig(
        Gemma3Config.tiny(vocab_size=4096, hidden_size=128, intermediate_size=256,
                          num_layers=2, head_dim=32, query_pre_attn_scalar=32),
        SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                           patch_size=4, image_size=64, use_head=False),
        mm_tokens_per_image=64, image_token_id=4000, boi_token_id=4001, eoi_token_id=4002)
    model = nnx.eval_shape(lambda: Gemma3Multimodal(cfg, rngs=nnx.Rngs(0)))
    out = {"model": "decoder width 128 x 2 layers, vocab 4096; SigLIP 64 px, patch 4, 2 layers; "
                    "64 soft tokens per image", "rows": []}
    for n in a.memory_images:
        body = [1] + [t for _ in range(n) for t in
                      ([cfg.boi_token_id] + [cfg.image_token_id] * 64 + [cfg.eoi_token_id])]
        body += list(range(10, 42))  # 32 caption tokens
        seq = -(-len(body) // 128) * 128
        tokens = jnp.zeros((1, seq), jnp.int32).at[0, :len(body)].set(jnp.asarray(body))
        mask = jnp.zeros((1, seq), jnp.int32).at[0, :len(body)].set(1)
        labels = jnp.where(mask == 1, tokens, -100)
        batch = {"tokens": tokens[None], "labels": labels[None], "attention_mask": mask[None],
                 "pixels": jnp.zeros((1, 1, n, 64, 64, 3), jnp.float32),
                 "image_mask": jnp.ones((1, 1, n), bool)}
        row = {"images": n, "tokens": len(body), "seq": seq}
        for remat in ("none", "full"):
            train_def, params, rest = nnx.split(model, nnx.Param, ...)
            tx, schedule = make_optimizer(OptimizerConfig(), 10)
            fns = build_steps(train_def, train_def,
                              lambda m, b, r=remat: next_token_loss(m, b, remat=r), tx,
                              schedule, accum=1)
            state = {"params": params, "opt": jax.eval_shape(tx.init, params),
                     "step": jax.ShapeDtypeStruct((), jnp.int32)}
            spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
            mem = fns.train.lower(state, rest, spec).compile().memory_analysis()
            row[f"remat_{remat}"] = {
                "temp_mb": round(mem.temp_size_in_bytes / 2**20, 2),
                "peak_mb": round((mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                  + mem.output_size_in_bytes - mem.alias_size_in_bytes)
                                 / 2**20, 2)}
        out["rows"].append(row)
    return out
