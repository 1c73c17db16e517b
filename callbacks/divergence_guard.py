"""Stop a calibration run whose loss diverges, before it writes a checkpoint or an export of a broken model.

An unbounded push (``loss.push_bound: none``) rewards moving away from the base without limit, so a too-large
lambda lets ``push = -lambda * KL(base || student)`` run to minus infinity while the student drifts away from the
teacher too.
"""

from __future__ import annotations

import math

from lightning import Callback, LightningModule, Trainer

from caq_lightning.checkpoint import divergence_error
from caq_lightning.errors import CAQError
from caq_lightning.losses import LossTerms

FIX = (
    "lower --model.loss.lambda_push or use --model.loss.push_bound=clamp, then resume from the last good checkpoint"
)


class DivergenceGuard(Callback):
    """After every step, stop the run when a loss term is NaN/inf or the push runs past a bound.

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

    def problem(self, terms: LossTerms) -> str | None:
        """What is wrong with these loss terms (floats), or None."""
        for name, value in terms._asdict().items():
            if not math.isfinite(value):
                return f"loss term {name} is not finite"
        if self.max_push is not None and terms.push < -self.max_push:
            return f"push={terms.push:.4g} ran past -max_push={-self.max_push:g}"
        if self.max_kl_base is not None and terms.kl_base > self.max_kl_base:
            return f"kl_base={terms.kl_base:.4g} ran past max_kl_base={self.max_kl_base:g}"
        return None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("terms"), LossTerms):
            raise CAQError("DivergenceGuard reads the loss terms a CAQModule's training_step returns: fit a CAQModule")
        terms = LossTerms(*(float(value) for value in outputs["terms"]))
        problem = self.problem(terms)
        if trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            # global_step already counts this step; the metrics (and the module's own check) number it from 0.
            step = trainer.global_step - 1
            raise divergence_error(trainer, step, terms._asdict(), problem or "another rank diverged", FIX)
