"""The ``medsiglip`` command: embed, zero-shot, probe.

    medsiglip embed --checkpoint DIR --image cxr.png [--json]
    medsiglip embed --checkpoint DIR --text "pleural effusion" [--json]
    medsiglip zero-shot --checkpoint DIR --image cxr.png --labels "normal" "pneumothorax" [--json]
    medsiglip probe --checkpoint DIR --data train_dir [--test-data test_dir] [--json]
    medsiglip convert SRC --to hf|orbax OUT [--dtype bfloat16] [--max-shard-size 5GB]

The last line on stdout is one JSON object (``{"embedding": [...]}``,
``{"labels": [...], "probs": [...]}``, ``{"accuracy": ..., "auc": ...}``); with ``--json``
it is the only line. User mistakes print one ``medsiglip: error: ...`` line on stderr and
exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsiglip",
        description="MedSigLIP (JAX/Flax): image and text embeddings, zero-shot "
                    "classification and linear probes from a SigLIP checkpoint folder "
                    "(Hugging Face SiglipModel layout, e.g. google/medsiglip-448, or an Orbax "
                    "folder saved by medsiglip).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                       help="checkpoint folder (config.json + *.safetensors + spiece.model)")
        p.add_argument("--json", action="store_true", help="print only the JSON result line")
        p.add_argument("--resample", choices=("bicubic", "bilinear", "pil_bilinear"),
                       default=None,
                       help="image resize filter (default: what the checkpoint's "
                            "preprocessor_config.json asks for, as transformers' processor "
                            "does; bicubic without one); bilinear is the unfiltered TF resize "
                            "of Google's model card")
        p.add_argument("--pad-to-square", action="store_true",
                       help="zero-pad images to a centred square before resizing")

    p = sub.add_parser("embed", help="L2-normalized embeddings of images or texts",
                       description="Print the L2-normalized embedding of each image or text.")
    common(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", nargs="+", type=Path, metavar="FILE", help="PNG/JPEG files")
    group.add_argument("--text", nargs="+", metavar="T", help="texts")

    p = sub.add_parser("zero-shot", help="sigmoid probability of each label for an image",
                       description="Score an image against free-text labels; each label's "
                                   "probability is independent (sigmoid), so they need not "
                                   "sum to one.")
    common(p)
    p.add_argument("--image", required=True, type=Path, metavar="FILE", help="PNG/JPEG file")
    p.add_argument("--labels", required=True, nargs="+", metavar="L",
                   help='label texts, e.g. "a chest x-ray with pneumothorax"')

    p = sub.add_parser("probe", help="fit and evaluate a linear probe on image embeddings",
                       description="Fit a logistic-regression head on frozen image embeddings "
                                   "of a folder with one subfolder per class; report test "
                                   "accuracy and ROC AUC.")
    common(p)
    p.add_argument("--data", required=True, type=Path, metavar="DIR",
                   help="training images: DIR/<class name>/<image files>")
    p.add_argument("--test-data", type=Path, metavar="DIR",
                   help="test images in the same layout (default: hold out --test-fraction)")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="share of --data held out for testing when --test-data is absent")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")

    p = sub.add_parser("convert", help="convert a checkpoint to a Hugging Face or Orbax folder",
                       description="Convert a SigLIP checkpoint (a Hugging Face SiglipModel or "
                                   "SiglipVisionModel folder, the vision tower of a Gemma 3 "
                                   "image-text folder, or an Orbax folder saved by medsiglip) "
                                   "into a Hugging Face folder that transformers loads "
                                   "(--to hf) or an Orbax folder (--to orbax).")
    p.add_argument("source", type=Path, metavar="SRC", help="checkpoint folder")
    p.add_argument("--to", required=True, choices=("hf", "orbax"), help="output format")
    p.add_argument("out", type=Path, metavar="OUT", help="output folder (new or empty)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="parameter dtype of the output (auto: the source's)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file of --to hf, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT holds")
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    return parser


def _convert(args: argparse.Namespace) -> dict[str, Any]:
    """Load any SigLIP checkpoint, write it as a Hugging Face or Orbax folder."""
    from medsiglip.checkpoints.export import convert_checkpoint

    return convert_checkpoint(args.source, args.out, to=args.to, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                   quiet=args.json)


def _image_folder(root: Path) -> tuple[list[Path], list[str]]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected DIR/<class>/<images>)")
    paths, labels = [], []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                paths.append(f)
                labels.append(cls_dir.name)
    if not paths:
        raise ValueError(f"{root}: no images in class subfolders (expected DIR/<class>/<images>)")
    return paths, labels


def _embed_folder(model: Any, paths: list[Path], quiet: bool) -> Any:
    import numpy as np

    out = []
    step = model.batch_size
    for start in range(0, len(paths), step):
        out.append(model.embed_images(paths[start:start + step]))
        if not quiet:
            done = min(start + step, len(paths))
            print(f"\rembedding images {done}/{len(paths)}", end="", file=sys.stderr)
    if not quiet:
        print(file=sys.stderr)
    return np.concatenate(out)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from medsiglip.api import MedSigLIP

    model = MedSigLIP.from_pretrained(args.checkpoint, resample=args.resample,
                                      pad_to_square=args.pad_to_square)
    say = (lambda *a: None) if args.json else print
    if args.command == "embed":
        if args.image:
            emb = model.embed_images(list(args.image))
            names = [str(p) for p in args.image]
        else:
            emb = model.embed_texts(list(args.text))
            names = list(args.text)
        for name, e in zip(names, emb):
            say(f"{name}: {e.shape[0]}-d embedding, first values {np.round(e[:4], 4).tolist()}")
        rows = emb.astype(float).tolist()
        return {"embedding": rows[0]} if len(rows) == 1 else {"embeddings": rows}
    if args.command == "zero-shot":
        probs = model.zero_shot([args.image], list(args.labels))[0]
        for label, p in sorted(zip(args.labels, probs), key=lambda t: -t[1]):
            say(f"{p:7.2%}  {label}")
        return {"labels": list(args.labels), "probs": probs.astype(float).tolist()}
    # probe
    from medsiglip.probe import fit_linear_probe

    paths, labels = _image_folder(args.data)
    if args.test_data is not None:
        test_paths, test_labels = _image_folder(args.test_data)
        train_x = _embed_folder(model, paths, args.json)
        test_x = _embed_folder(model, test_paths, args.json)
        train_y = labels
    else:
        if not 0.0 < args.test_fraction < 1.0:
            raise ValueError("--test-fraction must be between 0 and 1")
        order = np.random.default_rng(args.seed).permutation(len(paths))
        n_test = max(1, round(len(paths) * args.test_fraction))
        x = _embed_folder(model, paths, args.json)
        test_idx, train_idx = order[:n_test], order[n_test:]
        train_x, test_x = x[train_idx], x[test_idx]
        train_y = [labels[i] for i in train_idx]
        test_labels = [labels[i] for i in test_idx]
    probe = fit_linear_probe(train_x, train_y, l2=args.l2)
    unseen = sorted(set(test_labels) - set(probe.classes))
    if unseen:
        raise ValueError(f"test class {unseen[0]!r} has no training images")
    metrics = probe.evaluate(test_x, test_labels)
    say(f"classes {list(probe.classes)}; train {len(train_y)}, test {len(test_labels)}")
    say(f"accuracy {metrics['accuracy']:.3f}  AUC {metrics['auc']:.3f}")
    return {**metrics, "classes": list(probe.classes), "n_train": len(train_y),
            "n_test": len(test_labels)}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from medsiglip.weights import CheckpointError

    try:
        result = _convert(args) if args.command == "convert" else _run(args)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError, OSError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"medsiglip: error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
