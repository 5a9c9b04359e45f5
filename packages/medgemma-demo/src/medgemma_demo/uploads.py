"""Uploaded files -> model-ready samples, through the medgemma-data plugins.

An upload is a PNG/JPEG, a DICOM file, a slide, a FHIR bundle, a QA file, or a ``.zip`` of a
series folder (CT, MRI). Zips are unpacked into a private temporary folder with limits on size,
member count and paths (no zip bombs, no writes outside it). Every failure is an
:class:`UploadError` with a one-line message for the page; nothing here logs file names or
file contents (file names of medical images often carry patient identifiers).
"""

from __future__ import annotations

import logging
import lzma
import re
import shutil
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

import medgemma_data
from medgemma_data import ImagePart, Sample, TextPart

log = logging.getLogger("medgemma_demo")

MB = 1024 * 1024
#: Unpacked size allowed per zip, as a multiple of the upload limit.
UNZIP_FACTOR = 4
MAX_ZIP_MEMBERS = 5000
#: Longest side of gallery thumbnails, pixels (the model gets the full image).
GALLERY_SIDE = 768


class UploadError(ValueError):
    """A bad upload: the message is one line, safe to show in the page."""


@dataclass
class LoadedUpload:
    """Samples from one or more uploads, with what the page shows.

    ``samples``: as returned by the plugins; ``gallery``: ``(uint8 [h, w, 3], caption)`` per
    image, thumbnails of at most :data:`GALLERY_SIDE`; ``summary``: one markdown line per file.
    """

    samples: list[Sample] = field(default_factory=list)
    gallery: list[tuple[np.ndarray, str]] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(len(s.images) for s in self.samples)


def _safe_members(zf: zipfile.ZipFile, limit_bytes: int) -> list[zipfile.ZipInfo]:
    members = [m for m in zf.infolist() if not m.is_dir()]
    if len(members) > MAX_ZIP_MEMBERS:
        raise UploadError(f"the zip holds {len(members)} files (at most {MAX_ZIP_MEMBERS}); "
                          "zip one series at a time")
    total = sum(m.file_size for m in members)
    if total > limit_bytes:
        raise UploadError(f"the zip unpacks to {total / MB:.0f} MB (at most "
                          f"{limit_bytes / MB:.0f} MB); zip fewer slices or start the demo "
                          "with a larger --max-upload-mb")
    for m in members:
        parts = PurePosixPath(m.filename.replace("\\", "/")).parts
        if m.filename.startswith(("/", "\\")) or ".." in parts or ":" in m.filename:
            raise UploadError("the zip contains a path outside its folder; re-create it from "
                              "the series folder")
    # Skip macOS metadata and hidden files; they are never images.
    return [m for m in members
            if not any(p.startswith((".", "__MACOSX")) for p in PurePosixPath(m.filename).parts)]


#: What :mod:`zipfile` raises on a damaged or crafted archive (besides ``BadZipFile``): bad
#: deflate/bzip2/lzma streams, offsets past the end, malformed extra fields.
_ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError,
               IndexError, struct.error, OverflowError)


