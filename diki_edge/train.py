"""The training core's former single module, kept so ``from diki_edge.train import ...`` goes on working: every
name lives in :mod:`diki_edge.training` (config, statistics, loop, task run, bank write)."""

from diki_edge.training import *  # noqa: F401,F403
from diki_edge.training import __all__  # noqa: F401
