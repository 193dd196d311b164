"""One error hierarchy. Each exception knows its HTTP status; `app.py` maps them with one handler.

Messages are written for the client: they name the bad value and say what was expected.
"""

from __future__ import annotations


class EdgeharvestError(Exception):
    """Base class of every error the service raises on purpose."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(EdgeharvestError):
    status_code = 400


class InvalidInput(BadRequest):
    """The request is well-formed JSON but its tensors do not fit the model."""


class MalformedRequest(BadRequest):
    """The body cannot be parsed at all (bad JSON, bad binary layout)."""


class ModelNotFound(EdgeharvestError):
    status_code = 404


class PayloadTooLarge(EdgeharvestError):
    status_code = 413


class UnsupportedMediaType(EdgeharvestError):
    status_code = 415


class ServiceUnavailable(EdgeharvestError):
    status_code = 503


class ModelNotReady(ServiceUnavailable):
    pass


class ModelLoadError(EdgeharvestError):
    """A model in the repository cannot be served; raised at start-up, never per request."""


class ManifestError(ModelLoadError):
    """A manifest is missing, unreadable, or disagrees with its graph."""
