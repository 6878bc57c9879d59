"""The training loop: one ``Trainer`` with ``train()`` → ``train_step()`` → ``forward_backward_step()``.

Everything strategy-specific (DDP, ZeRO, FSDP, offload, activation checkpointing) happens once in
``parallelize.setup_model_and_optimizer``; the loop below reads the same under every strategy. The
data loader is *not* passed through ``accelerator.prepare``: ``dist_audio.data.make_loader`` already
yields this rank's share of one global data order and restarts at any sample position (``start_sample``),
which is what exact resume on any world size needs.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

from dist_audio.config import ConfigError, RunConfig, save_config
from dist_audio.data import make_loader
from dist_audio.data.manifest import read_manifest
from dist_audio.models import build_model
from dist_audio.objectives import build_objective
from dist_audio.train import parallelize
from dist_audio.train.auto_fit import AutoFit, Batch, batch_size, split_batch
from dist_audio.train.checkpoint import (
    TrainerState,
    agree_on_errors,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dist_audio.train.durable import (
    WRITE_ERRORS,
    append_line,
    describe_error,
    quiet_disk_errors_in_threads,
    replace_atomically,
    write_atomic,
    writer_error,
)
from dist_audio.train.optim import LRSchedule, make_optimizer
from dist_audio.train.resume import BatchPlan, ResumeChange, batch_plan, checkpoint_global_batch
from dist_audio.train.tracking import Tracking, make_trackers, peak_memory_gib

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# a stop signal again within this many seconds is the same request delivered twice (directly and by the
# launcher: torchrun, srun); only a later one means "exit now"
SIGNAL_REPEAT_WINDOW_S = 5.0
PREVIEW_EXAMPLES = 2  # validation examples turned into audio at each validation
SAMPLE_LOG = "samples.jsonl"  # train.sample_log: one line per optimizer step


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite steps, ...); the message says where it stopped."""


