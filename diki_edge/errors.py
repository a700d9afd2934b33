"""Errors of the training core; all derive from the runtime's :class:`~diki_edge_runtime.errors.DikiEdgeError`."""

from diki_edge_runtime.errors import DikiEdgeError


class BackboneError(DikiEdgeError):
    """A backbone could not be loaded (unknown name, missing checkpoint, no network for a hub download)."""


class DataError(DikiEdgeError):
    """A training or evaluation data folder is unusable."""


class TrainError(DikiEdgeError):
    """Training cannot start (an invalid setting) or cannot go on (the loss became non-finite), or its result
    could not be written where asked (the message names where it was saved instead)."""
