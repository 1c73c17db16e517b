"""What a CAQ checkpoint holds beyond Lightning's own state, and how a run resumes from it exactly.

- Only the trainable tensors (rotations, smoothing scales, clipping) and the transforms' buffers are stored. The frozen
  teacher/base weights are the model files on disk; at 8B they would add 16 GB per checkpoint. On load they are put
  back from the models the module was built with, after checking a fingerprint that the models are the same.
  (Sharding strategies load weights themselves before any hook runs: their sharded checkpoints keep everything.)
- The torch/numpy/python RNG states (Lightning does not save them).
- The block-schedule state (anchored blocks and which blocks quantize).
- The position in the calibration data: :class:`caq_lightning.data.ResumableLoader` skips the batches of the epoch
  already trained on.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy
from torch import nn

from caq_lightning.errors import CAQError

FINGERPRINT_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads",
)  # fmt: skip
FROZEN_PREFIXES = ("student.model.", "base.")


# ---- model fingerprint --------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module | None) -> dict[str, Any] | None:
    """Architecture fields plus a sha256 over every tensor the model holds (names, dtypes, shapes and bytes), taken
    before any sharding: a weight changed anywhere on disk, not only in the embeddings, makes another model."""
    if model is None:
        return None
    config = model.config
    fingerprint: dict[str, Any] = {k: getattr(config, k, None) for k in FINGERPRINT_FIELDS}
    weight = model.get_input_embeddings().weight
    fingerprint["dtype"] = str(weight.dtype).removeprefix("torch.")  # the same files loaded in another dtype differ
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        fingerprint["weights"] = None
        return fingerprint
    # hashlib releases the GIL on large buffers: one thread per tensor at a time spreads 16 GB over the cores
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(_tensor_digest, state.items())
        fingerprint["weights"] = hashlib.sha256(b"".join(digests)).hexdigest()[:16]
    return fingerprint


def _tensor_digest(item: tuple[str, torch.Tensor]) -> bytes:
    name, tensor = item
    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
    digest.update(data.view(torch.uint8).numpy())
    return digest.digest()


def _describe(name: str | None, fp: dict[str, Any] | None) -> str:
    if fp is None:
        return "no model"
    return (
        f"'{name}' ({fp['model_type']}, {fp['num_hidden_layers']} layers, hidden {fp['hidden_size']}, "
        f"vocab {fp['vocab_size']}, {fp.get('dtype')} weights {fp['weights']})"
    )


def check_fingerprint(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Raise if a checkpoint was written for other teacher/base models than the ones this module was built with."""
    if saved is None:
        raise CAQError(
            f"checkpoint {where} has no CAQ model fingerprint: it was not written by caq-lightning, start a fresh run"
        )
    for role in ("teacher", "base"):
        old, new = saved.get(role), current.get(role)
        if (old or {}).get("fingerprint") != (new or {}).get("fingerprint"):
            old_name, new_name = (old or {}).get("name"), (new or {}).get("name")
            old_fp, new_fp = (old or {}).get("fingerprint") or {}, (new or {}).get("fingerprint") or {}
            old_dtype, new_dtype = old_fp.get("dtype"), new_fp.get("dtype")
            if old_name == new_name and old_dtype and new_dtype and old_dtype != new_dtype:
                raise CAQError(
                    f"checkpoint {where} was made with the {role} '{old_name}' in {old_dtype}, but it is "
                    f"loaded in {new_dtype}: load it with dtype={old_dtype} (the run's "
                    "model.dtype), or start a fresh run in the other dtype"
                )
            if old_name == new_name and old and new:
                raise CAQError(
                    f"checkpoint {where} was made for {role} {_describe(old_name, old.get('fingerprint'))}, but "
                    f"its files now hold other weights ({_describe(new_name, new.get('fingerprint'))}): restore "
                    f"the {role} it was made for, or start a fresh run without --ckpt_path"
                )
            raise CAQError(
                f"checkpoint {where} was made for {role} {_describe(old_name, (old or {}).get('fingerprint'))}, "
                f"not {_describe(new_name, (new or {}).get('fingerprint'))}: resume with --model.{role}={old_name} "
                "or start a fresh run without --ckpt_path"
            )


