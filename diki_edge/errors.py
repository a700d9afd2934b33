"""Errors of the training core; all derive from the runtime's :class:`~diki_edge_runtime.errors.DikiEdgeError`.

The ``...UsageError`` classes are also the runtime's :class:`~diki_edge_runtime.errors.UsageError`: the command
was called wrongly (a bad option value, a data folder or file that is not there), so ``diki-edge`` exits 2 for
them, as for every usage error; the others are failures of the run or of its files (exit 1)."""

from diki_edge_runtime.errors import DikiEdgeError, UsageError


class BackboneError(DikiEdgeError):
    """A backbone could not be loaded (unknown name, missing checkpoint, no network for a hub download)."""


class DataError(DikiEdgeError):
    """A training or evaluation data folder is unusable."""


class TrainError(DikiEdgeError):
    """Training cannot start (an invalid setting) or cannot go on (the loss became non-finite), or its result
    could not be written where asked (the message names where it was saved instead)."""


class TrainUsageError(TrainError, UsageError):
    """An invalid training setting or option value (device, precision, task name, recipe)."""


class DataUsageError(DataError, UsageError):
    """The data folder given is not there (or is a file)."""


class BackboneUsageError(BackboneError, UsageError):
    """``--model``/``--pretrained`` name no model or checkpoint that exists, or contradict each other."""
