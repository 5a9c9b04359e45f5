"""Images/s of the so400m/14 vision tower at 448 (MedSigLIP-448, random weights):
medsiglip (JAX/Flax NNX, jit) against transformers' SiglipVisionModel, same weights, same
inputs, same run. Prints one JSON object.

    python benchmarks/siglip.py                       # full size, f32 and bf16
    python benchmarks/siglip.py --layers 4 --batch 2  # a quicker, smaller run
    python benchmarks/siglip.py --batch 1 8 32 --f32 highest tf32 --attn-impl xla cudnn  # GPU

Both implementations get the same random weights (torch init, converted through the
medsiglip loader) and the same images; the JSON reports the largest output difference too.
On a GPU both run there (torch on ``cuda``, timings synchronized). float32 comes in two
precisions, named by ``--f32``: ``highest`` (true float32 matrix products on both sides:
JAX ``highest``, torch's default) and ``tf32`` (TensorFloat-32 products on both sides: JAX's
default on GPUs, torch with ``allow_tf32``). ``--attn-impl`` picks medsiglip's attention on a
GPU: ``auto`` (the library default: cuDNN's fused kernel for bf16, else XLA), ``xla``, ``cudnn``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from medsiglip import SiglipVisionConfig, layers, load_vision_tower_from_tensors

DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


_null = contextlib.nullcontext


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


def _models(cfg: SiglipVisionConfig, dtype_name: str, attn: str, device: str):
    jdt, tdt = DTYPES[dtype_name]
    torch.manual_seed(0)
    hf_cfg = transformers.SiglipVisionConfig(**cfg.to_hf_dict(), attn_implementation=attn)
    ref = transformers.SiglipVisionModel(hf_cfg).eval().to(tdt)
    tensors = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    tower = load_vision_tower_from_tensors(cfg, tensors, dtype=jdt)
    del tensors
    return ref.to(device), nnx.split(tower)


def run(cfg: SiglipVisionConfig, dtype_name: str, batch: int, iters: int, warmup: int,
        attn: str, device: str = "cpu", f32: str = "highest", attn_impl: str = "xla",
        models=None) -> dict:
    jdt, tdt = DTYPES[dtype_name]
    ref, (graphdef, state) = models or _models(cfg, dtype_name, attn, device)
    tf32 = dtype_name == "float32" and f32 == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    precision = None if dtype_name != "float32" else ("default" if tf32 else "highest")
    layers.ACCELERATOR_ATTENTION = {"xla": None}.get(attn_impl, attn_impl)

    @jax.jit
    def forward(state, x):  # noqa: ANN001, ANN202
        with jax.default_matmul_precision(precision) if precision else _null():
            return nnx.merge(graphdef, state).pooled(x)

    x = np.random.default_rng(0).uniform(-1, 1, (batch, cfg.image_size, cfg.image_size, 3))
    x = x.astype(np.float32)
    xj = jnp.asarray(x, jdt)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdt).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def theirs_fn():  # noqa: ANN202
        out = ref(pixel_values=xt)
        sync()
        return out

    start = time.perf_counter()
    ours_out = forward(state, xj).block_until_ready()
    compile_s = time.perf_counter() - start
    with torch.inference_mode():
        ref_out = ref(pixel_values=xt).pooler_output.float().cpu()
        ours, theirs = _time_interleaved(
            [lambda: forward(state, xj).block_until_ready(), theirs_fn], iters, warmup,
        )
    diff = float(np.max(np.abs(np.asarray(ours_out, np.float32) - ref_out.numpy())))
    ours_ips = batch / float(np.median(ours))
    theirs_ips = batch / float(np.median(theirs))
    best = (batch / min(ours)) / (batch / min(theirs))
    return {
        "dtype": dtype_name,
        "f32_matmuls": f32 if dtype_name == "float32" else None,
        "medsiglip_attention": attn_impl,
        "batch": batch,
        "medsiglip_images_per_s": round(ours_ips, 4),
        "transformers_images_per_s": round(theirs_ips, 4),
        "speedup": round(ours_ips / theirs_ips, 3),
        "speedup_best_of": round(best, 3),
        "medsiglip_compile_s": round(compile_s, 2),
        "medsiglip_times_s": [round(t, 4) for t in ours],
        "transformers_times_s": [round(t, 4) for t in theirs],
        "max_abs_diff_pooled": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=27, help="encoder depth (27 = real)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=sorted(DTYPES))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                        help="transformers attention implementation (its default is sdpa)")
    parser.add_argument("--f32", nargs="+", default=["highest"], choices=["highest", "tf32"],
                        help="float32 matrix-product precision, the same on both sides")
    parser.add_argument("--attn-impl", nargs="+", default=["auto"],
                        choices=["auto", "xla", "cudnn"],
                        help="medsiglip attention on GPUs (auto: cudnn for bf16 when it can, the default)")
    args = parser.parse_args()
    cfg = SiglipVisionConfig.so400m_patch14_448().replace(
        num_layers=args.layers, image_size=args.image_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for d in args.dtypes:
        models = _models(cfg, d, args.attn, device)
        for b in args.batch:
            for f32 in args.f32 if d == "float32" else ["-"]:
                for impl in args.attn_impl:
                    if (device == "cpu" and impl != "auto") or (impl == "cudnn" and d == "float32"):
                        continue
                    try:
                        r = run(cfg, d, b, args.iters, args.warmup, args.attn, device, f32,
                                impl, models)
                    except Exception as e:  # noqa: BLE001  (one failed variant, say so)
                        r = {"dtype": d, "batch": b, "medsiglip_attention": impl,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    results.append(r)
        del models
    print(json.dumps({
        "benchmark": "so400m/14 vision tower forward (tokens + MAP head), images/s",
        "config": {"image_size": cfg.image_size, "layers": cfg.num_layers,
                   "hidden": cfg.hidden_size, "tokens": cfg.num_patches},
        "device": jax.devices()[0].device_kind,
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
