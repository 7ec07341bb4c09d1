"""Training progress as plain lines, for output that is not a terminal (a scheduler's log, nohup,
CI), where a progress bar shows nothing for the whole of a long training."""

from __future__ import annotations

import sys
import time

import lightning as L


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressLines(L.Callback):
    """One line at the end of every epoch and every `every_steps` optimiser steps: epoch, step, the
    latest training loss, samples/s and the time left at that pace."""

    def __init__(self, every_steps: int, batch_size: int, stream=None):
        self.every_steps, self.batch_size, self.stream = every_steps, batch_size, stream
        self.started, self.first_step = 0.0, 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started, self.first_step = time.perf_counter(), trainer.global_step  # a resumed run counts from here

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.every_steps and trainer.global_step % self.every_steps == 0 and trainer.global_step > self.first_step:
            self._line(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._line(trainer, end_of_epoch=True)

    def _line(self, trainer: L.Trainer, end_of_epoch: bool = False) -> None:
        if trainer.global_rank != 0:
            return
        steps = trainer.global_step - self.first_step
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        total = int(trainer.estimated_stepping_batches)
        rate = steps * self.batch_size * trainer.world_size / elapsed
        left = (total - trainer.global_step) * elapsed / steps if steps else float("nan")
        metrics = trainer.callback_metrics
        loss = f"loss {float(metrics['train/loss']):.4f}" if "train/loss" in metrics else "loss -"
        val = f", val recall@10 {float(metrics['val/recall_at_10']):.4f}" if end_of_epoch and \
            "val/recall_at_10" in metrics else ""
        eta = duration(left) if steps else "?"
        print(f"train: epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {trainer.global_step}/{total} "
              f"{loss}{val}, {rate:.0f} samples/s, {duration(elapsed)} elapsed, ETA {eta}",
              file=self.stream or sys.stderr, flush=True)


class EpochHistory(L.Callback):
    """Per epoch: the last training loss, the validation loss and recall@10 (for the report's curves)."""

    def __init__(self):
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1}
        names = {"train/loss": "train_loss", "val/loss": "val_loss", "val/recall_at_10": "val_recall_at_10"}
        for key, name in names.items():
            if key in metrics:
                row[name] = round(float(metrics[key]), 4)
        self.epochs.append(row)
