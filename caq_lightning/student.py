"""The CAQ student: the aligned model itself, with transforms and fake quantizers wrapped around its modules.

The teacher is the *same* module tree run in ``Mode(transform=False, quant=False)``: every wrapper then calls the
original module untouched, so one copy of the weights serves both. Where a module sits in the model is the
family's :class:`~caq_lightning.models.DecoderAdapter`'s business; :func:`caq_lightning.fold.fold` reads what it
needs through :meth:`QuantLinear.fold_spec` and :meth:`TransformNorm.fold_weight`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from caq_lightning.errors import CAQError
from caq_lightning.config import QuantConfig
from caq_lightning.models import get_adapter
from caq_lightning.models.adapter import ProjectionRole
from caq_lightning.quant.attention import use_caq_attention
from caq_lightning.quant.hadamard import online_r4, random_hadamard
from caq_lightning.quant.mode import Mode
from caq_lightning.quant.quantizer import ActQuantizer, WeightQuantizer, fake_quantize
from caq_lightning.quant.transforms import LayerTransforms, Rotation, input_side

__all__ = ["CAQStudent", "FoldSpec", "Mode", "QuantConfig", "QuantLinear", "StudentView", "TransformNorm"]


def full_precision(like: Tensor) -> torch.autocast:
    """Autocast off on ``like``'s device: under bf16-mixed the forward matmuls run in bf16, the transform algebra
    (R1/R2, smoothing, the folded weights before quantization) stays fp32, as the export computes it."""
    return torch.autocast(device_type=like.device.type, enabled=False)


class FoldSpec(NamedTuple):
    """What folding needs from one Linear of the student, in the current mode."""

    weight: Tensor  # (out, in) fp32 with the transforms folded in, before weight quantization
    bias: Tensor | None  # (out,) fp32
    clip: Tensor | float  # the learned weight clip, (out, G, 1) or 1.0 (none); unused for the head
    quantized: bool  # a decoder Linear (weights go on the integer grid), or the head (kept in the model dtype)


class _Ref:
    """Holds a module without registering it, so shared modules are not duplicated in the state dict."""

    def __init__(self, module: nn.Module | None):
        self.module = module


class QuantLinear(nn.Module):
    """A decoder Linear of the student: transformed weight, fake-quantized weight and input."""

    def __init__(
        self,
        linear: nn.Linear,
        role: str,
        transforms: LayerTransforms | None,
        norm: nn.Module | None,
        student: CAQStudent,
        w_quant: WeightQuantizer | None,
        a_quant: ActQuantizer | None,
        mode: Mode | None = None,
        projection: ProjectionRole | None = None,
    ):
        super().__init__()
        self.linear = linear
        self.mode = student.global_mode if mode is None else mode  # its decoder block's (the student's for the head)
        self.role = role  # the projection's name (q_proj, ..., lm_head)
        self.projection = projection  # its part in the transforms; None for the head
        self.w_quant = w_quant
        self.a_quant = a_quant
        self._transforms = _Ref(transforms)
        self._norm = _Ref(norm)
        self._student = _Ref(student)
        self._frozen: tuple[Tensor, Tensor | None] | None = None  # set by CAQStudent.frozen_weights()

    def effective_weight(self) -> tuple[Tensor, Tensor | None]:
        """(W', b') in fp32 for the current transforms, before weight quantization."""
        student: CAQStudent = self._student.module
        g = None if self._norm.module is None else student.adapter.norm_kind.scale(self._norm.module)
        r1 = student.r1_matrix()
        w, b = self.linear.weight, self.linear.bias
        if self._transforms.module is None:  # lm_head: fuse the final norm and rotate, never quantized
            return input_side(w, g, r1, None), None if b is None else b.float()
        return self._transforms.module.weight(self.projection, w, b, g, r1)

    def fold_spec(self) -> FoldSpec:
        """The folded weight, bias and learned clip of this Linear, in the current mode."""
        w, b = self.effective_weight()
        clip = 1.0 if self.w_quant is None else self.w_quant.clip()
        return FoldSpec(w, b, clip, self.projection is not None)

    def quantized_weight(self) -> tuple[Tensor, Tensor | None]:
        """The weight (and bias) this layer computes with in the current mode."""
        if self._frozen is not None:
            return self._frozen
        mode = self.mode
        if mode.transform:
            with full_precision(self.linear.weight):
                w, b = self.effective_weight()
                if mode.quant and self.w_quant is not None and self._student.module.config.trains_w_quant:
                    w = self.w_quant(w)  # with w_train=fp the weights stay FP: the export rounds them (GPTQ)
            return w, b
        w, b = self.linear.weight, self.linear.bias
        if mode.quant and self.w_quant is not None:
            w = fake_quantize(w, self.w_quant.spec)  # plain RTN: no learned clipping without transforms
        return w, b

    def head_input(self, x: Tensor) -> Tensor:
        """The head's input taken back to the teacher's basis, fp32: (x R1^T) diag(g), with g the final norm's weight.

        (x R1^T diag(g)) W^T = x (W diag(g) R1)^T: a (D, D) product per token instead of folding R1 into the (V, D)
        head weight every step (the head is never quantized, so nothing needs the folded weight in training).
        """
        with full_precision(x):
            r1 = self._student.module.r1_matrix()
            u = x.float() if r1 is None else x.float() @ r1.T
            student = self._student.module
            return u * student.adapter.norm_kind.scale(self._norm.module).float()  # the final norm's weight, fused

    def forward(self, x: Tensor) -> Tensor:
        mode = self.mode
        if not (mode.transform or mode.quant):
            return self.linear(x)
        if self.projection is None and mode.transform and self._frozen is None:  # the head in training
            b = self.linear.bias
            bias = None if b is None else b.to(x.dtype)
            return F.linear(self.head_input(x).to(x.dtype), self.linear.weight.to(x.dtype), bias)
        w, b = self.quantized_weight()
        online_r4 = self.projection is not None and self.projection.online_r4
        if mode.transform and online_r4 and self._student.module.config.online_hadamard:
            x = self._student.module.r4(x)  # R4
        if mode.quant and self.a_quant is not None:
            x = self.a_quant(x)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


class TransformNorm(nn.Module):
    """A decoder norm whose per-channel factor moves into the next Linears; in transform mode it outputs the
    normalised input divided by its smoothing scale, (x / rms) / s for RMSNorm (the adapter's ``norm_kind``)."""

    def __init__(self, norm: nn.Module, transforms: LayerTransforms | None, name: str, student: CAQStudent):
        super().__init__()
        self.norm = norm
        self.name = name
        self._transforms = _Ref(transforms)
        self._student = _Ref(student)

    @property
    def weight(self) -> Tensor:
        return self.norm.weight

    def forward(self, x: Tensor) -> Tensor:
        student = self._student.module
        if not student.global_mode.transform:
            return self.norm(x)
        dtype = x.dtype
        h = student.adapter.norm_kind.normalize(self.norm, x)
        s = self.divisor()
        if s is not None:
            h = h / s
        return h.to(dtype)

    def divisor(self) -> Tensor | None:
        """The smoothing scale dividing this norm's output (its weight moves into the next Linears), or None."""
        transforms = self._transforms.module
        return None if transforms is None else transforms.smoothing(self._student.module.adapter.norms[self.name])

    def fold_weight(self) -> Tensor:
        """The weight this norm keeps after folding, fp32 (for RMSNorm: 1 / s, or ones without smoothing)."""
        return self._student.module.adapter.norm_kind.folded_weight(self.norm, self.divisor())


class CAQStudent(nn.Module):
    """Wraps a LLaMA/Qwen2/Mistral causal LM in place. ``forward`` is the model's own forward.

    Trainable: R1, each block's R2 and smoothing scales, and the weight-clipping logits. Everything else is frozen.
    """

    def __init__(self, model: PreTrainedModel, config: QuantConfig):
        super().__init__()
        self.config = config
        self.adapter = get_adapter(model.config)
        self.dims = self.adapter.dims(model.config)
        self.global_mode = Mode()
        # One mode per decoder block, so a block schedule can keep later blocks in full precision.
        self.layer_modes = [Mode(follows=self.global_mode) for _ in self.adapter.layers(model)]
        model.requires_grad_(False)
        self.model = model
        self._check_dims()

        d = self.dims["hidden"]
        self.r1 = Rotation(random_hadamard(d, config.rotation_seed)) if config.rotate_residual else None
        self.r4 = online_r4(config.profile)  # x @ H4 before down_proj
        self.layer_transforms = nn.ModuleList(
            LayerTransforms(
                self.dims, self.adapter.smoothing, config.rotate_head, config.smooth, config.online_hadamard, self.r4
            )
            for _ in self.adapter.layers(model)
        )
        self._wrap(model)
        use_caq_attention(model, config.kv_spec, config.hadamard_qk, self.global_mode)
        for layer, mode in zip(self.adapter.layers(model), self.layer_modes):
            self.adapter.attention(layer).caq_attn.mode = mode
        self._captured: list[Tensor] | None = None
        self._capture_layers: set[int] | None = None
        for i, layer in enumerate(self.adapter.layers(model)):
            layer.register_forward_hook(self._capture_hook(i))

    def _check_dims(self) -> None:
        cfg = self.config
        for name, n in (("a_group_size", cfg.a_group_size), ("w_group_size", cfg.w_group_size)):
            for dim in (self.dims["hidden"], self.dims["intermediate"], self.dims["heads"] * self.dims["head_dim"]):
                if n and dim % n:
                    raise CAQError(f"{name}={n} does not divide the model dimension {dim}: pick a divisor or 0")
        if cfg.kv_group_size and self.dims["head_dim"] % cfg.kv_group_size:
            raise CAQError(
                f"kv_group_size={cfg.kv_group_size} does not divide head_dim={self.dims['head_dim']}: pick a divisor or 0"
            )

    def _wrap(self, model: PreTrainedModel) -> None:
        cfg, adapter = self.config, self.adapter
        for layer, transforms, mode in zip(adapter.layers(model), self.layer_transforms, self.layer_modes):
            norms = {}
            for name in adapter.norms:
                norms[name] = TransformNorm(adapter.norm(layer, name), transforms, name, self)
                adapter.set_norm(layer, name, norms[name])
            for name, role in adapter.projections.items():
                linear = adapter.projection(layer, name)
                w_quant = None
                if cfg.w_spec.enabled:
                    w_quant = WeightQuantizer(
                        cfg.w_spec, linear.out_features, linear.in_features, cfg.learn_w_clip, cfg.w_clip_init
                    )
                    if w_quant.clip_logit is not None and not cfg.trains_w_quant:
                        w_quant.clip_logit.requires_grad_(False)  # unused in FP-weight training (DDP needs no grad)
                a_quant = ActQuantizer(cfg.a_spec) if cfg.a_spec.enabled else None
                norm = None if role.fused_norm is None else norms[role.fused_norm].norm
                wrapped = QuantLinear(linear, name, transforms, norm, self, w_quant, a_quant, mode, role)
                adapter.set_projection(layer, name, wrapped)
        final_norm = TransformNorm(adapter.final_norm(model), None, adapter.final_norm_name, self)
        adapter.set_final_norm(model, final_norm)
        head = QuantLinear(adapter.lm_head(model), adapter.head_name, None, final_norm.norm, self, None, None)
        adapter.set_lm_head(model, head)
        adapter.embed(model).register_forward_hook(self._rotate_embedding)

    def _rotate_embedding(self, module: nn.Module, args, output: Tensor) -> Tensor | None:
        if not self.global_mode.transform or self.r1 is None:
            return None
        with full_precision(output):
            return (output.float() @ self.r1.matrix).to(output.dtype)

    def _capture_hook(self, index: int):
        def hook(module: nn.Module, args, output) -> None:
            if self._captured is not None and (self._capture_layers is None or index in self._capture_layers):
                self._captured.append(output[0] if isinstance(output, tuple) else output)

        return hook

    def set_quantized_layers(self, layers: set[int] | None) -> None:
        """Quantize only these decoder blocks in student passes (None: all); the others run transformed in FP."""
        for i, mode in enumerate(self.layer_modes):
            mode.quantize = layers is None or i in layers

    def r1_matrix(self) -> Tensor | None:
        return None if self.r1 is None or not self.global_mode.transform else self.r1.matrix

    @contextlib.contextmanager
    def mode(self, transform: bool, quant: bool) -> Iterator[None]:
        """Temporarily run as teacher (False, False), RTN (False, True), FP-transformed (True, False) or student."""
        old = (self.global_mode.transform, self.global_mode.quant)
        self.global_mode.set(transform, quant)
        try:
            yield
        finally:
            self.global_mode.set(*old)

    @contextlib.contextmanager
    def capture_blocks(self, layers: set[int] | None = None) -> Iterator[list[Tensor]]:
        """Collect the outputs (B, T, D) of the given decoder blocks (all if None) during the forward pass."""
        self._captured, self._capture_layers = [], layers
        try:
            yield self._captured
        finally:
            self._captured, self._capture_layers = None, None

    @contextlib.contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """Compute every Linear's weight once for the current mode and reuse it (evaluation and generation).

        Without this, generation would re-fold and re-quantize every weight at every decoded token.
        """
        linears = [m for m in self.model.modules() if isinstance(m, QuantLinear)]
        with torch.no_grad(), parametrize.cached():
            for m in linears:
                m._frozen = m.quantized_weight()
        try:
            yield
        finally:
            for m in linears:
                m._frozen = None

    def unrotate(self, hidden: Tensor) -> Tensor:
        """Map a residual-stream tensor of the student back to the teacher's basis: h R1^T."""
        with full_precision(hidden):
            r1 = self.r1_matrix()
            return hidden if r1 is None else (hidden.float() @ r1.T).to(hidden.dtype)

    def forward(self, **inputs):
        return self.model(**inputs)

    def quant_linears(self) -> Iterator[tuple[str, QuantLinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, QuantLinear) and module.projection is not None:
                yield name, module

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by kind: ``rotation`` (R1, R2), ``scale`` (smoothing) and ``clip``."""
        groups: dict[str, list[nn.Parameter]] = {"rotation": [], "scale": [], "clip": []}
        for name, p in self.named_parameters():
            if not p.requires_grad or name.startswith("model.") and "clip_logit" not in name:
                continue
            if "clip_logit" in name:
                groups["clip"].append(p)
            elif "log_s_" in name:
                groups["scale"].append(p)
            else:
                groups["rotation"].append(p)
        return groups


class StudentView:
    """The student's model pinned to one mode, usable wherever a transformers model is expected (eval, generate).

    ``StudentView(student, False, False)`` is the FP teacher, ``(False, True)`` plain RTN, ``(True, True)`` CAQ.
    """

    def __init__(self, student: CAQStudent, transform: bool, quant: bool):
        self._student, self._mode = student, (transform, quant)

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[None]:
        with self._student.mode(*self._mode):
            if torch.is_grad_enabled():  # training through the view: weights must keep their autograd history
                yield
            else:
                with self._student.frozen_weights():
                    yield

    def __call__(self, *args, **kwargs):
        with self._pinned():
            return self._student.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        with self._pinned():
            return self._student.model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._student.model, name)
