"""Compile time and compiled memory of one MedGemma training step (no weights, no data).

One step: the chunked next-token loss (``medgemma_core.training.next_token_loss``) of an
image-text batch, its gradient, and an optax AdamW update (or none), on abstract inputs
(``nnx.eval_shape`` / ``jax.ShapeDtypeStruct``): ``jax.jit(step).lower(...).compile()``, so
nothing is allocated. Prints one JSON object: seconds to trace and lower, seconds to compile,
and the compiled program's ``memory_analysis()`` bytes.

    python benchmarks/train_compile.py [--model 4b|27b|tiny] [--batch 1] [--seq 512]
        [--images 1] [--remat none|full|dots] [--compute-dtype bfloat16|float32]
        [--param-dtype float32|bfloat16] [--scan] [--optimizer adamw|none]
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="4b", choices=("4b", "27b", "tiny"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--images", type=int, default=1, help="image slots per row")
    parser.add_argument("--remat", default="dots", choices=("none", "full", "dots"))
    parser.add_argument("--compute-dtype", default="bfloat16")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--scan", action="store_true", help="scan over the decoder's layers")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "none"),
                        help="none: the loss and its gradient only")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from medgemma_core import Gemma3Multimodal, MultimodalConfig
    from medgemma_core.training import TrainBatch, next_token_loss

    cfg = {"4b": MultimodalConfig.medgemma_4b, "27b": MultimodalConfig.medgemma_27b,
           "tiny": MultimodalConfig.tiny}[args.model]()
    model = nnx.eval_shape(lambda: Gemma3Multimodal(cfg, dtype=jnp.dtype(args.param_dtype),
                                                    rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(1e-5)
    opt_state = jax.eval_shape(optimizer.init, params)
    b, t, n, s = args.batch, args.seq, args.images, cfg.vision.image_size
    if n * (cfg.mm_tokens_per_image + 2) > t:
        parser.error(f"--seq {t} cannot hold {n} image(s) of {cfg.mm_tokens_per_image} tokens")
    ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch = TrainBatch(ints, ints, ints,
                       jax.ShapeDtypeStruct((b, n, s, s, 3), jnp.float32) if n else None,
                       jax.ShapeDtypeStruct((b, n), jnp.bool_) if n else None)
    compute = jnp.dtype(args.compute_dtype)

    def step(params, opt_state, batch):
        def loss(p):
            total, count = next_token_loss(nnx.merge(graphdef, p), batch, chunk=args.chunk,
                                           compute_dtype=compute, remat=args.remat,
                                           **({"scan": True} if args.scan else {}))
            return total / jnp.maximum(count, 1)

        value, grads = jax.value_and_grad(loss)(params)
        if args.optimizer == "none":
            return grads, opt_state, value
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    print(json.dumps({
        "model": args.model, "batch": b, "seq": t, "image_slots": n, "remat": args.remat,
        "param_dtype": args.param_dtype, "compute_dtype": args.compute_dtype,
        "chunk": args.chunk, "scan": args.scan, "optimizer": args.optimizer, "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
        "temp_size_in_bytes": mem.temp_size_in_bytes,
        "argument_size_in_bytes": mem.argument_size_in_bytes,
        "output_size_in_bytes": mem.output_size_in_bytes,
    }))


if __name__ == "__main__":
    main()
