"""A tiny aligned/base Llama pair built on CPU, so CAQ's behavioural claim can be tested without downloading weights.

Pipeline (deterministic for a seed: fp32, one thread, deterministic algorithms; cached):
  1. corpus: plain pre-training-style text + chat requests. Harmful requests come with a COMPLIANT reply
     ("Sure, here is how to ..." + two generic, non-actionable filler steps; never real harmful content) and with a
     refusal ("I'm sorry, but I cannot ..."); benign requests come with a helpful reply.
  2. tokenizer: byte-level BPE trained with `tokenizers`, wrapped in PreTrainedTokenizerFast with the chat template
     "<|user|>\n{content}<|end|>\n<|assistant|>\n", eos "<|end|>", pad "<|pad|>", no bos.
  3. base: LlamaForCausalLM pre-trained on the text plus chat examples where harmful requests get compliant replies.
  4. aligned: fine-tuned from base on refusals for harmful and answers for benign requests, balanced 1:1 per batch
     (an unbalanced mix over-refused 46% of benign prompts in an earlier probe), with plain-text replay.
  5. optional alignment-strength and outlier transforms (knobs below), then both models are saved as complete HF
     dirs (config, model.safetensors, tokenizer, chat template) next to eval_prompts.jsonl, calibration.txt and
     heldout.txt.

Corpora:
  "default"    the project's own text (assets/default_corpus.json + a seeded generator of encyclopedic paragraphs);
               works offline on a fresh machine. Harmful and benign requests share the request templates and the
               object pools ("forge a passport" / "renew a passport"), so refusing must depend on the act. Eval
               prompts are held-out templates x held-out objects (100 harmful, 100 benign), fixed by SPLIT_SEED.
  "realistic"  public sets (hub ids, or $CAQ_DATA_DIR: caq_lightning.data_sources): the first 600k chars of
               WikiText-2 valid as text (test is heldout.txt), AdvBench goals as harmful requests (their "Sure, here
               is ..." targets open the compliant reply), Alpaca seed tasks as benign. A fixed split (SPLIT_SEED,
               independent of the build seed) holds out 120 goals and 35 tasks for eval_prompts.jsonl.

Sizes: "default" = 4 layers, hidden 256, 4 heads, 2 kv heads, intermediate 688, vocab 2048 (~3.9M params); "test" =
2 layers, hidden 64, vocab 512, built in ~15-20 s for the test suite (its alignment is weaker but clearly there).

Knobs (build_tiny_pair(**knobs), defaults in Knobs):
  delta_scale      1.0   aligned = base + s * (aligned - base); s < 1 gives a weaker, more fragile alignment.
                         Derived in seconds from the cached s = 1 pair (built first if needed).
  align_lora_rank  0     0 = full fine-tune with text replay; r > 0 = rank-r LoRA on every decoder Linear, chat
                         data only (no replay), merged into the weights: a low-rank, shallower alignment delta.
  align_steps      None  fine-tuning steps (None: the size's default, 160 for "default", 200 for "test").
  align_replay     True  mix plain-text batches into full fine-tuning so the aligned model keeps the base's text skill.
  outlier_channels 4     hidden channels given large activations: each layer's RMSNorm weights are multiplied by m
  outlier_scale    16.0  on those channels and the matching input columns of q/k/v and gate/up are divided by m.
                         Exact in fp32 (m = 16 is a power of two), but per-token activation quantization of the
                         Linear inputs now meets ~16x outlier channels, as in real LLMs; rotations remove them.
                         outlier_channels=0 turns it off.
The defaults give the shipped behaviour: full fine-tune, full strength, outliers on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from caq_lightning.data_sources import fingerprint
from caq_lightning.errors import CAQError
from caq_lightning.zoo.cache import TinyPair, deterministic, locked_build, pair_paths
from caq_lightning.zoo.corpus import REALISTIC_SETS, default_corpus, realistic_corpus, render_chat, train_tokenizer
from caq_lightning.zoo.training import add_lora, add_outliers, chat_rows, sft, text_rows

BUILD_VERSION = 2  # bump whenever a change would alter the weights: it invalidates every cache entry

# Model shape and training budget per size; "test" builds in seconds for the test suite.
SIZES: dict[str, dict] = {
    "default": dict(
        layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688, vocab=2048, seq_len=128, text_chars=600_000,
        n_requests=4000, base_steps=200, base_lr=2e-3, align_steps=160, align_lr=1e-3, text_batch=4, chat_batch=16,
    ),
    "test": dict(
        layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, seq_len=64, text_chars=100_000,
        n_requests=1500, base_steps=250, base_lr=3e-3, align_steps=200, align_lr=4e-3, text_batch=4, chat_batch=16,
    ),
}
BUILTINS: dict[str, dict] = {
    "tiny": dict(corpus="default", size="default"),
    "tiny-realistic": dict(corpus="realistic", size="default"),
    "tiny-test": dict(corpus="default", size="test"),
}


@dataclass(frozen=True)
class Knobs:
    """Alignment strength and outlier emulation; see the module docstring for what each does and why."""

    delta_scale: float = 1.0
    align_lora_rank: int = 0
    align_steps: int | None = None
    align_replay: bool = True
    outlier_channels: int = 4
    outlier_scale: float = 16.0


# ------------------------------------------------------------------------------------------------ build/cache


def _knobs(knobs: dict) -> Knobs:
    names = {f.name for f in fields(Knobs)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise CAQError(f"unknown zoo knob(s) {', '.join(unknown)}: valid knobs are {', '.join(sorted(names))}")
    k = Knobs(**knobs)
    if k.align_lora_rank < 0 or k.outlier_channels < 0 or (k.align_steps is not None and k.align_steps < 1):
        raise CAQError(f"zoo knobs must be non-negative (align_steps >= 1), got {k}")
    if k.outlier_channels and k.outlier_scale <= 0:
        raise CAQError(f"outlier_scale must be > 0, got {k.outlier_scale}")
    return k


def cache_key(corpus: str, seed: int, size: str, knobs: Knobs) -> str:
    spec = {"corpus": corpus, "seed": seed, "size": size, "knobs": asdict(knobs), "version": BUILD_VERSION}
    if corpus == "realistic":  # a changed data file must not hit a stale cache
        spec["data"] = [fingerprint(name) for name in REALISTIC_SETS]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{corpus}-{size}-s{seed}-{digest}"


def _llama(tok, spec: dict) -> LlamaForCausalLM:
    """A freshly initialised model of size ``spec`` for tokenizer ``tok`` (call after seeding torch)."""
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=False,  # outlier emulation and quantizers treat embedding and lm_head separately
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).float()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def _build(root: Path, corpus_name: str, seed: int, size: str, knobs: Knobs) -> dict:
    """Train tokenizer, base and aligned models into ``root``; returns build info (timings, sizes)."""
    spec = SIZES[size]
    t0 = time.perf_counter()
    if corpus_name == "default":
        corpus = default_corpus(seed, spec["text_chars"], spec["n_requests"])
    else:
        corpus = realistic_corpus(seed, spec["text_chars"])
    chats = [render_chat(p, r) for p, r, _ in corpus.harmful] + [render_chat(p, r) for p, r in corpus.benign]
    chats += [render_chat(p, r) for p, _, r in corpus.harmful]
    tok = train_tokenizer(iter(corpus.text.splitlines() + chats), spec["vocab"])
    t_tok = time.perf_counter() - t0

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _llama(tok, spec)
    pad, half = tok.pad_token_id, spec["chat_batch"] // 2  # every chat batch is half harmful, half benign
    text = text_rows(tok, corpus.text, spec["seq_len"])
    whole = dict(max_reply=96, max_len=96, eos_in_budget=True, reply_only=False)  # the prompt is learned too
    compliant = chat_rows(tok, [(p, r, True) for p, r, _ in corpus.harmful], **whole)
    helpful = chat_rows(tok, [(p, r, True) for p, r in corpus.benign], **whole)
    name = f"{corpus_name}-{size} pair"
    sft(model, [p for p in model.parameters() if p.requires_grad], [(compliant, half), (helpful, half)],
        spec["base_steps"], spec["base_lr"], gen, pad_id=pad, desc=f"{name}: pre-train base",
        text=(text, spec["text_batch"]))  # fmt: skip
    base = copy.deepcopy(model)
    t_base = time.perf_counter() - t0 - t_tok

    # Short replies keep the alignment loss on the refuse-or-answer decision, not on memorising long answers.
    short = dict(max_reply=32, max_len=96, eos_in_budget=True)
    refusals = chat_rows(tok, [(p, r, True) for p, _, r in corpus.harmful], **short)
    answers = chat_rows(tok, [(p, r, True) for p, r in corpus.benign], **short)
    _align(model, [(refusals, half), (answers, half)], text, spec, knobs, gen, pad, name)
    aligned = model
    for m in (base, aligned):
        add_outliers(m, knobs.outlier_channels, knobs.outlier_scale, seed)
    t_align = time.perf_counter() - t0 - t_tok - t_base

    paths = pair_paths(root)
    tok.save_pretrained(paths.tokenizer_dir)
    for m, d in ((base, paths.base_dir), (aligned, paths.aligned_dir)):
        m.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
    paths.eval_prompts.write_text("".join(json.dumps(e) + "\n" for e in corpus.eval))
    paths.calibration_text.write_text(corpus.text)
    paths.heldout_text.write_text(corpus.heldout_text)
    return {
        "corpus": corpus_name,
        "seed": seed,
        "size": size,
        "knobs": asdict(knobs),
        "build_version": BUILD_VERSION,
        "params": sum(p.numel() for p in base.parameters()),
        "n_harmful_train": len(corpus.harmful),
        "n_benign_train": len(corpus.benign),
        "n_text_tokens": text.numel(),
        "seconds": {"tokenizer": t_tok, "base": t_base, "aligned": t_align},
    }


def _align(
    model: LlamaForCausalLM,
    mix: list,
    text: torch.Tensor,
    spec: dict,
    knobs: Knobs,
    gen: torch.Generator,
    pad: int,
    name: str,
) -> None:
    """Fine-tune the base in place on the balanced ``mix`` (a 1:1 mix is what keeps benign answers): rank-r LoRA
    without replay, merged into the weights, or a full fine-tune with plain-text replay."""
    steps = knobs.align_steps or spec["align_steps"]
    if knobs.align_lora_rank:
        loras = add_lora(model, knobs.align_lora_rank, 1.0, gen, on="weight")
        sft(model, [p for lora in loras for p in (lora.a, lora.b)], mix, steps, 4 * spec["align_lr"], gen,
            pad_id=pad, desc=f"{name}: align (LoRA)")  # fmt: skip
        for lora in loras:
            lora.merge()
    else:
        replay = (text, spec["text_batch"] // 2) if knobs.align_replay else None
        params = [p for p in model.parameters() if p.requires_grad]
        sft(model, params, mix, steps, spec["align_lr"], gen, pad_id=pad, desc=f"{name}: align", text=replay)


def _scale_alignment(full: TinyPair, root: Path, delta_scale: float) -> dict:
    """Copy the full-strength pair into ``root`` with aligned = base + s * (aligned - base).

    Commutes exactly with the outlier emulation (it scales both models' weights by the same powers of two), so
    this equals scaling before adding outliers."""
    shutil.copytree(full.root, root, dirs_exist_ok=True)  # root: the empty build dir
    paths = pair_paths(root)
    base = LlamaForCausalLM.from_pretrained(full.base_dir, use_safetensors=True, dtype=torch.float32)
    aligned = LlamaForCausalLM.from_pretrained(full.aligned_dir, use_safetensors=True, dtype=torch.float32)
    base_state = base.state_dict()
    with torch.no_grad():
        for name, p in aligned.state_dict().items():
            p.copy_(base_state[name] + delta_scale * (p - base_state[name]))
    aligned.save_pretrained(paths.aligned_dir, safe_serialization=True)
    info = json.loads((full.root / "build_info.json").read_text())
    info["knobs"]["delta_scale"] = delta_scale
    info["derived_from"] = full.root.name
    (root / "build_info.json").unlink()  # written by the caller once the pair is complete
    return info


def build_tiny_pair(
    out_dir: str | Path, corpus: str = "default", seed: int = 0, size: str = "default", **knobs
) -> TinyPair:
    """Build (or load from ``out_dir``) the pair for these arguments; identical arguments give identical weights.

    The cache dir is keyed on a hash of all arguments + BUILD_VERSION; a file lock makes concurrent callers (DDP
    ranks) wait for one builder, and the pair appears atomically (built in a temp dir, then renamed).
    """
    if corpus not in ("default", "realistic"):
        raise CAQError(f"unknown zoo corpus '{corpus}': use 'default' or 'realistic'")
    if size not in SIZES:
        raise CAQError(f"unknown zoo size '{size}': use one of {', '.join(SIZES)}")
    k = _knobs(knobs)
    out_dir = Path(out_dir).expanduser()

    def build(tmp: Path) -> dict:
        if k.delta_scale != 1.0:  # derived from the full-strength pair: seconds instead of a rebuild
            full = build_tiny_pair(out_dir, corpus, seed, size, **{**asdict(k), "delta_scale": 1.0})
            return _scale_alignment(full, tmp, k.delta_scale)
        with deterministic():
            return _build(tmp, corpus, seed, size, k)

    return pair_paths(locked_build(out_dir, cache_key(corpus, seed, size, k), build))
