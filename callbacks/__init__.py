"""Lightning callbacks of caq-lightning (use them by class path in a config's ``trainer.callbacks``)."""

from callbacks.block_schedule import BlockScheduler
from callbacks.export import Export
from callbacks.int4_export import Int4Export

__all__ = ["BlockScheduler", "Export", "Int4Export"]
