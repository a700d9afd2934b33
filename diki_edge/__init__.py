"""diki-edge: DIKI continual-learning adapters for CLIP, exported to one ONNX graph, run torch-free.

Importing this package never imports torch; the PyTorch side lives in ``diki_edge.model`` and
``diki_edge.train``, the torch-free side in ``diki_edge_runtime.bank``, ``diki_edge_runtime.gaussian``
and ``diki_edge_runtime``.
"""

__version__ = "0.1.0"
