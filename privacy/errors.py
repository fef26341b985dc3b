"""Precise errors of the privacy gate. Messages name the problem, never the file's content."""


class InvalidImage(ValueError):
    """The input is not an image this service can decode safely."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DetectionFailed(RuntimeError):
    """A detector could not run on an image; with a fail-closed policy the photo is refused."""
