"""The progress display the CLI adds (:mod:`caq_lightning.progress`), under the class paths configs may name."""

from caq_lightning.progress import CompactModelSummary, FitSummary, StepProgressBar

__all__ = ["CompactModelSummary", "FitSummary", "StepProgressBar"]
