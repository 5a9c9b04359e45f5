"""The built-in modality plugins. Each module is a pluggy plugin registered by the host
exactly like a third-party one; heavy readers are imported inside ``detect``/``load``."""

#: Single-image files the radiograph, derm and fundus plugins read with Pillow. TIFF is left
#: to the wsi plugin: a pyramidal slide must never be decoded whole by Pillow.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
#: Detectors do not decode images larger than this (pixels); they judge by the header alone.
MAX_DETECT_PIXELS = 64_000_000
