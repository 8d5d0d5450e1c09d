"""User-facing error types.

Every error a user can cause (bad config, bad file, bad data) is raised as one
of these with a message that names the field or file and what was expected.
The CLI prints such errors as one line, without a traceback.
"""

from __future__ import annotations


class MoelabError(Exception):
    """Base class: an error whose message is written for the user."""


class ConfigError(MoelabError, ValueError):
    """A configuration field has a value that is not allowed."""


class DataError(MoelabError, ValueError):
    """Input data (a file, folder or record) is missing, empty or malformed."""


class CheckpointError(MoelabError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class WorkerLostError(MoelabError, RuntimeError):
    """A worker process (training runs side by side) died without reporting back."""
