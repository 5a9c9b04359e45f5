"""medgemma-data: modality plugins that turn medical files into MedGemma-ready samples.

    >>> import medgemma_data
    >>> samples = medgemma_data.load("chest.dcm")          # modality detected
    >>> samples[0].parts                                    # (ImagePart(uint8 [H, W, 3]),)

Public API: :func:`load`, :func:`detect`, :func:`list_plugins`, :func:`plugin_problems`,
:func:`to_messages` (samples -> chat messages, also ``Sample.to_messages``), the records
:class:`Sample`, :class:`TextPart`, :class:`ImagePart`, :class:`Provenance`,
:class:`Location`, and for plugin authors :class:`ModalitySpec`, :class:`Option` and
:data:`hookimpl`.
"""

from __future__ import annotations

from .api import detect, detection_scores, list_plugins, load, plugin_problems
from .errors import (
    DecoderMissingError,
    DetectionError,
    InvalidInputError,
    MedgemmaDataError,
    OptionError,
    PluginConflictError,
    PluginFailedError,
    UnknownModalityError,
)
from .hookspecs import hookimpl
from .messages import to_messages
from .sample import ALLOWED_METADATA_KEYS, ImagePart, Location, Provenance, Sample, TextPart
from .spec import ModalitySpec, Option, PluginInfo, PluginProblem

__version__ = "0.2.0"

__all__ = [
    "ALLOWED_METADATA_KEYS",
    "DecoderMissingError",
    "DetectionError",
    "ImagePart",
    "InvalidInputError",
    "Location",
    "MedgemmaDataError",
    "ModalitySpec",
    "Option",
    "OptionError",
    "PluginConflictError",
    "PluginFailedError",
    "PluginInfo",
    "PluginProblem",
    "Provenance",
    "Sample",
    "TextPart",
    "UnknownModalityError",
    "detect",
    "detection_scores",
    "hookimpl",
    "list_plugins",
    "load",
    "plugin_problems",
    "to_messages",
]
