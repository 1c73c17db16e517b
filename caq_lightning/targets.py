"""Cached targets: run the frozen teacher and base once, keep their top-k log-probs, calibrate with the student alone.

A precompute pass writes, per rank, safetensors shards ``targets-rank{r}-{i}.safetensors`` with one row per
calibration sample (keyed by the sample's ``index`` from :class:`caq_lightning.data.TokenDataset`):

    sample     (n,)       long   the calibration sample index (the join key)
    input_ids  (n, T)     int32  the tokens the targets were computed on (checked on every lookup)
    index      (n, T, k)  int32  vocab ids chosen by :func:`caq_lightning.losses.select_targets` (the pull set)
    teacher_logp (n, T, k) fp32  full-vocab teacher log-probs gathered at ``index``
    push_index (n, T, k') int32  cal_paper only: its push set
    base_logp  (n, T, k') fp32   full-vocab base log-probs at ``push_index`` (at ``index`` without one; absent for
                                 kl_top, which needs no base)

and a small ``targets-rank{r}.json`` (k, selection, push set, fields, model names, sample count, shard list),
written last, so its presence means the rank's shards are complete. Because the stored log-probs are full-vocab
ones, the renormalised and the partial-sum forms of every top-k loss are exact on cached targets. Full-vocabulary
losses (``kl``, ``cal_full``) need live frozen models.

Where a step's targets come from is one of two strategies behind one interface (``terms``, ``on_train_start``,
``precompute``, ``keeps_base``): :class:`LiveTargets` runs teacher and base every step, :class:`CachedTargets`
reads this cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import LightningModule
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from caq_lightning import distributed
from caq_lightning.env import DTYPES
from caq_lightning.errors import CAQError
from caq_lightning.loading import load_model
from caq_lightning.progress import progress
from caq_lightning.losses import (
    LOSSES, LogitTargets, Loss, LossTerms, Selection, TopkTargets, block_reconstruction_loss, select_targets,
)  # fmt: skip

FIELDS = ("input_ids", "index", "teacher_logp", "base_logp", "push_index")  # TopkTargets' order after input_ids


def _describe(sel: dict) -> str:
    text = f"k={sel['k']} by={sel['by']}"
    return text if sel["push_by"] == "same" else f"{text} push_k={sel['push_k']} push_by={sel['push_by']}"


def shard_name(rank: int, i: int) -> str:
    return f"targets-rank{rank}-{i}.safetensors"


def index_name(rank: int) -> str:
    return f"targets-rank{rank}.json"


def check_cacheable(loss: Loss) -> None:
    """Raise unless ``loss`` (with its recon_weight) can run on cached top-k targets."""
    if loss.selection() is None:
        cacheable = [name for name, cls in LOSSES.items() if cls.pull != "full"]
        raise CAQError(
            f"loss '{loss.name}' uses the full vocabulary, which cached top-k targets do not hold: "
            f"use targets.kind=live or one of {', '.join(cacheable)}"
        )
    if loss.recon_weight > 0:
        raise CAQError(
            f"recon_weight={loss.recon_weight} needs the teacher's block outputs every step, which are not cached: "
            "set loss.recon_weight=0 with targets.kind=cached, or use targets.kind=live"
        )


@torch.no_grad()
def write_targets(
    teacher: Callable[[Tensor, Tensor], Tensor],
    base: Callable[[Tensor, Tensor], Tensor] | None,
    batches: Iterable[dict[str, Tensor]],
    directory: str | Path,
    selection: Selection,
    rank: int = 0,
    meta: dict | None = None,
    samples_per_shard: int = 64,
) -> Path:
    """Run ``teacher`` and ``base`` (input_ids, attention_mask -> logits (B, T, V)) once over ``batches`` and cache
    the top-k targets of ``selection`` for this rank. Batches are dicts with ``input_ids``/``attention_mask`` (B, T)
    and ``index`` (B,); ``base`` may be None when the selection reads no base (kl_top). Returns the path of the
    rank's json index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    push_by = selection.push_by
    fields = ["input_ids", "index", "teacher_logp"]
    if push_by != "none":
        fields += ["base_logp"] if push_by == "same" else ["base_logp", "push_index"]
    rows: dict[str, list[Tensor]] = {name: [] for name in ("sample", *fields)}
    shards: list[dict] = []

    def flush() -> None:
        if not rows["sample"]:
            return
        tensors = {name: torch.cat(values).contiguous() for name, values in rows.items()}
        name = shard_name(rank, len(shards))
        save_file(tensors, directory / name)
        shards.append({"file": name, "samples": tensors["sample"].tolist()})
        for values in rows.values():
            values.clear()

    count = 0
    for batch in batches:
        if "index" not in batch:
            raise CAQError(
                "batches have no 'index' key to join cached targets on: use caq_lightning.data.CalibrationData"
            )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        base_logits = base(ids, mask) if selection.reads_base else None
        targets = select_targets(teacher(ids, mask), base_logits, selection)
        rows["sample"].append(batch["index"].reshape(-1).long().cpu())
        rows["input_ids"].append(ids.to(torch.int32).cpu())
        for name, value in zip(FIELDS[1:], targets):
            if name in rows:  # vocab ids fit int32; halves the cache
                rows[name].append(value.to(torch.int32 if "index" in name else torch.float32).cpu())
        count += ids.shape[0]
        if sum(t.shape[0] for t in rows["sample"]) >= samples_per_shard:
            flush()
    flush()
    if not count:
        raise CAQError("no calibration batches to precompute targets on: check data.num_samples and the world size")
    index = {**selection._asdict(), "fields": fields, "rank": rank, "num_samples": count, **(meta or {}),
             "shards": shards}  # fmt: skip
    path = directory / index_name(rank)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(path)  # the json appears only once every shard is on disk
    return path


