"""The built-in modality plugins. Each module is a pluggy plugin registered by the host
exactly like a third-party one; heavy readers are imported inside ``detect``/``load``."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
PHOTO_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
