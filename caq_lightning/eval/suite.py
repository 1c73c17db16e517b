"""One call that runs the whole safety evaluation of a (fake-quantized or FP) causal LM and returns JSON-able numbers.

The model may be any HF-like causal LM: ``model(input_ids=..., attention_mask=...).logits`` and ``model.generate``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from caq_lightning.data_sources import SETS, load_public
from caq_lightning.errors import CAQError
from caq_lightning.eval.metrics import MeanKL, Perplexity, RefusalLogOdds, RefusalRate, perplexity_windows
from caq_lightning.eval.refusal import generate_responses, is_refusal, refusal_logodds
from caq_lightning.eval.safetybench import evaluate_safetybench, model_device, safetybench_items
from caq_lightning.progress import Progress, progress

LABELS = ("harmful", "benign")


def read_text(path: str | Path, what: str) -> str:
    """The text of ``path``; a one-line error naming ``what`` when it is not UTF-8 (a binary or legacy-encoded file)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CAQError(
            f"{what} '{path}' is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): "
            "pass a plain-text file saved as UTF-8"
        ) from None


def read_prompts(path: str | Path) -> list[dict]:
    """Read a jsonl of ``{"prompt": str, "label": "harmful" | "benign"}``; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise CAQError(f"prompts file '{path}' not found: pass a jsonl of {{\"prompt\", \"label\"}} lines")
    prompts = []
    for lineno, line in enumerate(read_text(path, "prompts file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CAQError(f"{path}:{lineno}: not valid JSON ({err.msg}): each line must be one JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise CAQError(f"{path}:{lineno}: needs a non-empty string \"prompt\"")
        if row.get("label") not in LABELS:
            raise CAQError(f"{path}:{lineno}: \"label\" must be \"harmful\" or \"benign\", got {row.get('label')!r}")
        prompts.append({"prompt": row["prompt"], "label": row["label"]})
    if not prompts:
        raise CAQError(f"prompts file '{path}' has no prompts: add jsonl lines {{\"prompt\": ..., \"label\": ...}}")
    return prompts


def _local_file(path: str | Path, title: str, name: str):
    path = Path(path)
    if not path.is_file():
        raise CAQError(f"{title} file '{path}' not found: pass an existing file, or none to use the public set")
    return SETS[name].read_local(path)


def xstest_prompts(label: str, path: str | Path | None = None) -> list[str]:
    """XSTest prompts labelled ``label``: ``safe`` ones sound risky but are fine (refusing them is over-refusal),
    ``unsafe`` ones are their harmful contrasts (refusing them is right). From ``path`` (the csv) or the public set."""
    rows = load_public("xstest") if path is None else _local_file(path, "XSTest", "xstest")
    return [row["prompt"] for row in rows if row["label"] == label]


def xstest_safe_prompts(path: str | Path | None = None) -> list[str]:
    return xstest_prompts("safe", path)


def harmbench_prompts(path: str | Path | None = None) -> list[str]:
    """HarmBench's standard text behaviours: from ``path`` (one request a line) or the public set."""
    return load_public("harmbench") if path is None else _local_file(path, "HarmBench", "harmbench")


def wikitext2_test_text() -> str:
    """WikiText-2 test, the held-out text of perplexity and KL."""
    return load_public("wikitext2_test")


def load_requested_sets(xstest: bool = False, xstest_unsafe: bool = False, harmbench: bool = False,
                        safetybench: bool = False) -> dict:  # fmt: skip
    """The public sets an evaluation asks for, loaded up front: a missing one fails before any model loads."""
    return {
        "xstest_safe": xstest_prompts("safe") if xstest else None,
        "xstest_unsafe": xstest_prompts("unsafe") if xstest_unsafe else None,
        "harmbench": harmbench_prompts() if harmbench else None,
        "safetybench": safetybench_items(load_public("safetybench"), "SafetyBench") if safetybench else None,
    }


