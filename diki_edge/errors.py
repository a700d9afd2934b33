"""Errors of the training core; both derive from the runtime's :class:`~diki_edge_runtime.errors.DikiEdgeError`."""

from diki_edge_runtime.errors import DikiEdgeError


class BackboneError(DikiEdgeError):
    """A backbone could not be loaded (unknown name, missing checkpoint, no network for a hub download)."""


class DataError(DikiEdgeError):
    """A training or evaluation data folder is unusable."""
