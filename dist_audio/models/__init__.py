"""Model registry. Models are plain single-device ``nn.Module``s; only ``builders`` reads the config.

Every model class exposes, for the trainer:
- ``block_classes``: the residual block classes that activation checkpointing and FSDP wrap;
- ``param_groups(weight_decay)``: AdamW parameter groups (a group may carry its own ``lr``).
"""

from dist_audio.models.builders import build_model

__all__ = ["build_model"]
