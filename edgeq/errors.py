"""The error hierarchy: every failure a user can cause is an EdgeqError with a one-line message.

Messages say what failed, the value, what was expected and how to fix it. The CLI prints the message
alone and exits with code 2; library callers catch the class they care about.
"""

from __future__ import annotations


class EdgeqError(Exception):
    """Base class for user-facing errors (bad input, unsupported choices, failed checks)."""

    exit_code = 2


class ConfigError(EdgeqError):
    """A recipe, option or scheme that cannot be honoured."""


class ModelError(EdgeqError):
    """A model directory or hub id that cannot be loaded, or an unsupported architecture."""


class ExportError(EdgeqError):
    """A run that cannot be expressed in the requested artifact format."""


class ArtifactError(EdgeqError):
    """A missing, corrupt or tampered artifact or manifest."""


class DeviceError(EdgeqError):
    """A device or transport that cannot be reached or used."""


class BackendError(EdgeqError):
    """A runtime backend that is missing or failed to load or run an artifact."""
