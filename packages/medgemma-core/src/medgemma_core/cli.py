"""The ``medgemma`` command: generate from (or chat with) a Gemma 3 / MedGemma checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# medgemma_core.quant.MODES (listed here: the command's --help does not import JAX)
QUANTIZE_MODES = ["int8", "int8-g32", "int8-mse", "int8-g32-mse", "int8-ftable", "int8-g32-ftable",
                  "int8-g32-mse-ftable"]
DESCRIPTION = "Generate from (or chat with) a Gemma 3 / MedGemma checkpoint."  # --help: plain text
EPILOG = """\
examples:
  medgemma generate --prompt "The heart has four chambers:"          (embedded 270M model)
  medgemma generate --checkpoint gemma-3-270m.gguf --prompt "Hi" --greedy --json
  medgemma generate --checkpoint medgemma-4b-it/ --chat --system "You are a radiologist." \\
      --prompt "Describe this X-ray." --image cxr.png
  medgemma chat --checkpoint medgemma-4b-it/
  medgemma convert gemma-3-270m.gguf --to hf gemma-3-270m-hf/
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medgemma", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--checkpoint", help="Hugging Face folder, .gguf file or Orbax folder "
                        "(default: the embedded Gemma 3 270M, a small text-only base model)")
        sp.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and activations (float32 is the fast path on CPUs)")
        sp.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                        help="int8 decoder weights: half the memory, faster batch-1 decoding "
                             "(int8: a scale per output channel; int8-g32: per group of 32, "
                             "as a Q8_0 GGUF stores them; -mse: searched scales; -ftable: "
                             "the embedding table kept in float)")
        sp.add_argument("--system", help="system prompt (folded into the first user turn)")
        sp.add_argument("--max-new-tokens", type=int, default=256)
        mode = sp.add_mutually_exclusive_group()
        mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
        mode.add_argument("--temperature", type=float, default=0.0,
                          help="sample at this temperature (0 = greedy)")
        sp.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0 = off)")
        sp.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = off)")
        sp.add_argument("--seed", type=int, default=0)

    g = sub.add_parser("generate", help="generate a continuation or an answer",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    common(g)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the chat template (instruction-tuned models); "
                        "without it the prompt is raw text after <bos> (base models)")
    g.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image (PNG/JPEG) after the prompt text, in one user turn; "
                        "repeat for several; implies --chat")
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate exactly --max-new-tokens tokens (benchmarks)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object as the last line of stdout")

    c = sub.add_parser("chat", help="interactive chat in the terminal")
    common(c)

    v = sub.add_parser(
        "convert", help="convert a checkpoint to a Hugging Face or Orbax folder",
        description="Convert any checkpoint medgemma reads (a Hugging Face folder, a .gguf file "
                    "or an Orbax folder; text or image-text) into a Hugging Face folder that "
                    "transformers loads with from_pretrained (--to hf: safetensors shards, "
                    "config.json, tokenizer files) or an Orbax folder (--to orbax).")
    v.add_argument("source", metavar="SRC", help="Hugging Face folder, .gguf file or Orbax folder")
    v.add_argument("--to", required=True, choices=["hf", "orbax"], help="output format")
    v.add_argument("out", metavar="OUT", help="output folder (new or empty)")
    v.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="parameter dtype of the output (auto: the source's; float32 for GGUF)")
    v.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="int8 weights in the output (text models, --to orbax): loads quantized")
    v.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file of --to hf, e.g. 5GB or 500MB (default 5GB)")
    v.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    v.add_argument("--json", action="store_true",
                   help="print one JSON object as the last line of stdout")
    return p


def _convert(args) -> int:
    from .checkpoints.export import convert_checkpoint

    def say(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    result = convert_checkpoint(args.source, args.out, to=args.to, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                say=say, quantize=args.quantize)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['out']}: {result['kind']} model, {result['dtype']}, "
              f"{result['tensors']} tensors ({args.to})")
    return 0


def _sampling(args):
    from .sampling import Sampling

    return Sampling(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)


def _generate(args) -> int:
    from .api import load

    t0 = time.perf_counter()
    model = load(args.checkpoint, dtype=args.dtype, quantize=args.quantize)
    load_s = time.perf_counter() - t0
    sampling = _sampling(args)
    if args.image:
        return _generate_with_images(args, model, load_s, sampling)
    ids = model.encode_prompt(args.prompt, chat=args.chat, system=args.system)
    t1 = time.perf_counter()
    if args.json:
        done = model.generate_ids([ids], max_new_tokens=args.max_new_tokens,
                                  sampling=sampling, ignore_eos=args.ignore_eos)[0]
        result = done.to_json()
        gen_s = time.perf_counter() - t1
        result.update(load_seconds=round(load_s, 3), generate_seconds=round(gen_s, 3),
                      checkpoint=model.name)
        print(json.dumps(result, ensure_ascii=False))
        return 0
    for piece in model.stream_ids(ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                  ignore_eos=args.ignore_eos):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generate_with_images(args, model, load_s: float, sampling) -> int:
    """The prompt text first, then the images, in one user turn of the chat template."""
    if not model.is_multimodal:
        raise ValueError(f"{model.name or 'this checkpoint'} is text-only; --image needs an "
                         f"image-text checkpoint (e.g. medgemma-4b-it)")
    for path in args.image:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--image {path}: no such file")
    content = [{"type": "text", "text": args.prompt}]
    content += [{"type": "image", "image": path} for path in args.image]
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": content})
    t1 = time.perf_counter()
    if args.json:
        done = model.chat_completion(messages, max_new_tokens=args.max_new_tokens,
                                     sampling=sampling, ignore_eos=args.ignore_eos)
        result = done.to_json()
        result.update(load_seconds=round(load_s, 3),
                      generate_seconds=round(time.perf_counter() - t1, 3),
                      checkpoint=model.name, images=len(args.image))
        print(json.dumps(result, ensure_ascii=False))
        return 0
    for piece in model.chat_stream(messages, max_new_tokens=args.max_new_tokens,
                                   sampling=sampling, ignore_eos=args.ignore_eos):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _chat(args) -> int:
    from .api import load

    model = load(args.checkpoint, dtype=args.dtype, quantize=args.quantize)
    print(f"medgemma chat: {model.name}. Empty line or Ctrl-D to quit.", file=sys.stderr)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    sampling = _sampling(args)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        answer = []
        for piece in model.chat_stream(messages, max_new_tokens=args.max_new_tokens,
                                       sampling=sampling):
            answer.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .generate import enable_compilation_cache

    enable_compilation_cache()  # compiled programs kept for the next run (MEDGEMMA_JAX_CACHE)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "convert":
            return _convert(args)
        return _chat(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"medgemma: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
