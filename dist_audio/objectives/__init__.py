"""Training objectives: what a batch means to a model (loss, validation metrics, audio previews).

An objective has three methods, all taking the (possibly wrapped) model and one batch dict:
- ``loss(model, batch) -> (loss, metrics)``: scalar loss for backward and detached scalar metrics
  named as TensorBoard tags without the ``train/`` prefix (e.g. ``bits_per_sample``);
- ``evaluate(model, batch) -> dict[str, Tensor[B]]``: per-sample validation metrics, always with
  ``loss`` (the trainer averages them over samples and ranks and logs them under ``val/``);
- ``preview(model, batch, seconds) -> dict[str, Tensor[C, T]]``: float audio in [-1, 1] of the batch's
  first example to listen to and look at in TensorBoard, run on one device with a plain model:
  ``generated`` and ``real`` (autoregressive), or ``mixture``, one entry per separated stem and
  ``target/<stem>`` (separation); ``dist_audio.train.figures.preview_figure`` draws either.
"""

from __future__ import annotations

from dist_audio.config import DataConfig, SashimiConfig, TFSWAConfig


def build_objective(model_cfg: SashimiConfig | TFSWAConfig, data_cfg: DataConfig):
    if isinstance(model_cfg, SashimiConfig):
        from dist_audio.objectives.autoregressive import AutoregressiveObjective

        return AutoregressiveObjective(model_cfg, data_cfg)
    if isinstance(model_cfg, TFSWAConfig):
        from dist_audio.objectives.separation import SeparationObjective

        return SeparationObjective(model_cfg, data_cfg)
    raise TypeError(f"no objective for {type(model_cfg).__name__}")
