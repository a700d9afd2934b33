"""Learning one task: its residual keys/values, its Gaussian, its class text table, appended to a bank.

The backbone stays frozen; only the new task's ``K_r/V_r`` (a :class:`~diki_edge.model.TaskAdapter`) train,
with ``M = 1``, by cross-entropy over the task's class prompts — the reference recipe (SGD, lr 5.0, batch 128,
10 epochs, cosine to lr*1e-3, no weight decay). Earlier tasks are untouched by construction: they are not
even loaded as parameters. The bank file is only replaced, atomically, once the task is complete, so a run
killed mid-way leaves the previous bank as it was.

The package is split along the run's seams:

* :mod:`~diki_edge.training.config` — :class:`TrainConfig` (the recipe, checked when made), :class:`RunOptions`,
  :class:`TrainReport`;
* :mod:`~diki_edge.training.statistics` — the statistics pass over the frozen encoder (fp32 embeddings summed in
  float64; it also finds the unreadable files, so training sees exactly the readable images);
* :mod:`~diki_edge.training.loop` — :class:`EpochLoop`, the one training loop (also the evaluation baselines');
* :mod:`~diki_edge.training.task` — :class:`TaskRun` (statistics, epochs, text table; resumable through a
  checkpoint's :class:`~diki_edge.checkpoint.RunState`) returning a :class:`TaskResult`;
* :mod:`~diki_edge.training.bank_write` — :func:`train_into_bank`: open or create the bank, train, write it
  atomically or rescue the trained task.

The same code runs one process or many under torchrun (:mod:`diki_edge.distributed`), on the CPU or CUDA in
fp32/bf16/fp16 (:mod:`diki_edge.device`), and checkpoints itself for ``--resume`` (:mod:`diki_edge.checkpoint`).
Nothing is lost late: settings are checked when a :class:`TrainConfig` is made, the bank path is checked writable
with room for the result before any image is read, a non-finite loss stops the run at once
(:class:`~diki_edge.errors.TrainError`, the bank untouched), and a failed final write saves the trained task
beside the bank (or in the temp folder) and names that file.
"""

from diki_edge.training.bank_write import open_or_create_bank, run_identity, save_or_rescue, train_into_bank
from diki_edge.training.config import RunOptions, TrainConfig, TrainReport, config_problem, template_problem
from diki_edge.training.loop import LOCAL, EpochLoop, LoopState, cosine_schedule, cross_entropy_loop
from diki_edge.training.statistics import fp32_math, frozen_statistics, statistics_pass
from diki_edge.training.task import (
                                     AdapterObjective,
                                     TaskResult,
                                     TaskRun,
                                     default_workers,
                                     image_transform,
                                     input_size,
                                     learn_task,
                                     train_task,
)

__all__ = [
    "LOCAL", "AdapterObjective", "EpochLoop", "LoopState", "RunOptions", "TaskResult", "TaskRun", "TrainConfig",
    "TrainReport", "config_problem", "cosine_schedule", "cross_entropy_loop", "default_workers", "fp32_math",
    "frozen_statistics", "image_transform", "input_size", "learn_task", "open_or_create_bank", "run_identity",
    "save_or_rescue", "statistics_pass", "template_problem", "train_into_bank", "train_task",
]
