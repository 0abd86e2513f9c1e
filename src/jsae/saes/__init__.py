"""The Joint Sparse Autoencoder as a SAELens architecture.

* :mod:`jsae.saes.joint_sae` — configs, :class:`JointSAE` (inference) and :class:`TrainingJointSAE`;
* :mod:`jsae.saes.sparse_relu` — the fast training paths (ReLU and TopK) as tensor-only functions, whose codes
  and reconstructions feed the SAE's one loss;
* :mod:`jsae.saes.alignment` — the alignment losses (one function each) and their registry;
* :mod:`jsae.saes.metrics` — FVU / explained variance and the summed unit decoder rows, one definition each;
* :mod:`jsae.saes.sae_files` — an SAE folder on disk: atomic save and validation.
"""

from jsae.saes.alignment import ALIGNMENT_LOSSES, get_alignment_loss
from jsae.saes.joint_sae import (MODALITIES, JointSAE, JointSAEConfig, JointStepOutput, TrainingJointSAE,
                                 TrainingJointSAEConfig, check_sae_dir)

__all__ = ["ALIGNMENT_LOSSES", "MODALITIES", "JointSAE", "JointSAEConfig", "JointStepOutput", "TrainingJointSAE",
           "TrainingJointSAEConfig", "check_sae_dir", "get_alignment_loss"]