def unpack_zip(path: Path, dest: Path, *, max_bytes: int) -> Path:
    """Unpack ``path`` into ``dest``; the folder to load (the single top folder when there is one).

    The members may claim at most ``max_bytes * UNZIP_FACTOR`` bytes together, checked before
    anything is written; a member that inflates past what it claims is cut there by
    :mod:`zipfile` and fails its CRC check, so nothing unpacks past the limit.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            members = _safe_members(zf, max_bytes * UNZIP_FACTOR)
            if not members:
                raise UploadError("the zip is empty; zip the folder of DICOM slices")
            for m in members:
                zf.extract(m, dest)
    except UploadError:  # a ValueError: keep its own message
        raise
    except NotImplementedError:
        raise UploadError("the .zip file uses a compression method the demo cannot unpack; "
                          "re-create it with plain zip (deflate)") from None
    except RuntimeError:  # zipfile: "File ... is encrypted, password required for extraction"
        raise UploadError("the .zip file is encrypted; re-create it without a password") \
            from None
    except _ZIP_DAMAGE:
        raise UploadError("the .zip file is damaged or not a zip; re-create it") from None
    entries = [p for p in dest.iterdir()]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def _display_name(path: Path) -> str:
    return path.name if len(path.name) <= 60 else path.name[:57] + "..."


#: Where a message sends the user for the modality and the reading options: the page's
#: controls, or the ``/chat`` endpoint's arguments.
WORDS = {
    "page": {"modality": "'Read as' modality", "options": "'Read options'"},
    "api": {"modality": "modality argument", "options": "options argument (key=value lines)"},
}


def _clean_message(message: str, paths: Sequence[Path], surface: str = "page") -> str:
    """A plugin's message for the page (or the API): bare file names, and the words of the
    control (or argument) that sets the modality or an option."""
    for p in sorted(paths, key=lambda q: -len(str(q))):
        message = message.replace(str(p), p.name)
    words = WORDS[surface]
    # the plugins speak of the command line; in the page the choice is the "Read as" box
    message = message.replace("--modality", words["modality"])
    message = re.sub(r"\b(lower|raise|set) (\w+)\b(?! \()",
                     lambda m: f"{m.group(1)} {m.group(2)} (in the {words['options']})"
                     if m.group(2) in _option_names() else m.group(0), message)
    return message.splitlines()[0] if message else "could not read the file"


def _option_names() -> set[str]:
    return {o.name for p in medgemma_data.list_plugins() for o in p.options}


def parse_options(text: str | None) -> dict[str, str]:
    """``key=value`` per line (or comma-separated) -> a dict; :class:`UploadError` naming the
    bad entry otherwise."""
    out: dict[str, str] = {}
    for raw in re.split(r"[\n,]", text or ""):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UploadError(f"reading option {item!r} is not key=value, e.g. min_tissue=0.1")
        out[key.strip()] = value.strip()
    return out


def options_markdown(modality: str | None = None) -> str:
    """The reading options of ``modality`` (None or auto: every modality), as markdown."""
    lines = []
    for p in medgemma_data.list_plugins():
        if modality not in (None, "", "auto") and p.name != modality:
            continue
        opts = [o for o in p.options if o.name != "max_pixels"]
        if opts:
            lines.append(f"- **{p.name}**: " + "; ".join(
                f"`{o.name}={o.default}` {o.help}" for o in opts))
    return "\n".join(lines) or "No reading options for this modality."


def thumbnail(image: np.ndarray, side: int = GALLERY_SIDE) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> the same image with its longer side at most ``side``."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def captions(sample: Sample) -> list[str]:
    """One caption per image of ``sample``: the short text that follows it (``SLICE 3``), the
    patch position for slides, else the modality and index. Never a file name."""
    out: list[str] = []
    parts = list(sample.parts)
    locations = sample.provenance.locations
    for i, part in enumerate(parts):
        if not isinstance(part, ImagePart):
            continue
        k = len(out)
        caption = f"{sample.modality} {k + 1}"
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if isinstance(nxt, TextPart) and 0 < len(nxt.text.strip()) <= 40:
            caption = f"{sample.modality}: {nxt.text.strip()}"
        elif k < len(locations) and locations[k].patch is not None:
            x, y, _, _ = locations[k].patch
            caption = f"{sample.modality} patch at ({x}, {y})"
        out.append(caption)
    return out


def load_uploads(paths: Sequence[str | Path], *, max_bytes: int, modality: str | None = None,
                 max_samples: int | None = None, options: dict[str, str] | None = None,
                 surface: str = "page") -> LoadedUpload:
    """Run each uploaded file through the data plugins (detected modality unless given).

    ``max_samples``: keep at most this many samples per file (a QA file holds many questions,
    a folder several series); the summary says how many were left out. ``options``: the
    plugins' reading options (``min_tissue``, ``windows``, ...); ``surface``: "page" or "api",
    the words messages use for the controls.
    """
    words = WORDS[surface]
    result = LoadedUpload()
    for raw in paths:
        path = Path(raw)
        start = time.perf_counter()
        if not path.is_file():
            raise UploadError(f"{_display_name(path)}: the upload did not arrive; upload it again")
        size = path.stat().st_size
        if size > max_bytes:
            raise UploadError(f"{_display_name(path)} is {size / MB:.0f} MB, over the "
                              f"{max_bytes / MB:.0f} MB limit; start the demo with a larger "
                              "--max-upload-mb")
        workdir = Path(tempfile.mkdtemp(prefix="medgemma-demo-"))
        try:
            target = path
            if path.suffix.lower() == ".zip":
                target = unpack_zip(path, workdir, max_bytes=max_bytes)
            try:
                samples = medgemma_data.load(target, modality=modality, options=options or None)
            except medgemma_data.DetectionError:
                raise UploadError(f"{_display_name(path)}: no data plugin recognises this file; "
                                  f"give its modality in the {words['modality']}, or install a "
                                  "plugin that reads it (see the Plugins tab)") from None
            except medgemma_data.MedgemmaDataError as exc:
                raise UploadError(_clean_message(str(exc), [target, path, workdir],
                                                 surface)) from None
            except Exception as exc:  # a reader crashed: still one line, no stack trace
                raise UploadError(f"{_display_name(path)}: could not be read "
                                  f"({type(exc).__name__}); is it a supported file?") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        found = len(samples)
        if max_samples is not None:
            samples = samples[:max_samples]
        n_images = 0
        for sample in samples:
            for image, caption in zip(sample.images, captions(sample)):
                result.gallery.append((thumbnail(image), caption))
                n_images += 1
        result.samples.extend(samples)
        kinds = sorted({s.modality for s in samples})
        kept = f"first {len(samples)} of {found} samples" if found > len(samples) else \
            f"{found} sample(s)"
        result.summary.append(f"`{_display_name(path)}`: {', '.join(kinds)}, {kept}, "
                              f"{n_images} image(s)")
        # Counts only: no names, no metadata values.
        log.info("upload: %s, %d samples, %d images, %.2f s", ",".join(kinds), len(samples),
                 n_images, time.perf_counter() - start)
    return result
