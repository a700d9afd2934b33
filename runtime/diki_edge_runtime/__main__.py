"""``python -m diki_edge_runtime``: the ``diki-edge`` command."""

from diki_edge_runtime.cli import main

main()
