"""The exceptions the runtime raises for bad input; each message names the file or object and the problem.

:class:`DikiEdgeError` is the base of every user-facing error in all three distributions: the ``diki-edge``
command prints its message as one line instead of a traceback. The training core (``diki_edge.errors``) and the
exporter (``diki_edge_export.errors``) derive their own errors from it.
"""


class DikiEdgeError(Exception):
    """Base class: a user-facing error whose message is meant to be printed as is.

    ``exit_code`` is the status the ``diki-edge`` command exits with when the error reaches ``cli.main``, the one
    place that prints errors: 1 for a bad file or a failed operation, 2 for usage and setup errors.
    """

    exit_code = 1


class UsageError(DikiEdgeError):
    """A command was called wrongly: a bad option value, a missing or contradictory argument."""

    exit_code = 2


class BankError(DikiEdgeError):
    """A bank file or bank operation is invalid (missing, truncated, incompatible, ill-shaped)."""


class RuntimeSetupError(DikiEdgeError):
    """The runtime could not start: missing ONNX Runtime, unavailable provider, malformed model folder."""

    exit_code = 2
