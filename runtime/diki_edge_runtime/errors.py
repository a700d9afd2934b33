"""The exceptions the runtime raises for bad input; each message names the file or object and the problem.

:class:`DikiEdgeError` is the base of every user-facing error in all three distributions: the ``diki-edge``
command prints its message as one line instead of a traceback. The training core (``diki_edge.errors``) and the
exporter (``diki_edge_export.errors``) derive their own errors from it.
"""


class DikiEdgeError(Exception):
    """Base class: a user-facing error whose message is meant to be printed as is."""


class BankError(DikiEdgeError):
    """A bank file or bank operation is invalid (missing, truncated, incompatible, ill-shaped)."""


class RuntimeSetupError(DikiEdgeError):
    """The runtime could not start: missing ONNX Runtime, unavailable provider, malformed model folder."""