# ---- trainable-only state dict -----------------------------------------------------------------------------------


def frozen_keys(module: nn.Module, state_dict: dict[str, Any]) -> list[str]:
    """Keys of the frozen teacher/base weights: everything under the HF models that is not a trainable parameter."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return [k for k in state_dict if k.startswith(FROZEN_PREFIXES) and k not in trainable]


def restore_frozen(module: nn.Module, checkpoint: dict[str, Any], where: str) -> None:
    """Put the module's own frozen weights back into ``checkpoint["state_dict"]`` so strict loading succeeds."""
    state = checkpoint["state_dict"]
    own = module.state_dict()
    for key in frozen_keys(module, own):
        state.setdefault(key, own[key])
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes))
            if keys
        )
        raise CAQError(
            f"checkpoint {where} holds other transforms than this model ({detail}): resume with the same "
            "--model settings (bits, group sizes, rotate_*, smooth, learn_w_clip) or start a fresh run"
        )


# ---- RNG -----------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and python RNG states, as tensors and tuples that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the hooks CAQModule calls -------------------------------------------------------------------------------------


def _where(module) -> str:
    trainer = module._trainer
    path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    return f"'{path}'" if path else "(loaded)"


def _module_loads_state(module) -> bool:
    # Sharding strategies (FSDP, FSDP2, DeepSpeed) load the weights themselves, strictly, before on_load_checkpoint
    # could put the frozen ones back: their (already sharded) checkpoints keep everything.
    trainer = module._trainer
    return trainer is None or type(trainer.strategy).load_model_state_dict is Strategy.load_model_state_dict


