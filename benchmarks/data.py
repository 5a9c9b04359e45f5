"""medgemma-data throughput against the plain library loop, same machine, same inputs.

    python benchmarks/data.py [--repeats 20] [--slide-size 8192]

1. Radiograph DICOM -> model-ready RGB image per second: ``medgemma_data.load`` (detection,
   decoder check, modality LUT, VOI, stretch, MONOCHROME1 inversion, Sample validation)
   against a plain pydicom loop (dcmread, pixel_array, min-max stretch, inversion, gray->RGB)
   on the real SIIM chest radiograph (JPEG baseline, 1024 x 1024) of the repository's fixtures/ folder.
2. WSI patches per second: ``medgemma_data.load`` on a generated tiled pyramidal TIFF
   (tissue over most of it; includes the thumbnail, Otsu mask and compositing) against a plain
   openslide loop reading the same 896 x 896 regions and converting them to RGB.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MEDGEMMA_FIXTURES", ROOT / "fixtures"))


def _best_rate(fn, count: int, repeats: int) -> float:
    """Items per second of the fastest of ``repeats`` timed calls (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return count / best


def bench_radiograph(repeats: int) -> dict[str, object]:
    import pydicom

    import medgemma_data as md

    path = FIXTURES / "cxr" / "monochrome1_sample.dcm"
    if not path.is_file():
        sys.exit(f"{path} not found: it ships in the repository's fixtures/ folder "
                 "(or set MEDGEMMA_FIXTURES to a copy)")
    n = 5

    def ours() -> None:
        for _ in range(n):
            md.load(path)

    def plain() -> None:
        for _ in range(n):
            ds = pydicom.dcmread(path)
            a = ds.pixel_array.astype(np.float64)
            g = np.rint((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                g = 255 - g
            np.repeat(g[:, :, None], 3, axis=2)

    # same output, so the comparison is like for like
    ds = pydicom.dcmread(path)
    a = ds.pixel_array.astype(np.float64)
    ref = 255 - np.rint((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
    assert np.array_equal(md.load(path)[0].images[0][..., 0], ref)
    r_ours, r_plain = _best_rate(ours, n, repeats), _best_rate(plain, n, repeats)
    return {"input": f"{path.name} (JPEG baseline, 1024x1024, MONOCHROME1)",
            "medgemma_data_images_per_s": round(r_ours, 2),
            "plain_pydicom_images_per_s": round(r_plain, 2),
            "ratio": round(r_ours / r_plain, 3)}


def _write_slide(path: Path, side: int) -> None:
    import tifffile

    yy, xx = np.ogrid[0:side, 0:side]
    c, r = side / 2, side * 0.45
    tissue = (xx - c) ** 2 + (yy - c) ** 2 <= r * r  # [side, side] bool
    texture = np.random.default_rng(0).integers(100, 180, (256, 256, 3), dtype=np.uint8)
    img = np.tile(texture, (side // 256 + 1, side // 256 + 1, 1))[:side, :side]
    img[~tissue] = 255
    res = (1e4 / 1.0, 1e4 / 1.0)  # 1.0 micron per pixel: level 0 is 10X
    with tifffile.TiffWriter(path) as tif:
        opts = dict(tile=(256, 256), photometric="rgb", compression="zlib",
                    resolution=res, resolutionunit="CENTIMETER")
        tif.write(img, subifds=0, **opts)
        level = img
        while max(level.shape[:2]) > 1024:
            level = np.ascontiguousarray(level[::2, ::2])
            tif.write(level, subfiletype=1, **opts)


def bench_wsi(repeats: int, side: int) -> dict[str, object]:
    import openslide

    import medgemma_data as md

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tiff"
        _write_slide(path, side)
        [sample] = md.load(path)
        coords = [loc.patch[:2] for loc in sample.provenance.locations]
        n = len(coords)

        def ours() -> None:
            md.load(path)

        def plain() -> None:
            slide = openslide.OpenSlide(str(path))
            for x, y in coords:
                np.asarray(slide.read_region((x, y), 0, (896, 896)).convert("RGB"))
            slide.close()

        r_ours, r_plain = _best_rate(ours, n, repeats), _best_rate(plain, n, repeats)
    return {"input": f"generated tiled pyramidal TIFF {side}x{side}, zlib tiles, 1.0 mpp",
            "patches": n,
            "medgemma_data_patches_per_s": round(r_ours, 2),
            "plain_openslide_patches_per_s": round(r_plain, 2),
            "ratio": round(r_ours / r_plain, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slide-size", type=int, default=6144)
    args = p.parse_args()
    out = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "radiograph": bench_radiograph(args.repeats),
        "wsi": bench_wsi(args.repeats, args.slide_size),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
