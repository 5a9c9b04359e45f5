"""Limits that refuse decompression and allocation bombs before anything large is allocated.

A small file can claim a huge image: a PNG header of 100000 x 100000 pixels, a DICOM whose
Rows x Columns x NumberOfFrames asks a decoder for terabytes. Readers compare what the header
claims with :func:`max_pixels` before decoding and refuse with an
:class:`~medgemma_data.errors.InvalidInputError` that names the limit and how to raise it.

``max_pixels``: the most pixels one image file, one DICOM object (Rows x Columns x frames) or
the slices read from one series may decode to. Default :data:`DEFAULT_MAX_PIXELS`
(178,956,970: Pillow's own decompression-bomb threshold, e.g. 13377 x 13377, or 682 frames of
512 x 512). Raise it for real giant images or series with the option ``max_pixels`` of the
image plugins (``--option max_pixels=400000000``), or for the whole process with the
environment variable ``MEDGEMMA_DATA_MAX_PIXELS``. A limit above Pillow's threshold also
raises Pillow's (``PIL.Image.MAX_IMAGE_PIXELS``), which would otherwise refuse first.
Whole-slide images are read in tiles and patches, never whole: for them the limit applies to
the smallest pyramid level, which the tissue mask streams tile by tile (a time bomb otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import InvalidInputError, OptionError
from .spec import Option

ENV_MAX_PIXELS = "MEDGEMMA_DATA_MAX_PIXELS"
#: Pillow's error threshold, ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485).
DEFAULT_MAX_PIXELS = 178_956_970

#: The option every image-decoding plugin declares.
MAX_PIXELS_OPTION = Option(
    "max_pixels", "", f"most pixels decoded from one file or series (empty: ${ENV_MAX_PIXELS}, "
    f"else {DEFAULT_MAX_PIXELS}); raise it for giant images")


def _parse(raw: str, where: str) -> int:
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise OptionError(f"{where}={raw!r} must be a whole number of pixels") from None
    if value < 1:
        raise OptionError(f"{where}={raw!r} must be at least 1")
    return value


def max_pixels(options: Mapping[str, str] | None = None) -> int:
    """The limit in force: the ``max_pixels`` option when given and not empty, else
    ``$MEDGEMMA_DATA_MAX_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`."""
    raw = (options or {}).get("max_pixels", "")
    if raw.strip():
        return _parse(raw, "option max_pixels")
    env = os.environ.get(ENV_MAX_PIXELS, "")
    if env.strip():
        return _parse(env, ENV_MAX_PIXELS)
    return DEFAULT_MAX_PIXELS


def check_pixels(path: object, pixels: int, what: str, limit: int) -> None:
    """Refuse ``pixels`` (what a header claims) over ``limit``, naming the file and the fix."""
    if pixels > limit:
        raise InvalidInputError(
            f"{path}: {what} claims {pixels:,} pixels, over the limit of {limit:,} (a corrupt "
            f"or hostile header, or a truly giant image); if the file is real, raise the "
            f"limit with --option max_pixels=N or {ENV_MAX_PIXELS}=N")


def allow_in_pillow(limit: int) -> None:
    """Make Pillow's own bomb check (which runs inside ``Image.open``) no stricter than
    ``limit``: raise ``PIL.Image.MAX_IMAGE_PIXELS`` when ``limit`` is above its threshold.
    Never lowers it, never turns it on when a user turned it off (``None``)."""
    from PIL import Image

    current = Image.MAX_IMAGE_PIXELS
    if current is not None and limit > 2 * current:
        Image.MAX_IMAGE_PIXELS = limit // 2 + 1
