"""A real-size medgemma-4b-it checkpoint with random weights (slow; written here, never committed):
the exact tensor names and shapes of the download, bf16, sharded. It loads through ``load()``,
answers a question about an image, and its peak memory is reported (target: < 12 GB RSS)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# transformers 5 names (meta-device model) -> the names in google/medgemma-4b-it's safetensors
LEGACY = (("model.language_model.", "language_model.model."),
          ("model.vision_tower.", "vision_tower.vision_model."),
          ("model.multi_modal_projector.", "multi_modal_projector."))


def medgemma_4b_tensors() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in google/medgemma-4b-it (lm_head is tied, not stored)."""
    import torch
    import transformers

    from medgemma_core.multimodal import MultimodalConfig

    cfg = transformers.Gemma3Config.from_dict(MultimodalConfig.medgemma_4b().to_hf_dict())
    with torch.device("meta"):
        model = transformers.Gemma3ForConditionalGeneration(cfg)
    out = {}
    for name, p in model.state_dict().items():
        if name.startswith("lm_head."):
            continue
        for new, old in LEGACY:
            if name.startswith(new):
                name = old + name[len(new):]
        out[name] = tuple(p.shape)
    return out


def write_random_4b(folder, tokenizer_folder, shard_bytes: int = 2 << 30) -> None:
    import shutil

    import torch
    from safetensors.torch import save_file

    from medgemma_core.multimodal import MultimodalConfig

    folder.mkdir(parents=True, exist_ok=True)
    tensors = medgemma_4b_tensors()
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in sorted(tensors.items()):
        if "norm" in name and name.endswith("weight") and "layer_norm" not in name \
                and "layernorm" not in name:
            t = torch.randn(shape, generator=gen) * 0.1  # Gemma RMSNorm: stored w, scale 1 + w
        elif name.endswith(("layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")):
            t = 1.0 + torch.randn(shape, generator=gen) * 0.05
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        t = t.to(torch.bfloat16)
        if size and size + t.numel() * 2 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append({})
            size = 0
    shards = [s for s in shards if s]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for s in tensors.values())},
         "weight_map": weight_map}))
    cfg = MultimodalConfig.medgemma_4b().to_hf_dict()
    cfg["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in tokenizer_folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)


RUN = r"""
import json, resource, sys, time
import numpy as np
from medgemma_core import load
from medgemma_core.sampling import Sampling

def peak():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)

t0 = time.perf_counter()
model = load(sys.argv[1], dtype="bfloat16", image_batch=1)
print(json.dumps({"stage": "load", "load_s": round(time.perf_counter() - t0, 1),
                  "peak_rss_gb": peak(), "mm_tokens": model.multimodal.config.mm_tokens_per_image}),
      flush=True)
image = np.clip(np.random.default_rng(0).normal(128, 40, (512, 400)), 0, 255).astype(np.uint8)
messages = [{"role": "user", "content": [{"type": "text", "text": "Is there a pneumothorax?"},
                                         {"type": "image", "image": image}]}]
t1 = time.perf_counter()
done = model.chat_completion(messages, max_new_tokens=4, sampling=Sampling(), ignore_eos=True)
print(json.dumps({"stage": "answer", "seconds": round(time.perf_counter() - t1, 1),
                  "peak_rss_gb": peak(), "prompt_tokens": done.prompt_tokens,
                  "token_ids": done.token_ids, "text": done.text}), flush=True)
"""

WRITE = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_multimodal_4b import write_random_4b
write_random_4b(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_real_size_4b_loads_answers_and_reports_memory(hf_folder_reference):
    """Loading peaks under 12 GB RSS; answering (vision tower, prefill, decode loop) stays
    under 14 GB (on the CPU, XLA computes bf16 products in float32: see layers.pin_to)."""
    import tempfile
    from pathlib import Path

    names = medgemma_4b_tensors()
    assert names["language_model.model.embed_tokens.weight"] == (262_208, 2560)
    assert names["vision_tower.vision_model.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert names["vision_tower.vision_model.embeddings.position_embedding.weight"] == (4096, 1152)
    assert names["multi_modal_projector.mm_input_projection_weight"] == (1152, 2560)
    assert len(names) == 883
    # outside pytest's basetemp, which concurrent pytest runs rotate away
    with tempfile.TemporaryDirectory(prefix="medgemma4b-") as tmp:
        folder = Path(tmp) / "medgemma-4b-random"
        subprocess.run([sys.executable, "-c", WRITE, str(folder), str(hf_folder_reference[1]),
                        str(Path(__file__).parent)], check=True, timeout=3600)
        proc = subprocess.run([sys.executable, "-c", RUN, str(folder)], capture_output=True,
                              text=True, timeout=7200)
    stages = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            stages[record["stage"]] = record
    print("medgemma-4b random checkpoint:", json.dumps(stages))
    assert "load" in stages, proc.stderr[-3000:]
    assert stages["load"]["mm_tokens"] == 256
    assert stages["load"]["peak_rss_gb"] < 12.0, stages
    assert proc.returncode == 0, (stages, proc.returncode, proc.stderr[-3000:])
    answer = stages["answer"]
    assert len(answer["token_ids"]) == 4 and answer["prompt_tokens"] > 256
    assert answer["peak_rss_gb"] < 14.0, stages
