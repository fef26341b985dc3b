"""Precise errors of the geometry stages. Messages say what is wrong and what to do."""


class ReconstructionError(RuntimeError):
    """The photos could not be turned into a usable model."""


class ScaleReferenceError(ValueError):
    """The scale reference is unusable (missing image, zero length, malformed)."""


class DesignError(ValueError):
    """A design file or its descriptor is unusable."""


class PlacementError(ValueError):
    """A placement cannot be resolved on this site."""
