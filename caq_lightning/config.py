"""The CAQModule's settings in four typed groups (YAML ``model.quant.*``, ``model.loss.*``, ``model.optim.*``,
``model.targets.*``), each validated on construction, as litgpt's ``TrainArgs``/``EvalArgs`` are."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

from caq_lightning.errors import CAQError
from caq_lightning.losses import LOSSES, PUSH_BOUNDS, PUSH_TOPK_BY, RECON_FORMS, Loss
from caq_lightning.quant.quantizer import QuantSpec

# The choices, as Literal types (jsonargparse checks them on the command line) built from the one list of each.
LossName = Literal[tuple(LOSSES)]
PushBound = Literal[PUSH_BOUNDS]
PushTopkBy = Literal[PUSH_TOPK_BY]
ReconForm = Literal[RECON_FORMS]
LrSchedule = Literal["cosine", "constant"]
WeightRounding = Literal["gptq", "rtn"]
WeightTraining = Literal["fp", "rtn"]
GptqHessians = Literal["sequential", "one_pass"]
WeightClipSearch = Literal["none", "mse"]
Profile = Literal["full", "serve"]
TargetsKind = Literal["live", "cached"]


def check_non_negative(name: str, value: float, fix: str) -> None:
    """Raise unless ``value`` is a finite number >= 0 (NaN fails every comparison, so it gets its own message)."""
    if not math.isfinite(value):
        raise CAQError(f"{name}={value} is not a finite number: {fix}")
    if value < 0:
        raise CAQError(f"{name}={value} is negative: {fix}")


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise unless ``value`` is one of the Literal type ``choices``."""
    allowed = get_args(choices)
    if value not in allowed:
        raise CAQError(f"unknown {name} '{value}': choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class QuantConfig:
    """Bits, granularity and transforms of the student. ``*_bits=16`` leaves that tensor in full precision."""

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    w_group_size: int = 0  # quantization group along the last dim (0 = per row)
    a_group_size: int = 0
    kv_group_size: int = 0
    w_symmetric: bool = True
    a_symmetric: bool = False
    kv_symmetric: bool = False
    a_clip_ratio: float = 1.0  # fixed clipping of the dynamic activation / KV ranges
    kv_clip_ratio: float = 1.0
    learn_w_clip: bool = True  # learnable per-channel weight clipping, from w_clip_init
    w_clip_init: float = 0.98
    rotate_residual: bool = True  # R1, initialised from a random Hadamard
    rotate_head: bool = True  # R2, per head on values/outputs
    smooth: bool = True  # smoothing scales norm->qkv, norm->up/gate, up->down, v->o
    online_hadamard: bool = True  # R4 before down_proj, and R3 on q/k after RoPE unless online_r3 says otherwise
    online_r3: bool | None = None  # R3 alone; None follows online_hadamard
    rotation_seed: int = 0
    w_rounding: WeightRounding = "gptq"  # how the export rounds the folded weights: GPTQ on calibration data, or RTN
    w_train: WeightTraining = "fp"  # weights during calibration: full precision (as AAQ trains) or fake-quant RTN
    gptq_hessians: GptqHessians = "sequential"  # each layer's inputs come from the already-rounded layers before it
    gptq_act_order: bool = True  # GPTQ takes columns by decreasing Hessian diagonal (desc_act; static groups)
    # mse: GPTQ searches each row's (group's) clip for the least |W - Q(W)|^2.4, replacing the learned clip; none
    # keeps it. RTN rounding always keeps the student's clip, so an RTN fold computes what the student computed
    w_clip_search: WeightClipSearch = "mse"
    # full: every option above. serve: only what the compressed-tensors W4A4/W4A8 formats (vLLM) express, with
    # their activation scale rule (absmax / ((2^b - 1) / 2)); see serving_problem and docs/serve.md
    profile: Profile = "full"

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            if not 2 <= getattr(self, name) <= 16:
                raise CAQError(
                    f"{name}={getattr(self, name)} is outside 2-16: use 2..8 to quantize or 16 for full precision"
                )
        check_choice("quant.w_rounding", self.w_rounding, WeightRounding)
        check_choice("quant.w_train", self.w_train, WeightTraining)
        check_choice("quant.gptq_hessians", self.gptq_hessians, GptqHessians)
        check_choice("quant.w_clip_search", self.w_clip_search, WeightClipSearch)
        check_choice("quant.profile", self.profile, Profile)
        if self.profile == "serve" and (problem := serving_problem(self)):
            raise CAQError(f"profile=serve: {problem}")

    @property
    def trains_w_quant(self) -> bool:
        """Whether calibration sees fake-quantized weights (and learns their clip)."""
        return self.w_spec.enabled and self.w_train == "rtn"

    @property
    def hadamard_qk(self) -> bool:
        """Whether R3 (the online Hadamard on q and k after RoPE) is on."""
        return self.online_hadamard if self.online_r3 is None else self.online_r3

    @property
    def w_spec(self) -> QuantSpec:
        return QuantSpec(self.w_bits, self.w_symmetric, self.w_group_size)

    @property
    def a_spec(self) -> QuantSpec:
        rule = "half_range" if self.profile == "serve" else "qmax"
        return QuantSpec(self.a_bits, self.a_symmetric, self.a_group_size, self.a_clip_ratio, rule)

    @property
    def kv_spec(self) -> QuantSpec:
        return QuantSpec(self.kv_bits, self.kv_symmetric, self.kv_group_size, self.kv_clip_ratio)


def serving_problem(quant: QuantConfig) -> str | None:
    """What keeps a student from the serving formats (compressed-tensors W4A4/W4A8 as vLLM runs them), as the
    setting to change, or None. vLLM has no transform after RoPE (R3) and no int KV cache; its int kernels take
    symmetric 4-bit weights and symmetric dynamic per-token activations of 4 or 8 bits."""
    if quant.w_bits != 4 or not quant.w_symmetric:
        return (
            f"the serving formats hold symmetric 4-bit weights, not w_bits={quant.w_bits} "
            f"w_symmetric={quant.w_symmetric}: set w_bits=4 and w_symmetric=true"
        )
    if quant.a_bits not in (4, 8):
        return f"the serving formats quantize activations to 4 or 8 bits, not a_bits={quant.a_bits}: set a_bits=4 or 8"
    if not quant.a_symmetric:
        return "vLLM's int kernels take symmetric activations: set a_symmetric=true"
    if quant.a_group_size:
        return "the serving formats quantize activations per token, not in groups: set a_group_size=0"
    if quant.a_clip_ratio != 1.0:
        return "dynamic activation ranges are not clipped in the serving formats: set a_clip_ratio=1.0"
    if quant.kv_bits != 16:
        return (
            f"vLLM keeps the KV cache in 16 bits or fp8 with its own scales, not kv_bits={quant.kv_bits}: "
            "set kv_bits=16"
        )
    if quant.hadamard_qk:
        return "vLLM has no transform after RoPE, so R3 cannot be served: set online_r3=false"
    return None


@dataclass(frozen=True)
class LossConfig:
    """The objective: ``recon_weight * recon + kl_weight * (KL(teacher || student) + push)``; see docs/losses.md's
    table for the variants (:data:`caq_lightning.losses.LOSSES`). ``lambda_push``/``top_k``/``push_top_k`` = None
    take the variant's class defaults (the paper's 0.75 / 500 / 500 for cal_paper and kl_top, 0.3 / 64 for the
    others): see :meth:`resolved`."""

    name: LossName = "cal_full"
    lambda_push: float | None = None  # weight of the push away from the base (>= 0)
    top_k: int | None = None  # tokens of the (pull) top-k set
    push_top_k: int | None = None  # cal_paper's push set size k'
    push_topk_by: PushTopkBy = "disagree"
    topk_renormalize: bool = True  # cal_paper/kl_top only; False = AAQ's --post_attn=True partial sums
    push_bound: PushBound = "none"  # none: -lambda*KL, clamp: -lambda*min(KL, push_margin), margin: hinge
    push_margin: float = 1.0  # nats
    kl_weight: float = 1.0
    recon_weight: float = 1.0  # block reconstruction loss (0 disables it)
    recon: ReconForm = "relative"  # relative: ||s - t||^2 / ||t||^2 per token (scale-free); mse: absolute

    def __post_init__(self) -> None:
        if self.name not in LOSSES:  # the registry, not LossName: a variant registered later is a choice too
            raise CAQError(f"unknown loss '{self.name}': choose one of {', '.join(LOSSES)}")
        settings = self.variant.resolve(self.lambda_push, self.top_k, self.push_top_k)
        check_non_negative("lambda_push", settings["lambda_push"], "use lambda_push >= 0 (0 = KL-only)")
        check_non_negative("kl_weight", self.kl_weight, "use kl_weight >= 0 (a negative weight makes the KL climb)")
        check_non_negative("recon_weight", self.recon_weight, "use recon_weight >= 0 (0 disables the term)")
        check_non_negative("push_margin", self.push_margin, "use push_margin >= 0 (nats)")
        if settings["top_k"] < 1:
            raise CAQError(f"top_k={self.top_k} must be >= 1")
        if settings["push_top_k"] is not None and settings["push_top_k"] < 1:
            raise CAQError(f"push_top_k={self.push_top_k} must be >= 1")
        check_choice("push_topk_by", self.push_topk_by, PushTopkBy)
        check_choice("push_bound", self.push_bound, PushBound)
        check_choice("recon", self.recon, ReconForm)
        if not self.topk_renormalize and self.variant.renormalize is not None:
            raise CAQError(
                f"topk_renormalize=false applies to cal_paper/kl_top, not loss '{self.name}': "
                "use loss=cal_topk_partial for the partial-sum form of the shared-set loss"
            )

    def resolved(self) -> LossConfig:
        """The same settings with every None replaced by the variant's default: the values in effect."""
        return replace(self, **self.variant.resolve(self.lambda_push, self.top_k, self.push_top_k))

    @property
    def variant(self) -> type[Loss]:
        return LOSSES[self.name]

    def build(self) -> Loss:
        """The loss object these settings describe."""
        return self.variant(
            self.lambda_push, self.top_k, self.push_top_k, self.push_topk_by, self.topk_renormalize, self.push_bound,
            self.push_margin, self.kl_weight, self.recon_weight,
        )  # fmt: skip


@dataclass(frozen=True)
class OptimConfig:
    """AdamW learning rates of rotations, smoothing scales and clipping factors, and their schedule."""

    lr_rotation: float = 1.5e-3
    lr_scale: float = 5e-3
    lr_clip: float = 5e-3
    lr_schedule: LrSchedule = "cosine"  # cosine: to 0 over the run

    def __post_init__(self) -> None:
        for name in ("lr_rotation", "lr_scale", "lr_clip"):
            fix = f"use {name} >= 0 (0 freezes that group; a negative rate climbs the loss)"
            check_non_negative(name, getattr(self, name), fix)
        check_choice("lr_schedule", self.lr_schedule, LrSchedule)


@dataclass(frozen=True)
class TargetsConfig:
    """Where the frozen models' outputs come from. ``live``: run teacher and base every step. ``cached``: their
    top-k log-probs are precomputed once per rank at the start of fit, then only the student runs (needs a top-k
    loss and recon_weight=0; see :mod:`caq_lightning.targets`)."""

    kind: TargetsKind = "live"
    dir: str | None = None  # default <trainer.default_root_dir>/targets; reused if present

    def __post_init__(self) -> None:
        check_choice("targets.kind", self.kind, TargetsKind)


GROUPS = {"quant": QuantConfig, "loss": LossConfig, "optim": OptimConfig, "targets": TargetsConfig}
# keys of the flat layout before the groups (model.<old>) that are not simply model.<group>.<old>
RENAMED = {"loss": "loss.name", "targets": "targets.kind", "targets_dir": "targets.dir"}


def new_key(flat: str) -> str | None:
    """The grouped key (``quant.w_bits``) of a flat CAQModule setting (``w_bits``), or None if there is none."""
    if flat in RENAMED:
        return RENAMED[flat]
    for group, cls in GROUPS.items():
        if flat in {f.name for f in fields(cls)}:
            return f"{group}.{flat}"
    return None


def as_group(cls: type, value: Any) -> Any:
    """A settings group from itself, a dict (as stored in a checkpoint's hparams) or None (the defaults)."""
    if isinstance(value, cls):
        return value
    return cls(**(value or {}))


def group_settings(**settings: Any) -> dict[str, Any]:
    """CAQModule keyword arguments from settings by their own names (``w_bits=3, loss="kl", lr_rotation=0.1``), as
    scripts that tabulate settings hold them: each one goes into its group under its grouped name; teacher, base,
    dtype, rtn_kl_every and trust_remote_code stay as they are."""
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        if (new := new_key(key)) is None:
            top[key] = value
        else:
            group, name = new.split(".")
            groups.setdefault(group, {})[name] = value
    return {**top, **{group: GROUPS[group](**values) for group, values in groups.items()}}
