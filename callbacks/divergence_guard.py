"""Stop a calibration run whose loss diverges, before it writes a checkpoint or an export of a broken model.

An unbounded push (``loss.push_bound: none``) rewards moving away from the base without limit, so a too-large lambda lets
``push = -lambda * KL(base || student)`` run to minus infinity while the student drifts away from the teacher too.
"""

from __future__ import annotations

import math

from lightning import Callback, LightningModule, Trainer

from caq_lightning.checkpoint import divergence_error
from caq_lightning.errors import CAQError

FIX = (
    "lower --model.loss.lambda_push or use --model.loss.push_bound=clamp, then resume from the last good checkpoint"
)


class DivergenceGuard(Callback):
    """After every step, stop the run when a logged loss term is NaN/inf or the push runs past a bound.

    It raises :class:`~caq_lightning.errors.CAQError` naming the step, every loss term and the last good checkpoint;
    the fit ends there, so no ``on_fit_end`` (export) or ``teardown`` (report) hook runs. Lightning runs checkpoint
    callbacks after this one, so the diverged step is never checkpointed. All ranks stop together.

    Args:
        max_push: stop when ``push < -max_push`` (nats, after the lambda weight). None = no bound.
        max_kl_base: stop when ``KL(base || student) > max_kl_base`` (nats). None = no bound.
    """

    def __init__(self, max_push: float | None = None, max_kl_base: float | None = None):
        for name, value in (("max_push", max_push), ("max_kl_base", max_kl_base)):
            if value is not None and not value > 0:
                raise CAQError(f"DivergenceGuard {name}={value} must be positive (or null to disable it)")
        self.max_push = max_push
        self.max_kl_base = max_kl_base

    def problem(self, terms: dict[str, float]) -> str | None:
        """What is wrong with these loss terms, or None."""
        for name, value in terms.items():
            if not math.isfinite(value):
                return f"loss term {name} is not finite"
        push, kl_base = terms.get("push"), terms.get("kl_base")
        if self.max_push is not None and push is not None and push < -self.max_push:
            return f"push={push:.4g} ran past -max_push={-self.max_push:g}"
        if self.max_kl_base is not None and kl_base is not None and kl_base > self.max_kl_base:
            return f"kl_base={kl_base:.4g} ran past max_kl_base={self.max_kl_base:g}"
        return None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        terms = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        problem = self.problem(terms)
        if trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            # global_step already counts this step; the metrics (and the module's own check) number it from 0.
            raise divergence_error(trainer, trainer.global_step - 1, terms, problem or "another rank diverged", FIX)