@dataclass
class StepResult:
    """One optimizer step, reduced over micro-batches and ranks."""

    loss: float
    metrics: dict[str, float]
    grad_norm: float
    applied: bool  # False: skipped for a non-finite loss or gradient (or an fp16 loss-scale overflow)
    loss_scale_overflow: bool  # fp16 only: finite loss, gradients overflowed; the scaler lowers its scale
    samples: int  # all ranks
    skipped_samples: int  # corrupt samples the loaders skipped, all ranks
    remote_retries: int = 0  # retried reads of a URL data source, all ranks


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss of every step this call ran
    val_metrics: dict[str, float] = field(default_factory=dict)
    stopped_by: str | None = None  # signal name when preempted
    checkpoint: Path | None = None


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` with the strategy of ``accelerator``; ``resume`` continues
    from the newest complete checkpoint of the run directory when there is one.

    ``batch`` says how each step's global batch is cut on this world size (default: as ``cfg`` says; a
    resume on another world size keeps the checkpoint's global batch, see ``resume.batch_plan``); the
    accelerator must have been made for it. ``changes`` are the accepted config changes of a resume,
    listed at start. Checkpoints store ``cfg`` as given, not as re-cut."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator, *, resume: bool = False,
                 batch: BatchPlan | None = None, changes: list[ResumeChange] | tuple = ()):
        self.config = cfg
        self.batch = batch or batch_plan(cfg, accelerator.num_processes)
        self.cfg = cfg = self.batch.apply(cfg)
        self.changes = list(changes)
        self.accelerator = accelerator
        self.run_dir = cfg.run_dir
        if cfg.train.auto_fit and accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError("train.auto_fit", "not supported under DeepSpeed (its accumulation steps are "
                                                "fixed at start); use DDP or FSDP, or turn auto_fit off")
        set_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(cfg.model)
        self.objective = build_objective(cfg.model, cfg.data)
        self.model, self.optimizer, self.strategy = parallelize.setup_model_and_optimizer(
            accelerator, parallelize.LaunchStrategy.from_environment(), model,
            functools.partial(make_optimizer, cfg=cfg.optim), cfg.train)
        # kept in trainer_state.json, not registered with Accelerate (which unpickles custom objects)
        self.schedule = LRSchedule(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.ema = None
        if cfg.optim.ema_decay > 0:
            from dist_audio.train.ema import ShardedEMA

            self.ema = ShardedEMA(self.model, cfg.optim.ema_decay, accelerator.device)
        self.training_state = parallelize.state_holder(accelerator, self.model, self.optimizer, self.ema)
        self.state = TrainerState()
        self.auto_fit = AutoFit(cfg.train.auto_fit)
        self.resumed_from: Path | None = None
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            self.resume_from(checkpoint)
        else:
            set_seed(cfg.train.seed, device_specific=True)  # distinct dropout/sampling streams per rank
        self.sample_rate = int(read_manifest(cfg.data.shards, cfg.data.remote_timeout_s)["sample_rate"])
        self.consecutive_nonfinite = 0
        self.remote_retries = 0  # this process's run so far (not checkpointed: a count of incidents)
        self.stop_signal: str | None = None
        self.stop_time = 0.0  # time.monotonic() of the stop signal
        self.write_failure: str | None = None  # a failed sample-log write, stops every rank at the step's end
        quiet_disk_errors_in_threads()  # TensorBoard's writer thread on a full disk: one line, no traceback
        self.tracking = Tracking(accelerator, cfg)

    def resume_from(self, checkpoint: Path) -> None:
        """Restore model, optimizer, schedule, EMA, RNG and the data position from ``checkpoint``; the
        sample log forgets the steps after it (they will be run again)."""
        self.state = load_checkpoint(self.accelerator, checkpoint, self.training_state)
        log = self.run_dir / SAMPLE_LOG

        def forget_later_steps() -> None:
            kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.state.step]
            write_atomic(log, "".join(line + "\n" for line in kept))

        write_on_main_process(self.accelerator, log, forget_later_steps, when=log.is_file())
        self.schedule.load_state_dict(self.state.schedule)
        parallelize.load_loss_scale_state(self.accelerator, self.model, self.state.loss_scale)
        self.auto_fit.splits, self.auto_fit.retries = self.state.micro_splits, self.state.oom_retries
        self.resumed_from = checkpoint

    # ------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------

    def train(self, until_step: int | None = None) -> TrainResult:
        """Run optimizer steps up to ``train.max_steps`` (or ``until_step``), validating, logging and
        checkpointing on schedule; a SIGTERM/SIGINT ends the run cleanly after the current step."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        last_step = min(cfg.train.max_steps, until_step or cfg.train.max_steps)
        config = self.run_dir / "config.yaml"
        write_on_main_process(accelerator, config, lambda: replace_atomically(
            config, functools.partial(save_config, self.config)))
        self.log_startup()
        result = TrainResult(step=state.step)
        window = _Window()
        batches = self.train_batches()
        bar = tqdm(total=cfg.train.max_steps, initial=state.step, desc=cfg.train.name, dynamic_ncols=True,
                   disable=not (accelerator.is_main_process and cfg.log.progress_bar))
        previous_handlers = self.install_signal_handlers()
        try:
            while state.step < last_step:
                start = time.perf_counter()
                loaded = [next(batches) for _ in range(cfg.train.grad_accum)]
                data_time = time.perf_counter() - start
                step = self.train_step(loaded)
                state.step += 1
                if cfg.train.sample_log:
                    self.log_samples(loaded, step.loss)
                window.add(step, time.perf_counter() - start, data_time)
                result.losses[state.step] = step.loss
                state.skipped_samples += step.skipped_samples
                self.remote_retries += step.remote_retries
                state.samples_seen += step.samples
                bar.update(1)
                bar.set_postfix(loss=f"{step.loss:.4f}")
                if step.applied:
                    self.consecutive_nonfinite = 0
                else:
                    self.on_skipped_step(loaded, step)
                if state.step % cfg.log.every == 0 or state.step == last_step:
                    scalars = self.window_scalars(window)
                    self.tracking.scalars(scalars, state.step)
                    self.tracking.progress(state.step, scalars)
                    window = _Window()
                if state.step % cfg.train.val_every == 0 or state.step == cfg.train.max_steps:
                    result.val_metrics = self.validate()
                stopping = self.stop_requested()
                if stopping or state.step % cfg.train.checkpoint_every == 0 or state.step == last_step:
                    result.checkpoint = self.save()
                if stopping:
                    result.stopped_by = self.stop_signal or "a signal on another rank"
                    since = f", {time.monotonic() - self.stop_time:.1f} s after the signal" if self.stop_signal else ""
                    logger.warning("stopped by %s after step %d; checkpoint %s written%s. Resume with the same "
                                   "command plus --resume auto", result.stopped_by, state.step, result.checkpoint,
                                   since)
                    break
            if state.step == cfg.train.max_steps:
                final = {"train_loss": result.losses.get(state.step, math.nan),
                         **{f"val_{k.replace('/', '_')}": v for k, v in result.val_metrics.items()}}
                self.tracking.hparams(cfg, final)
        finally:  # also on errors: the events so far are flushed for the post-mortem
            self.restore_signal_handlers(previous_handlers)
            batches.close()
            bar.close()
            self.tracking.flush()
        result.step = state.step
        return result

    def train_step(self, loaded: list[Batch]) -> StepResult:
        """One optimizer step over ``grad_accum`` loaded batches (split further by auto_fit); a step
        whose loss or gradient norm is not finite makes no update. An OOM is retried with smaller
        micro-batches when ``train.auto_fit`` is on."""
        accelerator = self.accelerator
        loaded = [_to_device(b, accelerator.device) for b in loaded]
        while True:
            try:
                loss, metrics = self.accumulate_gradients(loaded)
                break
            except torch.OutOfMemoryError as err:
                if not self.auto_fit.enabled:
                    raise
                message = str(err).splitlines()[0]
            self.model.zero_grad(set_to_none=True)
            self.auto_fit.recover(loaded, message)
            self.state.micro_splits, self.state.oom_retries = self.auto_fit.splits, self.auto_fit.retries
        grad_norm = parallelize.clip_grad_norm(accelerator, self.model, self.cfg.optim.grad_clip or math.inf)
        counts = torch.tensor([sum(batch_size(b) for b in loaded), sum(int(b["skipped"]) for b in loaded),
                               sum(int(b.get("remote_retries", 0)) for b in loaded)],
                              device=accelerator.device, dtype=torch.float64)
        counts = accelerator.reduce(counts, reduction="sum")
        names = sorted(metrics)
        values = torch.stack([loss, *(metrics[k] for k in names)]).double()
        values = accelerator.reduce(values, reduction="mean").tolist()
        finite = math.isfinite(values[0]) and math.isfinite(grad_norm)
        loss_scaled = self.cfg.train.mixed_precision == "fp16"
        if finite or loss_scaled:  # fp16: the loss scaler (or DeepSpeed's) must see every step to adapt
            self.optimizer.step()
        applied = finite and not accelerator.optimizer_step_was_skipped
        overflow = not applied and loss_scaled and math.isfinite(values[0])
        if applied:
            self.schedule.step()
            if self.ema is not None:
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=values[0], metrics=dict(zip(names, values[1:])), grad_norm=grad_norm,
                          applied=applied, loss_scale_overflow=overflow, samples=int(counts[0]),
                          skipped_samples=int(counts[1]), remote_retries=int(counts[2]))

    def accumulate_gradients(self, loaded: list[Batch]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward/backward over every micro-batch of the step; returns the sample-weighted mean loss
        and metrics of this rank."""
        micro_batches = self.auto_fit.micro_batches(loaded)
        self.accelerator.gradient_accumulation_steps = len(micro_batches)
        self.accelerator.step = 0
        loss_sum = torch.zeros((), device=self.accelerator.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for micro_batch, weight in micro_batches:
            with self.accelerator.accumulate(self.model):
                loss, metrics = self.forward_backward_step(micro_batch, weight * len(micro_batches))
            loss_sum += loss * weight
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value.float() * weight
        return loss_sum, metric_sums

    def forward_backward_step(self, micro_batch: Batch, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch and its backward pass. ``accelerator.backward`` divides by the number
        of micro-batches; ``scale`` (= weight × that number) turns the sum into a sample-weighted mean."""
        loss, metrics = self.objective.loss(self.model, micro_batch)
        self.accelerator.backward(loss * scale)
        return loss.detach().float(), {k: v.detach() for k, v in metrics.items()}

    # ------------------------------------------------------------------------------------------------
    # data, validation, checkpoints
    # ------------------------------------------------------------------------------------------------

    def train_batches(self) -> Iterator[Batch]:
        """This rank's training micro-batches from the saved position on, epoch after epoch. The position
        (``samples_in_epoch``, global samples) advances by a global batch once a step's micro-batches have
        been handed out, so a checkpoint after that step resumes with the next one on any world size."""
        cfg, state, plan = self.cfg, self.state, self.batch
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        while True:
            loader = make_loader(cfg.data, "train", rank=rank, world_size=world, seed=cfg.train.seed,
                                 epoch=state.epoch, start_sample=state.samples_in_epoch,
                                 global_batch=plan.global_batch)
            for index, batch in enumerate(loader):
                if (index + 1) % plan.grad_accum == 0:
                    state.samples_in_epoch += plan.global_batch
                yield batch
            if loader.steps == 0 and state.samples_in_epoch == 0:
                raise TrainingError(f"the training split of {cfg.data.shards} yields no batches for rank {rank}")
            state.epoch += 1
            state.samples_in_epoch = 0

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Per-sample metrics averaged over the validation split (padding masked out) and all ranks,
        logged under ``val/``; then the audio preview. Runs under a forked RNG so training continues
        exactly as if it had not run."""
        cfg, accelerator = self.cfg, self.accelerator
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        self.model.eval()
        with torch.random.fork_rng(devices=devices):
            loader = make_loader(cfg.data, "valid", rank=accelerator.process_index,
                                 world_size=accelerator.num_processes, seed=cfg.train.seed, epoch=0)
            sums: dict[str, torch.Tensor] = {}
            count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            first_batch = None
            for index, batch in enumerate(loader):
                if cfg.train.val_batches and index >= cfg.train.val_batches:
                    break
                batch = _to_device(batch, accelerator.device)
                if first_batch is None:
                    first_batch = batch
                mask = batch["mask"]
                for name, value in self.objective.evaluate(self.model, batch).items():
                    sums[name] = sums.get(name, 0.0) + torch.where(mask, value.double(), 0.0).sum()
                count += mask.sum()
            names = sorted(sums)
            totals = accelerator.reduce(torch.stack([count, *(sums[k] for k in names)]), reduction="sum")
            averages = {name: (totals[i + 1] / totals[0].clamp_min(1)).item() for i, name in enumerate(names)}
            self.tracking.scalars({f"val/{k}": v for k, v in averages.items()}, self.state.step)
            if cfg.log.audio_seconds > 0 and first_batch is not None:
                self.preview(first_batch)
        self.model.train()
        if "loss" in averages:
            self.schedule.report_validation(averages["loss"])
        logger.info("step %d validation: %s", self.state.step,
                    ", ".join(f"{k} {v:.4g}" for k, v in averages.items()))
        return averages

    def preview(self, batch: Batch) -> None:
        """Audio of the first ``PREVIEW_EXAMPLES`` validation examples (generated or separated) to listen to
        in TensorBoard, spread over the ranks so none waits long for another (rank r previews examples
        r, r + world, ...), then gathered to the main process. Sharded or low-precision weights are gathered
        once into a plain fp32 copy: recurrent generation runs outside ``forward`` and its hooks."""
        accelerator = self.accelerator
        if self.strategy.sharded_params or self.strategy.param_dtype != "fp32":
            model = build_model(self.cfg.model)
            model.load_state_dict(self.training_state.full_weights(accelerator.device))  # collective
            model.to(accelerator.device).eval()
        else:
            model = accelerator.unwrap_model(self.model)
        examples = split_batch(batch, batch_size(batch))
        clips = {}
        for index in range(accelerator.process_index, min(PREVIEW_EXAMPLES, len(examples)), accelerator.num_processes):
            torch.manual_seed(self.cfg.train.seed + index)  # the same preview noise at every validation
            clips |= {f"{name}/{index}": clip.cpu() for name, clip in
                      self.objective.preview(model, examples[index], self.cfg.log.audio_seconds).items()}
        gathered = {name: clip for part in gather_object([clips]) for name, clip in part.items()}
        self.tracking.audio(gathered, self.sample_rate, self.state.step)

    def save(self) -> Path:
        self.state.micro_splits, self.state.oom_retries = self.auto_fit.splits, self.auto_fit.retries
        self.state.schedule = self.schedule.state_dict()
        self.state.loss_scale = parallelize.loss_scale_state(self.accelerator, self.model)
        self.state.global_batch, self.state.world_size = self.batch.global_batch, self.accelerator.num_processes
        self.state.strategy = self.strategy_name()
        start = time.perf_counter()
        path = save_checkpoint(self.accelerator, self.run_dir, self.config, self.state, self.training_state,
                               self.cfg.train.keep_last)
        logger.info("checkpoint %s written in %.1f s", path, time.perf_counter() - start)
        return path

    # ------------------------------------------------------------------------------------------------
    # faults and logging
    # ------------------------------------------------------------------------------------------------

    def on_skipped_step(self, loaded: list[Batch], step: StepResult) -> None:
        """Count a skipped step; ``train.max_nonfinite_steps`` non-finite ones in a row stop the run
        (fp16 loss-scale overflows are counted but do not stop it: the scaler recovers from them)."""
        self.state.skipped_steps += 1
        if step.loss_scale_overflow:
            logger.info("step %d skipped: fp16 gradient overflow, loss scale lowered", self.state.step)
            return
        self.consecutive_nonfinite += 1
        logger.warning("step %d skipped: loss %s, grad norm %s", self.state.step, step.loss, step.grad_norm)
        if self.consecutive_nonfinite < self.cfg.train.max_nonfinite_steps:
            return
        keys = [key for rank_keys in gather_object([[k for b in loaded for k in b["keys"]]]) for key in rank_keys]
        raise TrainingError(
            f"{self.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient; stopped at "
            f"step {self.state.step}. Batch sample keys: {keys}. Last good checkpoint: "
            f"{latest_checkpoint(self.run_dir) or 'none'}")

    def window_scalars(self, window: _Window) -> dict[str, float]:
        state, seconds = self.state, self.cfg.data.segment_seconds
        scalars = {"train/loss": window.mean("loss"), "opt/lr": self.schedule.last_lr(),
                   "opt/grad_norm": window.mean("grad_norm"),
                   "perf/step_time_s": window.step_time / window.steps,
                   "perf/samples_per_s": window.samples / window.step_time,
                   "perf/audio_seconds_per_s": window.samples * seconds / window.step_time,
                   "perf/data_time_frac": window.data_time / window.step_time,
                   "data/skipped_samples": state.skipped_samples, "data/remote_retries": self.remote_retries,
                   "train/skipped_steps": state.skipped_steps, "mem/oom_retries": self.auto_fit.retries}
        scalars.update({f"train/{name}": window.mean(name) for name in window.metric_names})
        peaks = gather_object([peak_memory_gib(self.accelerator.device)])
        scalars["mem/peak_gib"] = max(peaks)
        if len(peaks) > 1:
            scalars.update({f"mem/peak_gib/rank{rank}": peak for rank, peak in enumerate(peaks)})
        return scalars

    def log_samples(self, loaded: list[Batch], loss: float) -> None:
        """Append this step's whole global batch (``<key>@<start frame>`` of every rank) and its loss to
        ``samples.jsonl``: the record that a resumed run on any world size saw the same data."""
        keys = [key for part in gather_object([[k for b in loaded for k in b["keys"]]]) for key in part]
        if self.accelerator.is_main_process and self.write_failure is None:
            path = self.run_dir / SAMPLE_LOG
            try:
                append_line(path, json.dumps({"step": self.state.step, "samples": keys, "loss": loss}))
            except OSError as err:  # every rank stops at this step's end (stop_requested)
                self.write_failure = f"could not append step {self.state.step} to {path}: {describe_error(err)}"

    def strategy_name(self) -> str:
        """E.g. ``DEEPSPEED ZeRO-3 x 2``: what a checkpoint records it was written under."""
        info = self.strategy
        stage = f" ZeRO-{info.zero_stage}" if info.zero_stage is not None else ""
        offload = " + offload" if info.offload_params or info.offload_optimizer else ""
        return f"{info.distributed_type}{stage}{offload} x {info.world_size}"

    def log_startup(self) -> None:
        cfg, state, batch = self.cfg, self.state, self.batch
        lines = [
            f"run directory: {self.run_dir}",
            *self.strategy.summary_lines(),
            f"batch: {batch.describe()} ({batch.global_batch * cfg.data.segment_seconds:g} s of audio)"
            + (f"; auto_fit splits each loaded batch in {self.auto_fit.splits}" if self.auto_fit.splits > 1 else ""),
            f"steps: {state.step} -> {cfg.train.max_steps}"
            + (f" (resumed from {self.resumed_from})" if self.resumed_from else ""),
        ]
        if self.resumed_from is not None and state.strategy and state.strategy != self.strategy_name():
            lines.append(f"resumed under another strategy: {state.strategy} -> {self.strategy_name()}")
        lines += [f"resumed with a changed config: {change}" + (" (allowed by --allow-change)" if change.breaking
                                                                else "") for change in self.changes]
        logger.info("training setup\n  %s", "\n  ".join(lines))

    def install_signal_handlers(self) -> dict[int, Any]:
        """First SIGTERM/SIGINT: finish the step, checkpoint, exit 0. The same signal again within
        ``SIGNAL_REPEAT_WINDOW_S`` (a rank signalled directly and by its launcher) counts once; a later
        one kills the process at once."""
        def handle(signum: int, frame: Any) -> None:
            now = time.monotonic()
            if self.stop_signal is not None:
                if now - self.stop_time < SIGNAL_REPEAT_WINDOW_S:
                    return
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self.stop_signal, self.stop_time = signal.Signals(signum).name, now
            logger.warning("%s received: finishing step %d, then checkpointing (a repeat within %g s counts "
                           "once; send it again later to exit at once)", self.stop_signal, self.state.step + 1,
                           SIGNAL_REPEAT_WINDOW_S)

        return {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}

    def restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        """Put the handlers from before ``train()`` back; after a stop by signal, a ``RepeatedSignalGuard``
        in front of them drops the repeats that may still arrive while the process exits."""
        for sig, handler in previous.items():
            if self.stop_signal is not None:
                handler = RepeatedSignalGuard(handler, self.stop_time)
            signal.signal(sig, handler)

    def stop_requested(self) -> bool:
        """True on every rank once any rank got a stop signal (so all of them checkpoint together); raises
        ``TrainingError`` on every rank once the main process failed to write the sample log."""
        flags = torch.tensor([1.0 if self.stop_signal else 0.0, 1.0 if self.write_failure else 0.0],
                             device=self.accelerator.device)
        stop, failed = self.accelerator.reduce(flags, reduction="sum").tolist()
        if failed:
            raise TrainingError(self.write_failure or "the main process could not write the sample log")
        return stop > 0


class RepeatedSignalGuard:
    """A signal handler that ignores the signal until ``SIGNAL_REPEAT_WINDOW_S`` after ``since`` (a repeat
    of the one that stopped training), then hands it to ``previous`` (the default: the process dies)."""

    def __init__(self, previous: Any, since: float):
        if isinstance(previous, RepeatedSignalGuard):  # left by an earlier run in this process
            previous = previous.previous
        self.previous, self.since = previous, since

    def __call__(self, signum: int, frame: Any) -> None:
        if time.monotonic() - self.since < SIGNAL_REPEAT_WINDOW_S:
            return
        signal.signal(signum, self.previous)
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)


class _Window:
    """Sums of step results between two scalar logs."""

    def __init__(self):
        self.steps = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.metric_names: set[str] = set()
        self.step_time = self.data_time = 0.0
        self.samples = 0

    def add(self, step: StepResult, step_time: float, data_time: float) -> None:
        self.steps += 1
        self.step_time += step_time
        self.data_time += data_time
        self.samples += step.samples
        self.metric_names.update(step.metrics)
        for name, value in {"loss": step.loss, "grad_norm": step.grad_norm, **step.metrics}.items():
            if math.isfinite(value):
                self.sums[name] = self.sums.get(name, 0.0) + value
                self.counts[name] = self.counts.get(name, 0) + 1

    def mean(self, name: str) -> float:
        return self.sums[name] / self.counts[name] if self.counts.get(name) else math.nan


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# entry points used by launch/train.py
# ----------------------------------------------------------------------------------------------------


def write_on_main_process(accelerator: Accelerator, path: Path, write: Any, *, when: bool = True) -> None:
    """Run ``write`` (which writes ``path``) on the main process, its parent directory created first; if
    that fails (a full or read-only disk), every rank raises ``TrainingError`` naming ``path`` and the
    cause: one collective, so no rank waits in a later one for the main process."""
    error = None
    if accelerator.is_main_process and when:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write()
        except WRITE_ERRORS as err:
            error = describe_error(err, path.parent)
    errors, _ = agree_on_errors(accelerator, error)
    if errors:
        raise TrainingError(f"could not write {path}: {errors[0]}")


def prepare_run_dir(accelerator: Accelerator, run_dir: Path, *, overwrite: bool) -> None:
    """Create the run directory; with ``overwrite`` the main process first empties an existing one."""

    def create() -> None:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(exist_ok=True)

    write_on_main_process(accelerator, run_dir, create)


def end_training(accelerator: Accelerator, tracking: Tracking) -> None:
    """``accelerator.end_training()`` with the trackers finished as optional writes: trackers whose disk
    filled up (already reported once) are not finished again, which would raise that error again, and one
    that fails only now warns instead of failing a finished run."""
    if writer_error(tracking) is None:
        try:
            for tracker in accelerator.trackers:
                tracker.finish()
        except OSError as err:
            logger.warning("logging stopped: %s; the run itself is complete", describe_error(err))
    accelerator.trackers.clear()
    accelerator.end_training()


def make_accelerator(cfg: RunConfig) -> Accelerator:
    return parallelize.make_accelerator(cfg.train, parallelize.LaunchStrategy.from_environment(),
                                        cfg.data.batch_size, grad_clip=cfg.optim.grad_clip,
                                        log_with=make_trackers(cfg.log, cfg.run_dir, cfg.train.name) or None)


def run_training(cfg: RunConfig, *, resume: bool, overwrite: bool, changes: list[ResumeChange] | tuple = ()
                 ) -> TrainResult:
    """Train ``cfg`` in its run directory (created, or emptied first with ``overwrite``); a resume keeps
    the checkpoint's global batch on whatever number of processes runs now, unless ``changes`` (accepted
    by ``resume.check_resume``) change the batch size."""
    checkpoint = latest_checkpoint(cfg.run_dir) if resume and not overwrite else None
    keeps_batch = not any(change.key in ("data.batch_size", "train.grad_accum") for change in changes)
    global_batch = checkpoint_global_batch(checkpoint) if checkpoint is not None and keeps_batch else None
    batch = batch_plan(cfg, int(os.environ.get("WORLD_SIZE", "1")), global_batch)
    accelerator = make_accelerator(batch.apply(cfg))
    prepare_run_dir(accelerator, cfg.run_dir, overwrite=overwrite)
    trainer = Trainer(cfg, accelerator, resume=resume, batch=batch, changes=changes)
    result = trainer.train()
    end_training(accelerator, trainer.tracking)
    return result


TEST_MODE_STEPS = 4


def test_mode_config(cfg: RunConfig) -> RunConfig:
    """The given config shrunk to a few steps with one validation and a checkpoint half-way, written to
    ``<runs_dir>/<name>-test-mode/`` (recreated on every test-mode run)."""
    cfg = copy.deepcopy(cfg)
    train = cfg.train
    train.name = f"{train.name}-test-mode"
    train.max_steps = TEST_MODE_STEPS
    train.checkpoint_every = TEST_MODE_STEPS // 2
    train.val_every = TEST_MODE_STEPS
    train.val_batches = min(train.val_batches or 2, 2)
    train.keep_last = 2
    train.max_nonfinite_steps = 1
    cfg.log.every = 1
    cfg.log.audio_seconds = min(cfg.log.audio_seconds, 0.25)
    return cfg


def run_test_mode(cfg: RunConfig) -> TrainResult:
    """A few steps, a checkpoint, a resume from it (model, optimizer, schedule, RNG and data position
    read back from disk), one validation; raises ``TrainingError`` when any loss is not finite.

    The resume reloads into the same Trainer: Accelerate allows one DeepSpeed engine per process."""
    cfg = test_mode_config(cfg)
    accelerator = make_accelerator(cfg)
    prepare_run_dir(accelerator, cfg.run_dir, overwrite=True)
    trainer = Trainer(cfg, accelerator)
    first = trainer.train(until_step=TEST_MODE_STEPS // 2)
    trainer.resume_from(first.checkpoint)
    second = trainer.train()
    end_training(accelerator, trainer.tracking)
    losses = {**first.losses, **second.losses}
    if second.step != TEST_MODE_STEPS or not all(math.isfinite(v) for v in losses.values()):
        raise TrainingError(f"test mode failed: losses per step {losses}")
    logger.info("test mode passed: losses %s; run directory %s", losses, cfg.run_dir)
    second.losses = losses
    return second
