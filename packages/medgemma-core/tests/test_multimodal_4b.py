"""A real-size medgemma-4b-it checkpoint with random weights (slow; written here, never committed):
the exact tensor names and shapes of the download, bf16, sharded. It loads through ``load()``,
answers a question about an image, and its peak memory is reported (target: < 12 GB RSS)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medgemma_core.testing import medgemma_4b_tensors

pytestmark = pytest.mark.slow

RUN = r"""
import json, resource, sys, time
import numpy as np
from medgemma_core import Sampling, load

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
from medgemma_core.testing import write_random_4b
write_random_4b(sys.argv[1], sys.argv[2])
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
        subprocess.run([sys.executable, "-c", WRITE, str(folder), str(hf_folder_reference[1])],
                       check=True, timeout=3600)
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