@torch.no_grad()
def evaluate_model(
    model,
    tokenizer,
    prompts: Sequence[dict] | None,
    ppl_text: str | None,
    teacher=None,
    base=None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    seq_len: int = 256,
    max_windows: int | None = 32,
    keywords: Sequence[str] | None = None,
    xstest: bool = False,
    safetybench: bool = False,
    xstest_unsafe: bool = False,
    harmbench: bool = False,
    max_per_set: int | None = None,
    name: str = "",
    sets: dict | None = None,
    per_prompt: bool = False,
) -> dict:
    """Refusal rates/log-odds on ``prompts``, perplexity and KL to teacher/base on ``ppl_text``, XSTest (safe:
    over-refusal; unsafe: refusal), HarmBench refusal, SafetyBench.

    ``max_per_set`` caps each prompt set (harmful, benign, XSTest-safe/unsafe, HarmBench) at a fixed seeded sample,
    the same for every model, so paired comparisons stay paired. ``per_prompt`` adds ``<set>_refused``: one bool per
    prompt of that sample, in its order (what a per-prompt paired test such as McNemar's needs).

    Every number is computed in this process over everything it is given (metrics do not sync across ranks here,
    so a rank-zero-only call under DDP cannot deadlock); for sharded evaluation use the metric classes directly.
    A rate over an empty prompt set is None. ``name`` prefixes each phase's progress (e.g. the model's name);
    ``sets`` are the public sets already loaded by :func:`load_requested_sets` (loaded here when not given).
    """
    prefix = f"{name}: " if name else ""
    sets = sets or load_requested_sets(xstest, xstest_unsafe, harmbench, safetybench)
    results: dict = {}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        if prompts is not None:
            results.update(_refusal_results(
                model, tokenizer, prompts, max_new_tokens, batch_size, keywords, max_per_set, prefix, per_prompt
            ))  # fmt: skip
        if ppl_text is not None:
            results.update(
                _text_results(model, tokenizer, ppl_text, teacher, base, batch_size, seq_len, max_windows, prefix)
            )
        elif teacher is not None or base is not None:
            raise CAQError("KL to teacher/base is measured on held-out text: pass ppl_text (e.g. WikiText-2 test)")
        for set_name in ("xstest_safe", "xstest_unsafe", "harmbench"):
            texts = sets.get(set_name)
            if texts is not None:
                texts = fixed_sample(texts, max_per_set)
                results[f"n_{set_name}"] = len(texts)
                rate = RefusalRate(keywords, sync_on_compute=False)
                with Progress(f"{prefix}{set_name} replies", -(-len(texts) // batch_size), "batch") as bar:
                    responses = generate_responses(model, tokenizer, texts, max_new_tokens, batch_size, bar)
                rate.update(responses)
                if per_prompt:
                    results[f"{set_name}_refused"] = [is_refusal(r, keywords) for r in responses]
                results[f"{set_name}_refusal_rate"] = rate.compute().item()
        if sets.get("safetybench") is not None:
            accuracy = evaluate_safetybench(
                model, tokenizer, sets["safetybench"], batch_size=batch_size, desc=f"{prefix}SafetyBench"
            )
            accuracy.sync_on_compute = False
            for name, value in accuracy.compute().items():
                key = "safetybench_accuracy" if name == "accuracy" else f"safetybench_{_snake(name)}"
                results[key] = None if torch.isnan(value) else value.item()
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return results


def fixed_sample(items: list, n: int | None, seed: int = 0) -> list:
    """At most ``n`` of ``items``: a seeded sample kept in the original order (all of them when ``n`` is None)."""
    if n is None or len(items) <= n:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _snake(name: str) -> str:
    return "_".join(name.lower().replace("-", " ").split())


def _refusal_results(
    model, tokenizer, prompts, max_new_tokens, batch_size, keywords, max_per_set, prefix, per_prompt=False
) -> dict:  # fmt: skip
    results = {}
    for label in LABELS:
        texts = fixed_sample([p["prompt"] for p in prompts if p["label"] == label], max_per_set)
        results[f"n_{label}"] = len(texts)
        results[f"{label}_refusal_rate"] = results[f"{label}_logodds"] = None
        if not texts:
            continue
        rate = RefusalRate(keywords, sync_on_compute=False)
        logodds = RefusalLogOdds(sync_on_compute=False)
        # One phase per label: the replies, then the two teacher-forced passes of the log-odds.
        with Progress(f"{prefix}{label} prompts", 3 * -(-len(texts) // batch_size), "batch") as bar:
            responses = generate_responses(model, tokenizer, texts, max_new_tokens, batch_size, bar)
            logodds.update(refusal_logodds(model, tokenizer, texts, batch_size=batch_size, bar=bar).float().cpu())
        rate.update(responses)
        if per_prompt:
            results[f"{label}_refused"] = [is_refusal(r, keywords) for r in responses]
        results[f"{label}_refusal_rate"] = rate.compute().item()
        results[f"{label}_logodds"] = logodds.compute().item()
    return results


def _text_results(model, tokenizer, text, teacher, base, batch_size, seq_len, max_windows, prefix="") -> dict:
    """Perplexity of ``model`` and mean per-token KL(p_ref || p_model) for each given reference on the same windows."""
    windows = perplexity_windows(tokenizer, text, seq_len=seq_len, max_windows=max_windows)
    device = model_device(model)
    ppl = Perplexity(sync_on_compute=False).to(device)
    named = (("kl_teacher", teacher), ("kl_base", base))
    refs = {name: (ref, MeanKL(sync_on_compute=False).to(device)) for name, ref in named if ref is not None}
    for ref, _ in refs.values():
        ref.eval()
    for batch in progress(windows.split(batch_size), f"{prefix}perplexity", unit="batch"):
        ids = batch.to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (B, T, V)
        # Position t predicts token t+1; torchmetrics' Perplexity softmaxes in the dtype it gets, so give it fp32.
        ppl.update(logits[:, :-1].float(), ids[:, 1:])
        for ref, kl in refs.values():
            ref_ids = ids.to(model_device(ref))
            ref_logits = ref(input_ids=ref_ids, attention_mask=torch.ones_like(ref_ids)).logits
            kl.update(logits, ref_logits.to(device))
    results = {"perplexity": ppl.compute().item(), "n_ppl_tokens": int(windows[:, 1:].numel())}
    results.update({name: kl.compute().item() for name, (_, kl) in refs.items()})
    return results