class TargetCache(Dataset):
    """Cached targets read back by calibration sample index: ``cache[i]`` is a dict of the fields of sample ``i``.

    Reads every ``targets-rank*.json`` in ``directory`` (so a cache built with another world size still serves when
    the directory is shared) and checks that it was built with ``k`` and the ``by`` selection (and, for cal_paper /
    kl_top, the push set: ``push_k``, ``push_by``; a :class:`~caq_lightning.losses.Selection`).
    """

    def __init__(self, directory: str | Path, k: int, by: str, push_k: int | None = None, push_by: str = "same"):
        self.directory = Path(directory)
        want = {"k": k, "by": by, "push_k": k if push_by == "same" else push_k, "push_by": push_by}
        indexes = sorted(self.directory.glob("targets-rank*.json"))
        if not indexes:
            raise CAQError(
                f"no cached targets in '{self.directory}': run a fit with targets.kind=cached (it precomputes them) "
                "or point targets.dir at an existing cache"
            )
        self.location: dict[int, tuple[str, int]] = {}
        self.meta: dict = {}
        for path in indexes:
            meta = json.loads(path.read_text())
            held = {"k": meta["k"], "by": meta["by"], "push_k": meta.get("push_k", meta["k"]),
                    "push_by": meta.get("push_by", "same")}  # fmt: skip
            if held != want:
                raise CAQError(
                    f"cached targets in '{self.directory}' hold {_describe(held)} but this run needs {_describe(want)}:"
                    " set loss.top_k/push_top_k/name to match, or delete the directory to rebuild the cache"
                )
            self.fields = tuple(meta.get("fields", FIELDS[:4]))
            self.meta = {key: value for key, value in meta.items() if key not in ("shards", "rank", "num_samples")}
            for shard in meta["shards"]:
                for row, sample in enumerate(shard["samples"]):
                    self.location[sample] = (shard["file"], row)
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.location)

    def _open(self, name: str):
        if name not in self._files:  # safetensors memory-maps the file; rows are read on demand
            self._files[name] = safe_open(str(self.directory / name), framework="pt")
        return self._files[name]

    def __getitem__(self, sample: int) -> dict[str, Tensor]:
        if sample not in self.location:
            raise CAQError(
                f"calibration sample {sample} is not in the cached targets in '{self.directory}' "
                "(built on other data or ranks): delete the directory to rebuild the cache"
            )
        name, row = self.location[sample]
        f = self._open(name)
        return {field: f.get_slice(field)[row : row + 1][0] for field in self.fields}

    def batch(self, samples: Tensor, input_ids: Tensor) -> TopkTargets:
        """TopkTargets (B, T, k) for the batch of ``samples`` (B,), on the device of ``input_ids`` (B, T);
        fields the cache does not hold (push_index, or base_logp for kl_top) are None."""
        rows = [self[int(i)] for i in samples.reshape(-1).tolist()]
        cached_ids = torch.stack([r["input_ids"] for r in rows]).to(input_ids.device)
        if cached_ids.shape != input_ids.shape or not torch.equal(cached_ids.long(), input_ids.long()):
            raise CAQError(
                f"cached targets in '{self.directory}' were computed on other tokens than this batch "
                "(data source, seed or seq_len changed): delete the directory to rebuild the cache"
            )
        device = input_ids.device
        return TopkTargets(
            *(torch.stack([r[f] for r in rows]).to(device) if f in self.fields else None for f in FIELDS[1:])
        )


