"""The exceptions diki-edge raises for bad input; each message names the file or object and the problem."""


class DikiEdgeError(Exception):
    """Base class: a user-facing error whose message is meant to be printed as is."""


class BankError(DikiEdgeError):
    """A bank file or bank operation is invalid (missing, truncated, incompatible, ill-shaped)."""


class BackboneError(DikiEdgeError):
    """A backbone could not be loaded (unknown name, missing checkpoint, no network for a hub download)."""


class DataError(DikiEdgeError):
    """A training or evaluation data folder is unusable."""


class ExportError(DikiEdgeError):
    """Export failed or its validation against PyTorch was outside tolerance."""


class RuntimeSetupError(DikiEdgeError):
    """The runtime could not start: missing ONNX Runtime, unavailable provider, malformed model folder."""
