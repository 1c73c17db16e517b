"""The progress display the CLI adds (:mod:`caq_lightning.fit_progress`), under the class paths configs may name."""

from caq_lightning.fit_progress import CompactModelSummary, FitSummary, StepProgressBar

__all__ = ["CompactModelSummary", "FitSummary", "StepProgressBar"]
