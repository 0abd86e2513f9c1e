"""Training JSAEs: the trainer (:mod:`jsae.training.trainer`), paired data in memory or from captures
(:mod:`jsae.training.data`) and the recipes every caller shares (:mod:`jsae.training.recipes`)."""

from jsae.training.data import PairedActivations, PairedTensorData, check_paired_batch, load_pairs
from jsae.training.trainer import JointSAETrainer, JointTrainerConfig, train_jsae

__all__ = ["JointSAETrainer", "JointTrainerConfig", "PairedActivations", "PairedTensorData", "check_paired_batch",
           "load_pairs", "train_jsae"]
