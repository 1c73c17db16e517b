"""Cached targets: run the frozen teacher and base once, keep their top-k log-probs, calibrate with the student alone.

A precompute pass writes, per rank, safetensors shards ``targets-rank{r}-{i}.safetensors`` with one row per
calibration sample (keyed by the sample's ``index`` from :class:`caq_lightning.data.TokenDataset`):

    sample     (n,)       long   the calibration sample index (the join key)
    input_ids  (n, T)     int32  the tokens the targets were computed on (checked on every lookup)
    index      (n, T, k)  int32  vocab ids chosen by :func:`caq_lightning.losses.select_topk` (the pull set)
    teacher_logp (n, T, k) fp32  full-vocab teacher log-probs gathered at ``index``
    push_index (n, T, k') int32  cal_paper only: its push set (:func:`caq_lightning.losses.select_split_topk`)
    base_logp  (n, T, k') fp32   full-vocab base log-probs at ``push_index`` (at ``index`` without one; absent for
                                 kl_top, which needs no base)

and a small ``targets-rank{r}.json`` (k, selection, push set, fields, model names, sample count, shard list),
written last, so its presence means the rank's shards are complete. Because the stored log-probs are full-vocab
ones, the renormalised and the partial-sum forms of every top-k loss are exact on cached targets. Full-vocabulary
losses (``kl``, ``cal_full``) need live frozen models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from caq_lightning.errors import CAQError
from caq_lightning.losses import LOSSES, TopkTargets, select_split_topk, select_topk

# loss variant -> how its (pull) top-k ids are chosen; only these variants can run on cached targets
CACHEABLE = {name: v.pull for name, v in LOSSES.items() if v.cacheable}
FIELDS = ("input_ids", "index", "teacher_logp", "base_logp", "push_index")  # TopkTargets' order after input_ids


def selection(loss: str, top_k: int, push_top_k: int | None = None, push_topk_by: str | None = None) -> dict:
    """What a cache for ``loss`` must hold: {"k", "by", "push_k", "push_by"}.

    push_by is "same" for the shared-set variants (base log-probs at the pull ids), "none" for kl_top (no base).
    """
    v = LOSSES[loss]
    if v.push == "own":
        return {"k": top_k, "by": v.pull, "push_k": push_top_k, "push_by": push_topk_by}
    if v.push == "none":
        return {"k": top_k, "by": v.pull, "push_k": 0, "push_by": "none"}
    return {"k": top_k, "by": v.pull, "push_k": top_k, "push_by": "same"}


def _describe(sel: dict) -> str:
    text = f"k={sel['k']} by={sel['by']}"
    return text if sel["push_by"] == "same" else f"{text} push_k={sel['push_k']} push_by={sel['push_by']}"


def shard_name(rank: int, i: int) -> str:
    return f"targets-rank{rank}-{i}.safetensors"


def index_name(rank: int) -> str:
    return f"targets-rank{rank}.json"


def check_cacheable(loss: str, recon_weight: float) -> None:
    """Raise unless ``loss`` and ``recon_weight`` can run on cached top-k targets."""
    if loss not in CACHEABLE:
        raise CAQError(
            f"loss '{loss}' uses the full vocabulary, which cached top-k targets do not hold: "
            f"use targets.kind=live or one of {', '.join(CACHEABLE)}"
        )
    if recon_weight > 0:
        raise CAQError(
            f"recon_weight={recon_weight} needs the teacher's block outputs every step, which are not cached: "
            "set loss.recon_weight=0 with targets.kind=cached, or use targets.kind=live"
        )


def topk_targets(
    teacher_logits: Tensor, base_logits: Tensor | None, k: int, by: str, push_k: int | None = None,
    push_by: str = "same",
) -> TopkTargets:
    """The top-k targets of one batch from live logits (B, T, V), chosen as :func:`selection` describes them."""
    if push_by == "same":
        return select_topk(teacher_logits, base_logits, k, by=by)
    return select_split_topk(teacher_logits, None if push_by == "none" else base_logits, k, push_k, push_by)


@torch.no_grad()
def write_targets(
    teacher: Callable[[Tensor, Tensor], Tensor],
    base: Callable[[Tensor, Tensor], Tensor] | None,
    batches: Iterable[dict[str, Tensor]],
    directory: str | Path,
    k: int,
    by: str,
    rank: int = 0,
    meta: dict | None = None,
    samples_per_shard: int = 64,
    push_k: int | None = None,
    push_by: str = "same",
) -> Path:
    """Run ``teacher`` and ``base`` (input_ids, attention_mask -> logits (B, T, V)) once over ``batches`` and cache
    their top-k targets for this rank. Batches are dicts with ``input_ids``/``attention_mask`` (B, T) and ``index``
    (B,). ``push_by``: "same" (base log-probs at the k pull ids), "disagree"/"base" (cal_paper's separate push set of
    ``push_k`` ids) or "none" (no base: kl_top; ``base`` may be None). Returns the path of the rank's json index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
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
        base_logits = None if push_by == "none" else base(ids, mask)
        targets = topk_targets(teacher(ids, mask), base_logits, k, by, push_k, push_by)
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
    push = {"push_k": k if push_by == "same" else (push_k or 0), "push_by": push_by}
    index = {"k": k, "by": by, **push, "fields": fields, "rank": rank, "num_samples": count, **(meta or {}),
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
    kl_top, the push set: ``push_k``, ``push_by`` as in :func:`selection`).
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


@contextmanager
def sparse_head(student: nn.Module, index: Tensor) -> Iterator[None]:
    """Within the block, ``student(...).logits`` are the student's logits at ``index`` (B, T, k) only.

    The student must be in its student mode (transforms on); the swap is undone on exit.
    """
    model, adapter = student.model, student.adapter
    head = adapter.lm_head(model)
    if getattr(head, "w_quant", None) is not None or getattr(head, "a_quant", None) is not None:
        raise CAQError("the sparse head needs an unquantized lm_head: use targets.kind=live")
    if not student.global_mode.transform:
        raise CAQError("the sparse head computes student logits: call it in the student's mode (transform on)")
    adapter.set_lm_head(model, SparseHead(head, index))
    try:
        yield
    finally:
        adapter.set_lm_head(model, head)
