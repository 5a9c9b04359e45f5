"""medgemma-data and the demo's zip unpacking: every built-in plugin, detection, uploads.

The documented errors of medgemma-data for a bad file are :class:`InvalidInputError`,
:class:`DecoderMissingError` (a transfer syntax with no decoder) and, when the modality is
detected, :class:`DetectionError`. :class:`PluginFailedError` means "a plugin bug": for the
built-in plugins it is a finding. A valid result is a non-empty list of :class:`Sample` whose
images are ``uint8 [H, W, 3]``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from . import seeds as S
from .engine import ContractViolation, Target

DICOM_PACKAGES = ("medgemma_data", "pydicom")
IMAGE_PACKAGES = ("medgemma_data", "PIL")


def data_errors() -> tuple[type[BaseException], ...]:
    from medgemma_data import DecoderMissingError, DetectionError, InvalidInputError

    return (InvalidInputError, DecoderMissingError, DetectionError)


def check_samples(samples: object, modality: str | None = None) -> None:
    """The result contract: a non-empty list of Sample, images uint8 [H, W, 3], text str."""
    import numpy as np

    from medgemma_data import ImagePart, Sample, TextPart

    if not isinstance(samples, list) or not samples:
        raise ContractViolation(f"load returned {type(samples).__name__} {samples!r:.80}")
    for s in samples:
        if not isinstance(s, Sample):
            raise ContractViolation(f"load returned a {type(s).__name__}, not a Sample")
        if modality is not None and s.modality != modality:
            raise ContractViolation(f"asked for {modality}, got a {s.modality} sample")
        for part in s.parts:
            if isinstance(part, ImagePart):
                im = part.image
                if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3
                        and im.shape[2] == 3 and im.shape[0] > 0 and im.shape[1] > 0):
                    raise ContractViolation(f"an image of {getattr(im, 'dtype', '?')} "
                                            f"{getattr(im, 'shape', '?')}, not uint8 [H, W, 3]")
            elif not (isinstance(part, TextPart) and isinstance(part.text, str)):
                raise ContractViolation(f"a part of type {type(part).__name__}")


def _load(path: Path, modality: str | None, options: dict[str, str] | None = None) -> None:
    import medgemma_data

    check_samples(medgemma_data.load(path, modality=modality, options=options), modality)


# ---- one target per plugin -----------------------------------------------------------------

RADIOGRAPH_SUFFIXES = (".dcm", ".png", ".jpg", ".bmp", ".webp")


def _radiograph_seeds(_: Path) -> list[bytes]:
    out = [S.tag(0, d) for d in S.generated_dicoms()]
    out += [S.tag(0, S.fixture("cxr", n)) for n in ("siim_pneumothorax_sample.dcm",
                                                    "monochrome1_sample.dcm")]
    out += [S.tag(0, d) for d in S.pydicom_files()]
    out += [S.tag(RADIOGRAPH_SUFFIXES.index(sfx), d) for sfx, d in S.images()]
    return out


def _radiograph(data: bytes, folder: Path) -> None:
    suffix, body = S.untag(data, RADIOGRAPH_SUFFIXES)
    path = folder / f"input{suffix}"
    path.write_bytes(body)
    _load(path, "radiograph", {"max_frames": "4"})


def _volume_target(modality: str, dicom_modality: str) -> Target:
    """A fuzzed DICOM alone (first byte odd) or in a series folder beside two good slices."""

    def seeds(_: Path) -> list[bytes]:
        own = [d for d in S.generated_dicoms()[:2]]
        own += S.series_slices(dicom_modality, 3)[2:]
        own += S.pydicom_files(("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm",
                                "rtdose_1frame.dcm", "rtdose.dcm", "rtdose_rle_1frame.dcm",
                                "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"))
        return [S.tag(k, d) for d in own for k in (0, 1)]

    @functools.cache
    def good() -> list[bytes]:
        return S.series_slices(dicom_modality, 2)

    def run(data: bytes, folder: Path) -> None:
        alone = bool(data[:1]) and data[0] % 2 == 1
        body = data[1:]
        if alone:
            path = folder / "slice.dcm"
            path.write_bytes(body)
            _load(path, modality, {"max_slices": "8"})
            return
        series = folder / "series"
        series.mkdir()
        for i, g in enumerate(good()):
            (series / f"good{i}.dcm").write_bytes(g)
        (series / "fuzzed.dcm").write_bytes(body)
        _load(series, modality, {"max_slices": "8"})

    # pydicom's own code is instrumented in data.auto and data.radiograph; here only the
    # series code (instrumenting pydicom too doubles the time per input)
    return Target(f"data.{modality}", "medgemma-data", run, data_errors, seeds,
                  ("medgemma_data",), f"{modality} plugin: one slice, or a series folder")


WSI_SUFFIXES = (".svs", ".tiff", ".dcm")


def _wsi_seeds(_: Path) -> list[bytes]:
    return [S.tag(0, S.fixture("wsi", "small.svs")), S.tag(1, S.fixture("wsi", "boxes.tiff")),
            S.tag(2, S.fixture("wsi", "boxes_0.dcm")), S.tag(1, S.fixture("wsi", "unopenable.tiff")),
            S.tag(0, S.fixture("wsi", "unreadable.svs"))]


def _wsi(data: bytes, folder: Path) -> None:
    suffix, body = S.untag(data, WSI_SUFFIXES)
    path = folder / f"slide{suffix}"
    path.write_bytes(body)
    _load(path, "wsi", {"patch_size": "16", "max_patches": "4", "min_tissue": "0"})


PHOTO_SUFFIXES = (".jpg", ".png", ".bmp", ".webp")


def _photo_seeds(_: Path) -> list[bytes]:
    return [S.tag(PHOTO_SUFFIXES.index(sfx), d) for sfx, d in S.images()]


def _photo(data: bytes, folder: Path) -> None:
    suffix, body = S.untag(data, PHOTO_SUFFIXES)
    path = folder / f"photo{suffix}"
    path.write_bytes(body)
    pad = "true" if len(body) % 2 else "false"
    _load(path, "derm" if len(body) % 3 else "fundus", {"pad_square": pad})


def _ehr(data: bytes, folder: Path) -> None:
    path = folder / "bundle.json"
    path.write_bytes(data)
    _load(path, "ehr")


QA_SUFFIXES = (".jsonl", ".json")


def _qa_seeds(_: Path) -> list[bytes]:
    sets = ("medqa", "medmcqa", "pubmedqa", "mmlu", "afrimedqa")
    return [S.tag(0, S.qa_lines(f"{s}_sampled_50.jsonl")) for s in sets] + \
        [S.tag(1, S.vqa_json())]


def _qa(data: bytes, folder: Path) -> None:
    suffix, body = S.untag(data, QA_SUFFIXES)
    path = folder / f"questions{suffix}"
    path.write_bytes(body)
    if suffix == ".json":
        images = folder / "images"
        images.mkdir()
        (images / "a.png").write_bytes(_small_png()[0])
        (images / "b.png").write_bytes(_small_png()[1])
    _load(path, "qa")


@functools.cache
def _small_png() -> tuple[bytes, bytes]:
    return S.image("L", (8, 8)), S.image("RGB", (8, 6))


# ---- detection, and load with the modality detected ----------------------------------------

AUTO_SUFFIXES = (".dcm", ".png", ".jpg", ".json", ".jsonl", ".svs", ".tiff", ".webp", ".bmp", "")


def _auto_seeds(folder: Path) -> list[bytes]:
    picks = [_radiograph_seeds(folder)[i] for i in (0, 1, 2, 4, 5, 6)]
    out = [S.tag(AUTO_SUFFIXES.index(RADIOGRAPH_SUFFIXES[p[0] % 5]), p[1:]) for p in picks]
    out += [S.tag(AUTO_SUFFIXES.index(sfx), d) for sfx, d in S.images()]
    out += [S.tag(3, S.fhir_bundle()), S.tag(4, S.qa_lines("medqa_sampled_50.jsonl")),
            S.tag(3, S.vqa_json()), S.tag(5, S.fixture("wsi", "small.svs")),
            S.tag(6, S.fixture("wsi", "boxes.tiff")), S.tag(0, S.fixture("wsi", "boxes_0.dcm")),
            S.tag(9, S.generated_dicoms()[0])]
    return out


def _auto(data: bytes, folder: Path) -> None:
    import medgemma_data

    suffix, body = S.untag(data, AUTO_SUFFIXES)
    path = folder / f"input{suffix}"
    path.write_bytes(body)
    try:
        scores = medgemma_data.detection_scores(path)
    except medgemma_data.InvalidInputError:
        if body:
            raise ContractViolation("detection_scores refused a non-empty file") from None
        return
    if not all(isinstance(n, str) and isinstance(s, int) and 0 <= s <= 100 for n, s in scores):
        raise ContractViolation(f"detection_scores gave {scores!r:.120}")
    _load(path, None, None)


# ---- the demo's uploads: zips of series folders --------------------------------------------

ZIP_LIMIT = 1 << 20  # bytes a fuzzed zip may unpack to (the demo's max_bytes * UNZIP_FACTOR)


def _zip_seeds(_: Path) -> list[bytes]:
    import zipfile

    ct = {f"series/s{i}.dcm": d for i, d in enumerate(S.series_slices("CT", 3))}
    mr = {f"mr{i}.dcm": d for i, d in enumerate(S.series_slices("MR", 2))}
    png = {"photo.png": S.images()[0][1]}
    return [S.zip_of(ct), S.zip_of(mr, zipfile.ZIP_STORED), S.zip_of(png),
            S.zip_of({**ct, "__MACOSX/._s0.dcm": b"x", "notes.txt": b"hello"})]


def demo_errors() -> tuple[type[BaseException], ...]:
    from medgemma_demo.uploads import UploadError

    return (UploadError,)


def _demo_zip(data: bytes, folder: Path) -> None:
    from medgemma_demo.uploads import UNZIP_FACTOR, load_uploads, unpack_zip

    upload = folder / "upload.zip"
    upload.write_bytes(data)
    dest = folder / "unpacked"
    dest.mkdir()
    target = unpack_zip(upload, dest, max_bytes=ZIP_LIMIT // UNZIP_FACTOR)
    target = Path(target).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise ContractViolation(f"unpack_zip returned {target}, outside its folder")
    written = [p for p in folder.rglob("*") if p.is_file()]
    outside = [p for p in written if p != upload and not p.resolve().is_relative_to(dest)]
    if outside:
        raise ContractViolation(f"unpack_zip wrote outside its folder: {outside[0]}")
    total = sum(p.stat().st_size for p in written if p != upload)
    if total > ZIP_LIMIT:
        raise ContractViolation(f"unpacked {total} bytes, over the {ZIP_LIMIT} limit")
    # the whole road an upload takes: the zip again, through load_uploads and the plugins
    loaded = load_uploads([upload], max_bytes=ZIP_LIMIT // UNZIP_FACTOR)
    for s in loaded.samples:
        check_samples([s])


TARGETS = [
    Target("data.auto", "medgemma-data", _auto, data_errors, _auto_seeds,
           DICOM_PACKAGES + ("PIL", "openslide", "fhir", "json"),
           "detection_scores, detect and load with the modality detected"),
    Target("data.radiograph", "medgemma-data", _radiograph, data_errors, _radiograph_seeds,
           DICOM_PACKAGES + ("PIL",), "radiograph plugin: DICOM (every transfer syntax), images"),
    _volume_target("ct", "CT"),
    _volume_target("mri", "MR"),
    Target("data.wsi", "medgemma-data", _wsi, data_errors, _wsi_seeds,
           ("medgemma_data", "openslide", "PIL"), "wsi plugin: SVS, tiled TIFF, DICOM WSI"),
    Target("data.photo", "medgemma-data", _photo, data_errors, _photo_seeds, IMAGE_PACKAGES,
           "derm and fundus plugins: colour photographs"),
    Target("data.ehr", "medgemma-data", _ehr, data_errors, lambda _: [S.fhir_bundle()],
           ("medgemma_data", "fhir", "json"), "ehr plugin: FHIR R4 bundles"),
    Target("data.qa", "medgemma-data", _qa, data_errors, _qa_seeds, ("medgemma_data", "json"),
           "qa plugin: MCQ JSON lines, VQA JSON with images"),
    Target("demo.zip", "medgemma-demo", _demo_zip, demo_errors, _zip_seeds,
           ("medgemma_demo", "zipfile", "medgemma_data"),
           "the demo's upload road for zips: unpack_zip, then load_uploads"),
]