class SparseHead(nn.Module):
    """Stands in for the student's ``lm_head`` for one forward: the logits at the given vocab ids only, (B, T, k).

    The renormalised top-k losses need nothing else, so the (B, T, V) logits are skipped; the hidden state goes back
    to the teacher's basis as in the full head (``QuantLinear.head_input``). The head is never quantized, so these
    are exactly the student's logits at those ids.
    """

    def __init__(self, head: nn.Module, index: Tensor):
        super().__init__()
        self._head = (head,)  # a tuple: not registered, so the real head stays the model's module
        self.index = index

    def forward(self, hidden: Tensor) -> Tensor:
        head = self._head[0]
        # Read the weights inside the forward: under FSDP2 they are only unsharded while the model's forward runs.
        weight, bias = head.linear.weight, head.linear.bias
        u = head.head_input(hidden)
        rows, inverse = torch.unique(self.index, return_inverse=True)  # vocab ids used anywhere in the batch
        logits = F.linear(u, weight[rows].float(), None if bias is None else bias[rows].float())  # (B, T, U)
        return logits.gather(-1, inverse)  # (B, T, k)


def head_is_full_precision(student: nn.Module) -> bool:
    """Whether the student's lm_head runs unquantized (what the sparse head reproduces exactly)."""
    head = student.adapter.lm_head(student.model)
    return getattr(head, "w_quant", None) is None and getattr(head, "a_quant", None) is None


def sparse_student_logits(
    student: nn.Module, ids: Tensor, mask: Tensor, targets: TopkTargets
) -> tuple[Tensor, TopkTargets]:
    """The student's logits at the targets' ids only (B, T, k + k'), and the targets re-indexed into them.

    Renormalised over their ids, the top-k losses read nothing else: no (B, T, V) logits, no full head backward.
    """
    k = targets.index.shape[-1]
    ids_used = targets.index
    if targets.push_index is not None:
        ids_used = torch.cat([targets.index, targets.push_index], -1)  # (B, T, k + k'); shared ids twice
    with sparse_head(student, ids_used):
        logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, k + k')
    positions = torch.arange(ids_used.shape[-1], device=ids.device).expand_as(ids_used)
    push_positions = None if targets.push_index is None else positions[..., k:]
    return logits, targets._replace(index=positions[..., :k], push_index=push_positions)


@contextmanager
def sparse_head(student: nn.Module, index: Tensor) -> Iterator[None]:
    """Within the block, ``student(...).logits`` are the student's logits at ``index`` (B, T, k) only.

    The student must be in its student mode (transforms on); the swap is undone on exit.
    """
    model, adapter = student.model, student.adapter
    head = adapter.lm_head(model)
    if not head_is_full_precision(student):
        raise CAQError("the sparse head needs an unquantized lm_head: use targets.kind=live")
    if not student.global_mode.transform:
        raise CAQError("the sparse head computes student logits: call it in the student's mode (transform on)")
    adapter.set_lm_head(model, SparseHead(head, index))
    try:
        yield
    finally:
        adapter.set_lm_head(model, head)


# ---- where a step's targets come from ------------------------------------------------------------------------------


