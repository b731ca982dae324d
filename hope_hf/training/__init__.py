"""Training helpers for HOPE (not model code: the modeling files never import this package)."""

from .continuum import ContinuumOptimizer, cms_parameter_levels, count_label_tokens
from .trainer import HopeTrainer, checkpointing_args, continuum_optimizer, decay_parameter_names

__all__ = [
    "ContinuumOptimizer",
    "HopeTrainer",
    "checkpointing_args",
    "cms_parameter_levels",
    "continuum_optimizer",
    "count_label_tokens",
    "decay_parameter_names",
]
