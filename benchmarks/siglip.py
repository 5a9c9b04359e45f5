"""Images/s of the so400m/14 vision tower at 448 (MedSigLIP-448, random weights):
medsiglip (JAX/Flax NNX, jit) against transformers' SiglipVisionModel, same weights, same
inputs, same run. Prints one JSON object.

    python benchmarks/siglip.py                       # full size, f32 and bf16
    python benchmarks/siglip.py --layers 4 --batch 2  # a quicker, smaller run

Both implementations get the same random weights (torch init, converted through the
medsiglip loader) and the same images; the JSON reports the largest output difference too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from medsiglip import SiglipVisionConfig, load_vision_tower_from_tensors

DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def _time_interleaved(fns, iters: int, warmup: int) -> list[list[float]]:
    """Alternates the contenders every iteration so that load from other processes on a
    shared machine hits both alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def run(cfg: SiglipVisionConfig, dtype_name: str, batch: int, iters: int, warmup: int,
        attn: str) -> dict:
    jdt, tdt = DTYPES[dtype_name]
    torch.manual_seed(0)
    hf_cfg = transformers.SiglipVisionConfig(**cfg.to_hf_dict(), attn_implementation=attn)
    ref = transformers.SiglipVisionModel(hf_cfg).eval().to(tdt)
    tensors = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    tower = load_vision_tower_from_tensors(cfg, tensors, dtype=jdt)
    del tensors
    graphdef, state = nnx.split(tower)

    @jax.jit
    def forward(state, x):  # noqa: ANN001, ANN202
        return nnx.merge(graphdef, state).pooled(x)

    x = np.random.default_rng(0).uniform(-1, 1, (batch, cfg.image_size, cfg.image_size, 3))
    x = x.astype(np.float32)
    xj = jnp.asarray(x, jdt)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdt)

    start = time.perf_counter()
    ours_out = forward(state, xj).block_until_ready()
    compile_s = time.perf_counter() - start
    with torch.inference_mode():
        ref_out = ref(pixel_values=xt).pooler_output
        ours, theirs = _time_interleaved(
            [lambda: forward(state, xj).block_until_ready(), lambda: ref(pixel_values=xt)],
            iters, warmup,
        )
    diff = float(np.max(np.abs(np.asarray(ours_out, np.float32) - ref_out.float().numpy())))
    ours_ips = batch / float(np.median(ours))
    theirs_ips = batch / float(np.median(theirs))
    best = (batch / min(ours)) / (batch / min(theirs))
    return {
        "dtype": dtype_name,
        "batch": batch,
        "medsiglip_images_per_s": round(ours_ips, 4),
        "transformers_images_per_s": round(theirs_ips, 4),
        "speedup": round(ours_ips / theirs_ips, 3),
        "speedup_best_of": round(best, 3),
        "medsiglip_compile_s": round(compile_s, 2),
        "medsiglip_times_s": [round(t, 3) for t in ours],
        "transformers_times_s": [round(t, 3) for t in theirs],
        "max_abs_diff_pooled": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=27, help="encoder depth (27 = real)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=sorted(DTYPES))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                        help="transformers attention implementation (its default is sdpa)")
    args = parser.parse_args()
    cfg = SiglipVisionConfig.so400m_patch14_448().replace(
        num_layers=args.layers, image_size=args.image_size)
    results = [run(cfg, d, args.batch, args.iters, args.warmup, args.attn) for d in args.dtypes]
    print(json.dumps({
        "benchmark": "so400m/14 vision tower forward (tokens + MAP head), images/s",
        "config": {"image_size": cfg.image_size, "layers": cfg.num_layers,
                   "hidden": cfg.hidden_size, "tokens": cfg.num_patches},
        "device": jax.devices()[0].device_kind,
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
