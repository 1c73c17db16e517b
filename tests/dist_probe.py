"""A callback the multi-process tests add through the CLI config: records what each rank saw and holds."""

from pathlib import Path

import torch
from lightning import Callback
from torch.distributed.tensor import DTensor


def fixed_batch(dataset, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` calibration samples as one batch, the same on every rank."""
    return {
        "input_ids": dataset.input_ids[:n], "attention_mask": dataset.attention_mask[:n], "index": torch.arange(n),
    }  # fmt: skip


def replicated_trainables(module) -> dict[str, torch.Tensor]:
    """Trainable parameters that every rank holds in full (FSDP2 shards only the decoder's own parameters)."""
    return {
        n: p.detach().cpu().clone() for n, p in module.named_parameters()
        if p.requires_grad and not isinstance(p, DTensor)
    }  # fmt: skip


class Probe(Callback):
    """Per rank: the loss on a fixed batch before the first step, the sample indices trained on, how parameters are
    sharded, and the replicated transforms after training; saved to ``<out_dir>/rank<r>.pt``."""

    def __init__(self, out_dir: str, probe_samples: int = 4):
        self.out_dir = Path(out_dir)
        self.probe_samples = probe_samples
        self.record: dict = {"indices": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == 0 and batch_idx == 0:  # after on_train_start (cached targets exist), before a step
            probe = fixed_batch(trainer.datamodule.dataset, self.probe_samples)
            with torch.no_grad():
                terms = pl_module.compute_loss({k: v.to(pl_module.device) for k, v in probe.items()})
            self.record["loss"] = {k: float(v) for k, v in terms._asdict().items()}
            params = dict(pl_module.named_parameters())
            self.record["dtensors"] = sorted(n for n, p in params.items() if isinstance(p, DTensor))
            self.record["local_numel"] = {
                n: (p.to_local().numel(), p.numel()) for n, p in params.items() if isinstance(p, DTensor)
            }
        self.record["indices"] += batch["index"].tolist()

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["transforms"] = replicated_trainables(pl_module)
        self.record["world_size"] = trainer.world_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")
