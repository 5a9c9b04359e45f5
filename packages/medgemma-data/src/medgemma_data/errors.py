"""Errors raised for user mistakes and bad inputs.

Every error here carries a one-line message that names the file and the fix; the CLI prints it
on stderr without a traceback. Anything else escaping a plugin is a bug in that plugin and is
wrapped in :class:`PluginFailedError` naming the plugin's distribution.
"""

from __future__ import annotations


class MedgemmaDataError(Exception):
    """Base class of every user-facing error of medgemma-data."""


class InvalidInputError(MedgemmaDataError):
    """The input file or folder is missing, corrupt, empty or of the wrong kind."""


class DecoderMissingError(MedgemmaDataError):
    """A compressed DICOM transfer syntax has no installed decoder (the message names the package)."""


class DetectionError(MedgemmaDataError):
    """No plugin (or more than one, equally) recognises the input; pass ``modality=``."""


class UnknownModalityError(MedgemmaDataError):
    """The requested modality is not registered by any loaded plugin."""


class OptionError(MedgemmaDataError):
    """An option name is unknown or its value cannot be parsed."""


class PluginConflictError(MedgemmaDataError):
    """Two plugins register the same modality name (the message names both distributions)."""


class PluginFailedError(MedgemmaDataError):
    """A plugin raised something other than a :class:`MedgemmaDataError` (a plugin bug)."""


def is_rust_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a panic of a Rust extension (pyo3's ``PanicException``).

    Decoders written in Rust (pylibjpeg-rle) panic on some corrupt inputs. pyo3 makes that a
    ``BaseException``, which escapes every ``except Exception``; each extension has its own
    class, so it is recognised by name. Catch it narrowly where a decoder runs (``except
    BaseException`` + this test, re-raising anything else) and report the file as corrupt.
    """
    cls = type(exc)
    return cls.__name__ == "PanicException" and cls.__module__ == "pyo3_runtime"
