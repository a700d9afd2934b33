"""``python -m diki_edge``: the ``diki-edge`` command (what ``torchrun -m diki_edge train ...`` runs)."""

from diki_edge_runtime.cli import main

main()
