"""Which decoder blocks are quantized and trainable at each step of a CAQ calibration.

- ``all``: every block quantized and trainable, end to end, as in the paper (the module's default; a no-op).
- ``sequential``: block i alone trains for ``steps_per_block`` steps, anchored to the teacher's output of block i,
  with CAL on the logits. Blocks before i are quantized and frozen, blocks after i run in full precision (with
  their transforms applied, which is exact). R1 is frozen: it rotates every block, so training it would move the
  frozen ones.
- ``progressive``: blocks 0..i are quantized and trainable (R1 too), blocks after i run in full precision, and i
  grows by one every ``steps_per_block`` steps.

Block i = min(step // steps_per_block, num_blocks - 1): once every block has had its turn the last one keeps
training (sequential) or everything stays quantized (progressive). Derived from ``global_step``, so a resumed run
continues at the right block.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from caq_lightning.errors import CAQError

SCHEDULES = ("all", "sequential", "progressive")


class BlockPlan(NamedTuple):
    """What one step of a schedule does; None = all blocks."""

    quantized: set[int] | None
    anchored: set[int] | None
    trainable: set[int]
    r1_trainable: bool


class BlockScheduler(Callback):
    """Sets, before every training step, the quantized blocks, the trainable parameters and the anchored blocks.

    Logs ``block`` (the current block i; for ``all`` the last block) and shows ``block[<schedule>]`` in the
    progress bar. The schedule goes into the logger's hyperparameters as ``block_schedule``.

    Args:
        schedule: ``all``, ``sequential`` or ``progressive``.
        steps_per_block: optimizer steps spent on each block (``sequential``, ``progressive``).
    """

    def __init__(self, schedule: str = "all", steps_per_block: int = 10):
        if schedule not in SCHEDULES:
            raise CAQError(f"unknown block schedule '{schedule}': choose one of {', '.join(SCHEDULES)}")
        if steps_per_block < 1:
            raise CAQError(f"steps_per_block={steps_per_block} must be >= 1")
        self.schedule = schedule
        self.steps_per_block = steps_per_block
        self.block: int | None = None
        self._layer_params: list[list[nn.Parameter]] = []  # trainable parameters of each block
        self._global_params: list[nn.Parameter] = []  # trainable parameters shared by all blocks (R1)

    # ---- what a step trains ---------------------------------------------------------------------------------------

    def block_at(self, step: int, num_blocks: int) -> int:
        if self.schedule == "all":
            return num_blocks - 1
        return min(step // self.steps_per_block, num_blocks - 1)

    def plan(self, block: int, num_blocks: int) -> BlockPlan:
        """The quantized, anchored and trainable blocks and whether R1 trains, at ``block``."""
        if self.schedule == "all":
            return BlockPlan(None, None, set(range(num_blocks)), True)
        if self.schedule == "sequential":
            return BlockPlan(set(range(block + 1)), {block}, {block}, False)
        return BlockPlan(set(range(block + 1)), set(range(block + 1)), set(range(block + 1)), True)

    def _collect(self, pl_module: LightningModule) -> None:
        """Split the student's trainable parameters by block; what belongs to no block (R1) is global."""
        student = pl_module.student
        trainable = {id(p): p for p in student.parameters() if p.requires_grad}
        self._layer_params, seen = [], set()
        for transforms, layer in zip(student.layer_transforms, student.adapter.layers(student.model)):
            params = [p for p in (*transforms.parameters(), *layer.parameters()) if id(p) in trainable]
            self._layer_params.append(params)
            seen.update(id(p) for p in params)
        self._global_params = [p for i, p in trainable.items() if i not in seen]

    def apply(self, pl_module: LightningModule, step: int) -> int:
        """Configure the student for ``step``; returns the current block."""
        student = pl_module.student
        num_blocks = len(student.layer_transforms)
        block = self.block_at(step, num_blocks)
        quantized, anchored, trainable, r1 = self.plan(block, num_blocks)
        student.set_quantized_layers(quantized)
        pl_module.recon_blocks = anchored
        for i, params in enumerate(self._layer_params):
            for p in params:
                p.requires_grad_(i in trainable)
        for p in self._global_params:
            p.requires_grad_(r1)
        self.block = block
        return block

    def release(self, pl_module: LightningModule) -> None:
        """Back to the module's defaults: every block quantized, anchored and trainable."""
        pl_module.student.set_quantized_layers(None)
        pl_module.recon_blocks = None
        for p in (*self._global_params, *(p for params in self._layer_params for p in params)):
            p.requires_grad_(True)

    # ---- Lightning hooks ------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if (
            self.schedule != "all"
            and isinstance(strategy, DDPStrategy)
            # Lightning 2.6 has no public accessor for DDP's kwargs before it wraps the model (after setup, too late)
            and not strategy._ddp_kwargs.get("find_unused_parameters", False)
        ):
            raise CAQError(
                f"block schedule '{self.schedule}' freezes blocks during the run, which DDP must allow: set "
                "trainer.strategy.init_args.find_unused_parameters=true or use schedule=all"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collect(pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams({"block_schedule": self.schedule, "steps_per_block": self.steps_per_block})
        num_blocks = len(pl_module.student.layer_transforms)
        if self.schedule != "all" and trainer.max_steps > 0 and trainer.max_steps < num_blocks * self.steps_per_block:
            rank_zero_warn(
                f"block schedule '{self.schedule}' needs {num_blocks} x {self.steps_per_block} steps to reach the last "
                f"block but max_steps={trainer.max_steps}: later blocks stay in full precision in training"
            )
        rank_zero_info(f"block schedule: {self.schedule}, {self.steps_per_block} steps per block, {num_blocks} blocks")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        block = self.apply(pl_module, trainer.global_step)
        if trainer.logger is not None:
            pl_module.log("block", float(block), on_step=True, prog_bar=False, logger=True)
        pl_module.log(f"block[{self.schedule}]", float(block), on_step=True, prog_bar=True, logger=False)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The module decides what to store by requires_grad: give it the full trainable set (the next step re-applies).
        self.release(pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.release(pl_module)  # what is exported or evaluated afterwards is the fully quantized student

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "steps_per_block": self.steps_per_block, "block": self.block}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict["schedule"], state_dict["steps_per_block"])
        if saved != (self.schedule, self.steps_per_block):
            rank_zero_warn(
                f"resuming a run made with block schedule {saved[0]!r}, {saved[1]} steps per block: continuing with it "
                f"instead of {self.schedule!r}, {self.steps_per_block}"
            )
        self.schedule, self.steps_per_block = saved
        self.block = state_dict.get("block")