def save_state(module, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: drop the frozen weights, add fingerprint, RNG and block-schedule state."""
    state = checkpoint.get("state_dict")
    if state is not None and _module_loads_state(module):
        for key in frozen_keys(module, state):
            del state[key]
    checkpoint["caq_fingerprint"] = module.fingerprint
    checkpoint["caq_rng"] = rng_state()
    blocks = module.recon_blocks
    checkpoint["caq_schedule"] = {
        "recon_blocks": None if blocks is None else sorted(blocks),
        "quantize": [m.quantize for m in getattr(module.student, "layer_modes", [])],
    }


def load_state(module, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: check the fingerprint, put the frozen weights back, restore RNG and schedule."""
    where = _where(module)
    check_fingerprint(checkpoint.get("caq_fingerprint"), module.fingerprint, where)
    if "state_dict" in checkpoint:  # absent when a sharding strategy loaded the weights itself
        restore_frozen(module, checkpoint, where)
    schedule = checkpoint.get("caq_schedule") or {}
    if "recon_blocks" in schedule:
        blocks = schedule["recon_blocks"]
        module.recon_blocks = None if blocks is None else set(blocks)
    for mode, quantize in zip(getattr(module.student, "layer_modes", []), schedule.get("quantize", [])):
        mode.quantize = quantize
    if module._trainer is not None and "caq_rng" in checkpoint:  # resuming a fit, not just loading weights
        set_rng_state(checkpoint["caq_rng"])


def last_checkpoint(trainer) -> str | None:
    """The newest checkpoint this run has written (the one to resume from), or None."""
    paths = []
    for callback in getattr(trainer, "checkpoint_callbacks", []) if trainer is not None else []:
        paths += [callback.last_model_path, callback.best_model_path]
    existing = [p for p in paths if p and Path(p).exists()]
    return max(existing, key=lambda p: Path(p).stat().st_mtime) if existing else None


def divergence_error(trainer, step: int, terms: dict[str, float], problem: str, fix: str) -> CAQError:
    """The one-line error that stops a diverged run (raised in a step, it ends fit before any export is written)."""
    values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    ckpt = last_checkpoint(trainer)
    last = f"last good checkpoint: {ckpt}" if ckpt else "no checkpoint was written before it"
    return CAQError(f"{problem} at step {step} ({values}): {fix}; {last}; no export was written")


def save_final_checkpoint(trainer) -> str | None:
    """Write the final trainable state to the run's ``last.ckpt`` (in the first ModelCheckpoint's directory) and
    return its path; nothing when ModelCheckpoint already saved this step or checkpointing is off.

    A collective under DDP: every rank calls it, rank 0 writes.
    """
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    if not callbacks or trainer.global_step == 0:
        return None
    callback = callbacks[0]
    if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
        return callback.last_model_path or callback.best_model_path or None
    path = callback.last_model_path  # this run's (or the resumed run's) last.ckpt is replaced, as Lightning does
    if not path:
        stem = Path(callback.dirpath) / ModelCheckpoint.CHECKPOINT_NAME_LAST
        candidates = (Path(f"{stem}{'' if v == 0 else f'-v{v}'}{callback.FILE_EXTENSION}") for v in range(10**6))
        path = str(next(p for p in candidates if not p.exists()))  # an earlier run's last.ckpt stays, as in Lightning
    path = trainer.strategy.broadcast(path)
    if trainer.is_global_zero and Path(path).is_symlink():  # save_last="link": replace the link, not its target
        Path(path).unlink()
    trainer.save_checkpoint(path)
    callback.last_model_path = path
    return path


def check_readable(path: str, fix: str = "resume from another .ckpt in the same directory") -> dict[str, Any]:
    """The checkpoint at ``path``; a one-line error if it is missing or cannot be read (truncated, pickled objects,
    not a checkpoint)."""
    if not Path(path).is_file():
        raise CAQError(f"checkpoint '{path}' does not exist: pass an existing .ckpt file or --ckpt_path last")
    try:  # CAQ checkpoints hold only the transforms, so reading one twice costs little
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
        raise CAQError(
            f"checkpoint '{path}' is truncated or not a torch checkpoint ({str(err).splitlines()[0][:100]}): {fix}"
        ) from None
    check_settings_layout(checkpoint, f"'{path}'")
    return checkpoint


def check_settings_layout(checkpoint: dict[str, Any], where: str) -> None:
    """Raise for a checkpoint of the flat settings layout (w_bits, loss, ... directly in its hyper_parameters)."""
    saved = checkpoint.get("hyper_parameters") or {}
    if saved and "quant" not in saved and ("w_bits" in saved or "loss" in saved):
        raise CAQError(
            f"checkpoint {where} holds the flat settings of an earlier caq-lightning (before model.quant/loss/optim/"
            "targets), which this version cannot load: calibrate again with the grouped settings"
        )


def check_model_names(checkpoint: dict[str, Any], teacher: str, base: str | None, where: str) -> None:
    """Raise if the config names other models than the checkpoint (Lightning would silently use the checkpoint's)."""
    saved = checkpoint.get("hyper_parameters") or {}
    for role, name in (("teacher", teacher), ("base", base)):
        if role in saved and saved[role] != name:
            raise CAQError(
                f"checkpoint {where} was made for {role} '{saved[role]}', but the config says '{name}': "
                f"pass --model.{role}={saved[role]} to resume it, or start a fresh run without --ckpt_path"
            )


# ---- writing -------------------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoints, written to a temporary file in the checkpoint's own directory, fsynced,
    then renamed over the target: the rename is atomic there, so a crash or a full disk never leaves a truncated
    ``last.ckpt`` (Lightning's own temporary file is in /tmp, and across file systems its move is a copy).

    A full disk (ENOSPC, EDQUOT) is one CAQError that names the checkpoint kept and how to finish. The CLI wires
    this in unless the config names its own CheckpointIO; remote (fsspec) paths keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # CAQ checkpoints hold only the transforms: small enough to serialize in memory
        torch.save(checkpoint, buffer)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a checkpoint gets the usual permissions
            os.replace(tmp, target)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CAQError(no_space_message(target)) from None
            raise


def no_space_message(target: Path) -> str:
    """What a full disk while writing ``target`` kept, and how to finish the run."""
    found = [p for p in target.parent.glob("*.ckpt") if p.is_file()]
    kept = max(found, key=lambda p: p.stat().st_mtime, default=None)
    where = f"no space left on device while writing checkpoint {target} (nothing half-written was left)"
    if kept is None:
        return f"{where}; no earlier checkpoint was kept: free space in {target.parent}, then start the run again"
    return (
        f"{where}; the newest complete checkpoint {kept} was kept: free space in {target.parent}, then resume "
        f"with --ckpt_path last, or export it with python -m caq_lightning.export --ckpt {kept} --out DIR"
    )
