"""The ``medgemma-data`` command: ``plugins``, ``convert`` and ``inspect``.

User mistakes print one line on stderr and exit with status 2; ``convert`` writes into a
temporary folder next to ``--out`` and renames it into place only when everything succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import api
from .errors import MedgemmaDataError
from .manager import ENV_ALLOW, ENV_DENY, ENV_TRACE, get_registry
from .sample import ImagePart, Sample

PROG = "medgemma-data"


class UsageError(MedgemmaDataError):
    """A command-line mistake."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


def _options(pairs: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {pair!r} must look like NAME=VALUE")
        out[key.strip()] = value
    return out


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=(
        "Turn medical files (DICOM radiographs, CT/MR series, whole-slide images, "
        "photographs, FHIR bundles, QA sets) into MedGemma-ready samples. Modalities come "
        "from plugins (entry-point group medgemma.modalities)."),
        epilog=f"Environment: {ENV_ALLOW} (allow-list of plugins), {ENV_DENY} (deny-list), "
               f"{ENV_TRACE}=1 (trace hook calls and detection on stderr).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sp = sub.add_parser("plugins", help="list modalities: name, version, distribution, files")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    for name, text in (("convert", "write model-ready PNG images and sample.json"),
                       ("inspect", "say what convert would do, without writing")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("path", help="a file or folder (DICOM series folder, slide, JSON...)")
        if name == "convert":
            c.add_argument("--out", required=True, help="output folder (new or empty)")
        c.add_argument("--modality", help="modality name (default: detected)")
        c.add_argument("--option", action="append", metavar="NAME=VALUE",
                       help="a plugin option, repeatable (medgemma-data plugins lists each "
                            "plugin's options)")
        c.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _plugins(args: argparse.Namespace) -> int:
    infos = api.list_plugins()
    problems = api.plugin_problems()
    if args.json:
        print(json.dumps({
            "plugins": [{"name": i.name, "version": i.version, "distribution": i.distribution,
                         "plugin": i.plugin, "claims": list(i.claims),
                         "description": i.description,
                         "options": {o.name: {"default": o.default, "help": o.help}
                                     for o in i.options}} for i in infos],
            "problems": [{"plugin": p.plugin, "distribution": p.distribution,
                          "message": p.message} for p in problems]}, indent=2))
        return 0
    for i in infos:
        print(f"{i.name}  ({i.distribution} {i.version})")
        print(f"    {i.description}")
        for claim in i.claims:
            print(f"    claims: {claim}")
        for o in i.options:
            print(f"    option {o.name}={o.default}: {o.help}")
    for p in problems:
        print(f"BROKEN {p.plugin} ({p.distribution}): {p.message}")
    return 0


def _sample_json(sample: Sample, image_names: list[str]) -> dict[str, object]:
    parts, k = [], 0
    for part in sample.parts:
        if isinstance(part, ImagePart):
            parts.append({"image": image_names[k]})
            k += 1
        else:
            parts.append({"text": part.text})
    out: dict[str, object] = {"modality": sample.modality, "parts": parts,
                              "metadata": dict(sample.metadata)}
    if sample.label is not None:
        out["label"] = sample.label
    return out


def _write(samples: list[Sample], folder: Path, progress: bool) -> int:
    from PIL import Image

    total = sum(len(s.images) for s in samples)
    done = 0
    for n, sample in enumerate(samples, start=1):
        target = folder if len(samples) == 1 else folder / f"{n:04d}"
        names = []
        for k, image in enumerate(sample.images, start=1):
            rel = f"images/{k:04d}.png"
            (target / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target / rel)
            names.append(rel)
            done += 1
            if progress:
                print(f"\rwriting images {done}/{total}", end="", file=sys.stderr, flush=True)
        target.mkdir(parents=True, exist_ok=True)
        (target / "sample.json").write_text(
            json.dumps(_sample_json(sample, names), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8")
    if progress and total:
        print(file=sys.stderr)
    return total


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder; choose a new folder")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: parent folder {out.parent} does not exist; create it")


def _convert(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser().absolute()
    _check_out(out)
    options = _options(args.option)
    modality = args.modality or api.detect(args.path)
    samples = api.load(args.path, modality=modality, options=options)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        n_images = _write(samples, tmp, progress=sys.stderr.isatty() and not args.json)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {"out": str(out), "modality": modality, "samples": len(samples),
               "images": n_images}
    print(json.dumps(summary) if args.json else
          f"wrote {len(samples)} sample(s), {n_images} image(s) of modality {modality} to {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    options = _options(args.option)
    scores = api.detection_scores(args.path)
    modality = args.modality or api.detect(args.path)
    spec, info = get_registry().get(modality)
    resolved = spec.resolve_options(options)
    samples = api.load(args.path, modality=modality, options=options)
    shapes = sorted({f"{im.shape[1]}x{im.shape[0]}" for s in samples for im in s.images})
    report = {
        "path": str(args.path), "modality": modality,
        "plugin": {"name": info.plugin, "distribution": info.distribution,
                   "version": info.version},
        "detection": {n: s for n, s in scores if s > 0},
        "options": resolved, "samples": len(samples),
        "images": sum(len(s.images) for s in samples),
        "texts": sum(len(s.texts) for s in samples),
        "image_sizes": shapes, "labels": sum(s.label is not None for s in samples),
        "metadata": dict(samples[0].metadata),
        "writes": ("sample.json + images/NNNN.png" if len(samples) == 1 else
                   f"{len(samples)} subfolders NNNN/ each with sample.json + images/"),
    }
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"{report['path']}: modality {modality} (plugin {info.plugin}, "
          f"{info.distribution} {info.version})")
    print(f"  detection scores: {report['detection'] or 'none (modality given)'}")
    print(f"  options: {resolved}")
    print(f"  convert would write {report['samples']} sample(s) with {report['images']} "
          f"image(s) ({', '.join(shapes) or 'none'}) and {report['texts']} text part(s): "
          f"{report['writes']}")
    print(f"  metadata of the first sample: {report['metadata']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    try:
        args = _parser().parse_args(argv)
        if args.command is None:
            _parser().print_help()
            return 2
        handler = {"plugins": _plugins, "convert": _convert, "inspect": _inspect}[args.command]
        return handler(args)
    except MedgemmaDataError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"{PROG}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
