"""The engine's errors: one base class, and one branch for what the user can fix.

``InputError`` and its subclasses mean the input was at fault (a file, a data set, a setting);
the message says why, in a sentence fit to show the user. Every other exception out of the
engine is a bug. A caller (the worker, the command line) reports the first and logs the second::

    NetsurgeryError
    └── InputError (also a ValueError)
        ├── ConfigError        settings of a run that cannot work (job spec, training, surgery)
        ├── ModelError         a model file or architecture config that cannot be used
        ├── DataError          (dns_core.data) a data file or data set
        ├── UploadError        (dns_core.uploads) a file refused by its format checks
        ├── OnnxFormatError    (dns_core.onnx_validate) an ONNX graph netsurgery does not accept
        └── SparseFormatError  (dns_core.sparse) a malformed sparse weights file
"""

from __future__ import annotations


class NetsurgeryError(Exception):
    """Base class of the errors the engine raises on purpose."""


class InputError(NetsurgeryError, ValueError):
    """The input cannot be used; the message says why, fit to show the user."""


class ConfigError(InputError):
    """Settings of a run that cannot work: an invalid job spec, training config or surgery knob."""


class ModelError(InputError):
    """A model file or architecture config that cannot be used."""
