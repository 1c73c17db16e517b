"""What a user sees while a calibration runs: one step-bounded progress bar with tokens/s and the ETA, a model
summary without the FLOPs column (Lightning counts FLOPs only with an example input, so it would read 0), and one
summary line at the end of fit. The CLI adds all three unless the config names its own.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from tqdm import tqdm


def batch_tokens(batch: Any) -> int:
    """Real (unpadded) tokens of a calibration batch: the attention mask's sum, else the ids' count."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


class TokenRate:
    """Tokens and wall time since the first training batch; all ranks' tokens estimated as world_size x this rank's
    (ranks get equally shaped batches, and counting exactly would add a collective to every step)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.start: float | None = None

    def begin(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def add(self, trainer: Trainer, batch: Any) -> None:
        self.tokens += batch_tokens(batch) * trainer.world_size

    @property
    def seconds(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def total_steps(trainer: Trainer) -> int | None:
    """Optimizer steps this fit will take: ``max_steps``, else Lightning's estimate from epochs and data."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    total = trainer.estimated_stepping_batches
    return None if total == float("inf") else int(total)


class StepProgressBar(TQDMProgressBar):
    """One bar over the whole run, counted in optimizer steps (calibration is step-bounded, so a per-epoch bar with
    ``max_epochs=-1`` would read ``Epoch 0/-2``), with tokens/s first in the postfix and tqdm's ETA."""

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1, process_position: int = 0):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=True)
        self.rate = TokenRate()

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return Tqdm(
            desc="step", total=total_steps(trainer), initial=trainer.global_step,  # a resumed run continues
            unit="step", position=2 * self.process_position, disable=self.is_disabled, leave=True,
            dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
        )  # fmt: skip

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: an epoch is just a pass over the calibration samples

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.rate.begin()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch: Any, batch_idx: int):
        self.rate.add(trainer, batch)
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number is not progress
        return {"tok/s": f"{self.rate.per_second:.0f}", **metrics}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # the bar stays open across epochs and closes at the end of training

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._train_progress_bar is not None and not self._train_progress_bar.disable:
            self._train_progress_bar.close()  # ends the bar's line, so the error line that follows starts its own


class FitSummary(Callback):
    """At the end of training, one line on global rank 0: steps, tokens, wall time and tokens/s of this fit."""

    def __init__(self) -> None:
        self.rate = TokenRate()
        self.first_step = 0
        self.line: str | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.first_step = trainer.global_step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.rate.begin()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch: Any, batch_idx: int):
        self.rate.add(trainer, batch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        steps, seconds = trainer.global_step - self.first_step, self.rate.seconds
        minutes, secs = divmod(seconds, 60)
        self.line = (
            f"fit: {steps} steps, {self.rate.tokens:,} tokens, {int(minutes)}m{secs:04.1f}s wall, "
            f"{self.rate.per_second:,.0f} tokens/s"
        )
        if trainer.is_global_zero:
            tqdm.write(self.line)  # below a bar that is still open, without breaking it; plain stdout otherwise


class CompactModelSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column and total (always 0 here: there is no example input)."""

    def _summary(self, trainer: Trainer, pl_module: LightningModule):
        with warnings.catch_warnings():
            # Under bf16-mixed the parameters stay fp32, which is the 32 bits Lightning falls back to: nothing is wrong.
            warnings.filterwarnings("ignore", message="Precision .* is not supported by the model summary")
            return super()._summary(trainer, pl_module)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        cols = [(name, values) for name, values in summary_data if name != "FLOPs"]
        widths = [max([len(name), *map(len, map(str, values))]) for name, values in cols]
        rows = [" | ".join(f"{name:<{w}}" for (name, _), w in zip(cols, widths))]
        rows.append("-" * len(rows[0]))
        for i in range(len(cols[0][1]) if cols else 0):
            rows.append(" | ".join(f"{str(values[i]):<{w}}" for (_, values), w in zip(cols, widths)))
        rows.append("-" * len(rows[0]))
        frozen = total_parameters - trainable_parameters
        for count, label in (
            (get_human_readable_count(trainable_parameters), "Trainable params"),
            (get_human_readable_count(frozen), "Frozen params (teacher, base)"),
            (f"{model_size:,.1f}", "Total estimated model params size (MB)"),
        ):
            rows.append(f"{count:<10}{label}")
        rank_zero_info("\n" + "\n".join(rows))
