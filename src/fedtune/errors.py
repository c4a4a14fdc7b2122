"""Error types fedtune raises for problems a user can fix (bad recipe, data, peer message)."""

from __future__ import annotations


class FedtuneError(Exception):
    """Base class: the message says what is wrong, where (file, line, key, client) and what to do."""


class RecipeError(FedtuneError):
    """A recipe key is unknown, has the wrong type, or an impossible value."""


class DataError(FedtuneError):
    """An input data file or row cannot be used."""


class ModelError(FedtuneError):
    """The base model, tokenizer or adapter cannot be built."""


class MessageError(FedtuneError):
    """A message from a peer is malformed, unexpected or unsafe; it is rejected, never used."""


class RunDirError(FedtuneError):
    """The run directory cannot be created, resumed or would be overwritten."""


class DeploymentError(FedtuneError):
    """A deployed server or client cannot start, reach its peer, or is refused (names what to fix)."""
