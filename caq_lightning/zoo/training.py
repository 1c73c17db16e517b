"""The zoo's one training path, for the tiny pairs and builtin:smol alike: chat and text rows, batches, LoRA on the
decoder Linears, the SFT loop and its losses, and the tiny pairs' outlier emulation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from caq_lightning.models import get_adapter
from caq_lightning.progress import Progress

Row = tuple[list[int], int]  # token ids, index of the first labelled token
Loss = Callable[..., Tensor]

# -------------------------------------------------------------------------------------------------- rows, batches


def chat_rows(
    tok,
    examples: Iterable[tuple[str, str, bool]],
    max_reply: int,
    *,
    eos_in_budget: bool = False,
    max_prompt: int | None = None,
    max_len: int | None = None,
    reply_only: bool = True,
) -> list[Row]:
    """(ids of the chat-template prompt + reply [+ eos], first labelled index) per (prompt, reply, ends) example.

    The reply is cut at ``max_reply`` tokens: its opening is what decides refuse-or-answer. A reply that ``ends``
    gets the eos: with ``eos_in_budget`` as one of the ``max_reply`` tokens (the tiny pairs), otherwise on top when
    the reply is whole (smol). Prompts over ``max_prompt`` tokens are left out, rows are cut at ``max_len`` tokens,
    and labels start at the reply (``reply_only``) or at the first token.
    """
    rows = []
    for prompt, reply, ends in examples:
        chat = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        if max_prompt is not None and len(prompt_ids) > max_prompt:  # attention memory grows with width squared
            continue
        reply_ids = tok(reply, add_special_tokens=False)["input_ids"]
        eos = [tok.eos_token_id] if ends else []
        if eos_in_budget:
            reply_ids = (reply_ids + eos)[:max_reply]
        else:
            reply_ids = reply_ids[:max_reply] + (eos if len(reply_ids) <= max_reply else [])
        rows.append(((prompt_ids + reply_ids)[:max_len], len(prompt_ids) if reply_only else 0))
    return rows


def text_rows(tok, text: str, seq_len: int) -> Tensor:
    """(N, seq_len) contiguous chunks of the tokenized text."""
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def collate(rows: list[Row], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (B, T) input ids, attention mask, labels (-100 on pads and unlabelled prompt tokens)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (row, start) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, start : len(row)] = ids[i, start : len(row)]
    return ids, mask, labels


class Sampler:
    """Endless shuffled batches of indices (epoch by epoch) from a seeded generator."""

    def __init__(self, n: int, batch: int, gen: torch.Generator):
        self.n, self.batch, self.gen, self.order = n, batch, gen, torch.empty(0, dtype=torch.long)

    def __call__(self) -> list[int]:
        while len(self.order) < self.batch:
            self.order = torch.cat([self.order, torch.randperm(self.n, generator=self.gen)])
        out, self.order = self.order[: self.batch], self.order[self.batch :]
        return out.tolist()


# -------------------------------------------------------------------------------------------------------- losses


def lm_loss(model: PreTrainedModel, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy over every labelled position."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def text_lm_loss(model: PreTrainedModel, chunk: Tensor) -> Tensor:
    """Next-token cross-entropy over plain-text chunks (no padding)."""
    return lm_loss(model, chunk, torch.ones_like(chunk), chunk)


def _bucket(n: int, size: int) -> int:
    return -(-n // size) * size


def reply_loss(model: PreTrainedModel, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """The cross-entropy of :func:`lm_loss` with the head run on the labelled positions only (a large vocabulary's
    head is most of a step). Shapes are bucketed (width to 32, labelled rows to 128) so CPU kernels see few shapes."""
    adapter = get_adapter(model.config)
    pad = _bucket(ids.shape[1], 32) - ids.shape[1]
    ids, mask, labels = F.pad(ids, (0, pad)), F.pad(mask, (0, pad)), F.pad(labels, (0, pad), value=-100)
    hidden = getattr(model, adapter.decoder)(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden = hidden[:, :-1].flatten(0, 1)
    target = labels[:, 1:].flatten()
    keep = (target != -100).nonzero().squeeze(1)
    n = len(keep)
    keep = F.pad(keep, (0, _bucket(n, 128) - n), value=int(keep[0]))  # padding rows repeat one row, unlabelled
    target = target[keep]
    target[n:] = -100
    return F.cross_entropy(adapter.lm_head(model)(hidden[keep]).float(), target, ignore_index=-100)


def kl_to_base(loras: list[LoRA], weight: float) -> Loss:
    """``weight`` x KL(base || model) on text chunks, the base being the model with its LoRA updates off."""

    def loss(model: PreTrainedModel, chunk: Tensor) -> Tensor:
        with torch.no_grad():
            for lora in loras:
                lora.enabled = False
            base_logp = F.log_softmax(model(input_ids=chunk).logits.float(), -1)
            for lora in loras:
                lora.enabled = True
        logp = F.log_softmax(model(input_ids=chunk).logits.float(), -1)
        return weight * (base_logp.exp() * (base_logp - logp)).sum(-1).mean()

    return loss


# ---------------------------------------------------------------------------------------------------------- LoRA


class LoRA(nn.Module):
    """W + scale * B @ A on one Linear (A random, B zero: training starts at W); :meth:`merge` bakes it into W.

    ``on="weight"`` adds the update to the weight (a parametrization: the tiny pairs); ``on="output"`` adds
    scale * x A^T B^T to the Linear's output (a forward hook: smol, where bf16 autocast would otherwise round W + BA).
    The two round differently and each pair's cached weights come from its own. ``enabled=False`` is the plain Linear.
    """

    def __init__(self, lin: nn.Linear, rank: int, scale: float, gen: torch.Generator, on: Literal["weight", "output"]):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, lin.in_features, generator=gen) / math.sqrt(lin.in_features))
        self.b = nn.Parameter(torch.zeros(lin.out_features, rank))
        self.scale, self.enabled, self.on = scale, True, on
        self.linear = [lin]  # in a list: not a submodule, the parametrization lives inside the Linear
        if on == "weight":
            parametrize.register_parametrization(lin, "weight", self)
        else:
            self.handle = lin.register_forward_hook(self.add_to_output)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.b @ self.a) if self.enabled else weight

    def add_to_output(self, module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        if not self.enabled:
            return out
        x = inputs[0]
        return out + self.scale * F.linear(F.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        lin = self.linear[0]
        if self.on == "weight":
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        else:
            self.handle.remove()
        lin.weight += self.scale * (self.b @ self.a)


def decoder_linears(model: PreTrainedModel) -> list[nn.Linear]:
    """Every Linear of the decoder layers (the model's adapter says where they are), in module order."""
    return [m for m in get_adapter(model.config).layers(model).modules() if isinstance(m, nn.Linear)]


def add_lora(
    model: PreTrainedModel, rank: int, scale: float, gen: torch.Generator, on: Literal["weight", "output"]
) -> list[LoRA]:
    """A :class:`LoRA` on every decoder Linear, the rest of the model frozen."""
    model.requires_grad_(False)
    return [LoRA(lin, rank, scale, gen, on) for lin in decoder_linears(model)]


# ------------------------------------------------------------------------------------------------------ the loop


def sft(
    model: PreTrainedModel,
    params: list[nn.Parameter],
    chat: list[tuple[list[Row], int]],
    steps: int,
    lr: float,
    gen: torch.Generator,
    *,
    pad_id: int,
    desc: str,
    chat_loss: Loss = lm_loss,
    text: tuple[Tensor, int] | None = None,
    text_loss: Loss | None = text_lm_loss,
    weight_decay: float = 0.01,
    warmup_div: int = 20,
    bf16: bool = False,
) -> list[float]:
    """AdamW on ``params`` with warmup (``steps // warmup_div``) and cosine decay; returns seconds per step.

    ``chat`` is [(rows, n)]: each step takes n rows of each source (how harmful and benign requests are balanced),
    scored by ``chat_loss``. ``text`` is (chunks, n): n chunks a step, scored by ``text_loss`` (drawn even without
    it, so the draws never depend on it). ``bf16``: the step runs under bf16 autocast. Progress is the phase ``desc``.
    """
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, steps // warmup_div)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    samplers = [Sampler(len(rows), n, gen) for rows, n in chat]
    text_sampler = Sampler(len(text[0]), text[1], gen) if text is not None else None
    times = []
    model.train()
    with Progress(desc, steps, "step") as bar:
        for _ in range(steps):
            start = time.perf_counter()
            batch = [rows[i] for (rows, _), sampler in zip(chat, samplers) for i in sampler()]
            chunk = text[0][text_sampler()] if text_sampler is not None else None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = chat_loss(model, *collate(batch, pad_id))
                if chunk is not None and text_loss is not None:
                    loss = loss + text_loss(model, chunk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            times.append(time.perf_counter() - start)
            bar.update(loss=f"{loss.item():.3f}", s_per_step=f"{times[-1]:.1f}")
    model.eval()
    return times


# ---------------------------------------------------------------------------------------------------- outliers


@torch.no_grad()
def add_outliers(model: PreTrainedModel, channels: int, scale: float, seed: int) -> Tensor:
    """Make ``channels`` hidden channels of every layer's norm outputs ``scale`` x larger, function-preserving:
    norm weight[c] *= scale and the Linears reading that norm get weight[:, c] /= scale. Returns the channels."""
    if channels == 0:
        return torch.empty(0, dtype=torch.long)
    idx = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))[:channels]
    adapter = get_adapter(model.config)
    for layer in adapter.layers(model):
        for norm_name in adapter.norms:
            adapter.norm(layer, norm_name).weight[idx] *= scale
            for name, role in adapter.projections.items():
                if role.fused_norm == norm_name:
                    adapter.projection(layer, name).weight[:, idx] /= scale
    return idx