class LiveTargets:
    """Teacher and base run every step: the loss reads their full logits, the reconstruction the teacher's blocks."""

    keeps_base = True  # the base model's weights stay loaded for every step

    def on_train_start(self, module: LightningModule) -> None:
        pass

    def precompute(self, module: LightningModule, batches: Iterable[dict[str, Tensor]], rank: int = 0) -> Path:
        raise CAQError("precomputing targets needs targets.kind=cached: live targets run the frozen models every step")

    def terms(self, module: LightningModule, batch: dict[str, Tensor]) -> LossTerms:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        teacher_logits, teacher_blocks = module.teacher_forward(ids, mask)
        base_logits = module.base_forward(ids, mask)
        student, loss = module.student, module.objective
        selection = loss.selection()
        with student.capture_blocks(module.recon_blocks) as student_blocks:
            if loss.renormalized and selection is not None and head_is_full_precision(student):
                # the teacher's (and base's) ids first, then the student's logits at those ids only
                targets = select_targets(teacher_logits, base_logits, selection)
                student_logits, targets = sparse_student_logits(student, ids, mask, targets)
            else:
                student_logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
                targets = LogitTargets(teacher_logits, base_logits)

        def recon() -> Tensor:
            value = student_logits.new_zeros((), dtype=torch.float32)
            if loss.recon_weight > 0:
                unrotated = [student.unrotate(h) for h in student_blocks]
                value = block_reconstruction_loss(unrotated, teacher_blocks, mask, form=module.loss_config.recon)
            return value

        return loss(student_logits, targets, mask, recon)


class CachedTargets:
    """Teacher and base run once, at the start of fit, into this rank's cache; each step runs the student alone
    against the cached top-k log-probs (no reconstruction: the teacher's block outputs are not cached)."""

    keeps_base = False  # the base loads for the precompute pass only

    def __init__(self, loss: Loss):
        check_cacheable(loss)
        self.selection = loss.selection()
        self.cache: TargetCache | None = None  # opened on first use

    def on_train_start(self, module: LightningModule) -> None:
        directory = module.resolve_targets_dir()
        rank = module.global_rank
        # Each rank caches the samples its own (distributed) sampler hands it; reruns reuse the cache.
        if not (directory / index_name(rank)).exists():
            self.precompute(module, module.trainer.train_dataloader, rank)
        module.trainer.strategy.barrier("caq_targets")
        self.cache = TargetCache(directory, *self.selection)

    @torch.no_grad()
    def precompute(self, module: LightningModule, batches: Iterable[dict[str, Tensor]], rank: int = 0) -> Path:
        """Run the teacher and the base once over ``batches`` and cache their top-k targets as ``rank``'s shards.

        The base is loaded for this pass only (and FSDP2-sharded like the student under ModelParallelStrategy).
        """
        hp, device = module.hparams, module.device
        base = None
        if self.selection.reads_base:  # kl_top caches the teacher alone
            base = load_model(hp.base, "base", DTYPES[hp.dtype], hp.trust_remote_code).to(device)
            distributed.shard(base, module.device_mesh)

        def base_logits(ids: Tensor, mask: Tensor) -> Tensor:
            return base(input_ids=ids.to(device), attention_mask=mask.to(device)).logits

        meta = {"teacher": hp.teacher, "base": hp.base, "dtype": hp.dtype}
        path = write_targets(
            lambda ids, mask: module.teacher_forward(ids.to(device), mask.to(device))[0],
            base_logits, progress(batches, "cached targets", unit="batch"), module.resolve_targets_dir(),
            self.selection, rank, meta,
        )  # fmt: skip
        base = None  # the base's weights go now, before the student-only steps
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the base's memory back to the device
        return path

    def terms(self, module: LightningModule, batch: dict[str, Tensor]) -> LossTerms:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if "index" not in batch:
            raise CAQError(
                "cached targets are joined on the batch's sample 'index': use caq_lightning.data.CalibrationData"
            )
        if self.cache is None:
            self.cache = TargetCache(module.resolve_targets_dir(), *self.selection)
        targets = self.cache.batch(batch["index"], ids)
        loss, student = module.objective, module.student
        if loss.renormalized:  # the student's logits at the cached ids (pull and push sets) are all it needs
            student_logits, targets = sparse_student_logits(student, ids, mask, targets)
        else:
            student_logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return loss(student_logits, targets, mask)


def target_source(kind: str, loss: Loss) -> LiveTargets | CachedTargets:
    """The strategy of ``targets.kind`` for ``loss``; cached refuses a loss it cannot serve."""
    return CachedTargets(loss) if kind == "cached" else LiveTargets()
