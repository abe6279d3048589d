"""Every way an adapter file can be wrong, one exception class each.

Messages name the layer (where there is one) and the fault, so that a CLI or an HTTP 4xx can
pass them to the user unchanged.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Base class: the adapter cannot be used with this base model."""


class NotSafetensorsError(AdapterError):
    """The bytes are not a safetensors file, or the file is truncated."""


class MetadataError(AdapterError):
    """Metadata is missing or malformed, or disagrees with the tensors."""


class DtypeError(AdapterError):
    """A tensor has a dtype the format does not allow."""


class ShapeError(AdapterError):
    """indices and values of a layer differ in shape, or are not [d_out, k]."""


class UnknownModuleError(AdapterError):
    """The adapter names a module the base model does not have."""


class NotLinearError(AdapterError):
    """The adapter names a module that is not a linear layer with a 2-D weight."""


class TiedWeightError(AdapterError):
    """The adapter names a linear layer whose weight is shared with another parameter (a tied
    lm_head is the input embedding too): a delta merged into it would change both."""


class DOutMismatchError(AdapterError):
    """The layer's d_out in the adapter differs from the base model's."""


class IndexOutOfRangeError(AdapterError):
    """An index lies outside [0, d_in)."""


class DuplicateIndexError(AdapterError):
    """A row selects the same input position twice."""


class NonFiniteValueError(AdapterError):
    """A delta is NaN or infinite."""


class FingerprintMismatchError(AdapterError):
    """The adapter was made for another base model."""


class UnreadableAdapterError(AdapterError):
    """Reading or laying out the adapter failed in a way no other class names (the cause is kept)."""
