"""The methods compared side by side on one task sequence, one module per method.

Every method sees the same backbone, the same tasks in the same order and the same training budget (epochs,
batch size, seed). Each one learns the tasks one at a time (:meth:`Method.learn`) and is evaluated on every task
after each of them (:meth:`Method.evaluate`), and on held-out images of the backbone's pretraining domains
(``holdout=True``); the protocol is in :mod:`.common`.
"""

from diki_edge.evaluation.methods.common import (
           FrozenFeatures,
           LearnReport,
           Method,
           Outcome,
           Schedule,
)
from diki_edge.evaluation.methods.diki import DikiEngine, DikiMethod, UncalibratedDiki
from diki_edge.evaluation.methods.finetune import FineTuneConfig, SequentialFineTune
from diki_edge.evaluation.methods.prompts import (
           PromptConfig,
           PromptEngine,
           PromptMethod,
)
from diki_edge.evaluation.methods.zero_shot import ZeroShot

METHOD_KEYS = ["zero-shot", "diki", "diki-heldout", "diki-vote", "diki-no-calib", "prompt-l2p", "finetune", "diki-onnx"]

__all__ = ["METHOD_KEYS", "DikiEngine", "DikiMethod", "FineTuneConfig", "FrozenFeatures", "LearnReport", "Method",
           "Outcome", "PromptConfig", "PromptEngine", "PromptMethod", "Schedule", "SequentialFineTune",
           "UncalibratedDiki", "ZeroShot"]
