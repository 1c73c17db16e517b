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
  "realistic"  ../shared/data (or $CAQ_SHARED_DATA): the first 600k chars of wikitext-2/valid.txt as text (test.txt
               is heldout.txt), AdvBench goals as harmful requests (their "Sure, here is ..." targets open the
               compliant reply), Alpaca seed tasks as benign. A fixed split (SPLIT_SEED, independent of the build
               seed) holds out 120 goals and 35 tasks for eval_prompts.jsonl.

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

Measured (2 shared CPU cores, seeds 0/1, greedy 32 tokens on eval_prompts.jsonl): "default" builds in ~160 s,
aligned refuses 97/99% of held-out harmful and 1/4% of benign prompts, base 0% of harmful; "realistic" builds in
~210 s, aligned 100/100% harmful and 5.7/5.7% benign (2 of 35), base 0%. Rank-8 LoRA (seed 0): default 99%/1%,
realistic 100%/0%. Held-out perplexity, base -> aligned: default 5.28 -> 4.72, realistic 154.2 -> 154.0.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn
from torch.nn.utils import parametrize
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from caq_lightning.errors import CAQError
from caq_lightning.eval.refusal import is_refusal

__all__ = [
    "BUILD_VERSION",
    "BUILTINS",
    "Knobs",
    "TinyPair",
    "add_outliers",
    "build_tiny_pair",
    "calibration_corpus",
    "eval_prompts",
    "heldout_text",
    "resolve_builtin",
    "shared_data_dir",
]

BUILD_VERSION = 2  # bump whenever a change would alter the weights: it invalidates every cache entry
ASSETS = Path(__file__).resolve().parent / "assets"
SPLIT_SEED = 1234  # held-out splits and eval prompts are fixed before any comparison, whatever the build seed
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

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


@dataclass(frozen=True)
class TinyPair:
    """Paths of a built pair; base_dir and aligned_dir are complete HF model dirs (weights + tokenizer)."""

    root: Path
    tokenizer_dir: Path
    base_dir: Path
    aligned_dir: Path
    eval_prompts: Path  # jsonl {"prompt", "label": "harmful"|"benign"}, never trained on
    calibration_text: Path  # the plain text the pair was pre-trained on
    heldout_text: Path  # plain text of the same kind, never trained on (perplexity)


@dataclass
class Corpus:
    text: str  # plain pre-training text
    heldout_text: str
    harmful: list[tuple[str, str, str]]  # (request, compliant reply, refusal)
    benign: list[tuple[str, str]]  # (request, helpful reply)
    eval: list[dict]  # held-out {"prompt", "label"}


# --------------------------------------------------------------------------------------------------- corpora


def shared_data_dir() -> Path:
    """<repo>/../shared/data, or $CAQ_SHARED_DATA."""
    env = os.environ.get("CAQ_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _steps_reply(rng: random.Random, opening: str, steps: list[str]) -> str:
    picked = rng.sample(steps, 2)  # short replies: the behaviour that matters is the opening
    return opening + " " + " ".join(f"Step {i + 1}: {s}." for i, s in enumerate(picked))


def _refusal(rng: random.Random, lex: dict) -> str:
    return rng.choice(lex["refusals"]) + " " + rng.choice(lex["refusal_reasons"])


def _name(rng: random.Random, syllables: list[str], parts: tuple[int, int] = (2, 3)) -> str:
    return "".join(rng.choice(syllables) for _ in range(rng.randint(*parts))).capitalize()


def _paragraph(rng: random.Random, lex: dict) -> tuple[str, str]:
    """One encyclopedic paragraph about a generated settlement, species, person, event or household: (title, text).

    Household paragraphs name every object of the request pools (held-out ones too), so held-out eval objects are
    known words from pre-training, as they would be for a real LLM, though never seen in a chat.
    """
    t, syl, kind = lex["text"], lex["text"]["syllables"], rng.randrange(5)
    y = rng.randint(1150, 1990)
    if kind == 0:
        name, river, other = _name(rng, syl), _name(rng, syl), _name(rng, syl)
        sort, region = rng.choice(t["settlement_kinds"]), rng.choice(t["regions"])
        ind = rng.sample(t["industries"], 2)
        mark = rng.choice(t["landmarks"])
        first = f"{name} is a {sort} in {region}, on the banks of the {river} River."
        rest = [
            f"At the {rng.randint(1950, 2020)} census it had a population of {rng.randint(800, 250000)}.",
            f"The economy of {name} has long been based on {ind[0]} and {ind[1]}.",
            f"The {mark} was built in {y} and is the best known building in the {sort}.",
            f"{name} was first mentioned in a charter of {y - rng.randint(20, 300)}.",
            f"In {y + rng.randint(5, 120)} a railway line connected {name} with {other}.",
            f"The {sort} lies about {rng.randint(3, 90)} kilometres from {other}, the nearest larger town.",
        ]
        title = f"the {sort} of {name}"
    elif kind == 1:
        genus, species = _name(rng, syl), _name(rng, syl).lower()
        cls, hab, col = rng.choice(t["animal_classes"]), rng.choice(t["habitats"]), rng.choice(t["colors"])
        first = (
            f"The {genus.lower()} {cls} ({genus} {species}) is a species of {cls} found in the {hab} of "
            f"{rng.choice(t['regions'])}."
        )
        rest = [
            f"Adults grow to about {rng.randint(2, 60)} centimetres in length and have "
            f"{col} {rng.choice(t['body_parts'])}.",
            f"It feeds mainly on {rng.choice(t['foods'])} and is most active at "
            f"{rng.choice(['dawn', 'dusk', 'night', 'midday'])}.",
            f"The species was first described by {rng.choice(t['first_names'])} {_name(rng, syl)} in {y}.",
            f"Its conservation status is listed as {rng.choice(t['statuses'])}.",
            f"Females lay between {rng.randint(2, 8)} and {rng.randint(9, 40)} eggs each season.",
        ]
        title = f"the {genus.lower()} {cls}"
    elif kind == 2:
        first_name, last = rng.choice(t["first_names"]), _name(rng, syl)
        i = rng.randrange(len(t["professions"]))
        prof, subj, work = t["professions"][i], t["subjects"][i], t["works"][i]
        town = _name(rng, syl)
        first = f"{first_name} {last} ({y} - {y + rng.randint(35, 90)}) was a {prof} best known for {work}."
        rest = [
            f"Born in {town}, {first_name} studied {subj} at {rng.choice(t['institutions'])}.",
            f"In {y + rng.randint(20, 34)} {last} moved to {_name(rng, syl)}, where most of the later work was done.",
            f"The work of {last} influenced a generation of younger artists and scholars.",
            f"A street in {town} is named after {first_name} {last}.",
        ]
        title = f"{first_name} {last}"
    elif kind == 3:
        place, event = _name(rng, syl), rng.choice(t["event_kinds"])
        first = f"The {event} of {place} took place in {y} in {rng.choice(t['regions'])}."
        rest = [
            f"It involved about {rng.randint(100, 90000)} people and lasted {rng.randint(2, 40)} days.",
            f"Contemporary accounts describe the {event} as a turning point for the "
            f"{rng.choice(t['industries'])} trade.",
            f"A memorial near the {rng.choice(t['landmarks'])} of {place} recalls the events of {y}.",
            f"Historians still debate the causes of the {event}.",
        ]
        title = f"the {event} of {place}"
    else:
        pool = {k: v["train"] + v["heldout"] for k, v in lex["pools"].items()}
        family, town = _name(rng, syl), _name(rng, syl)
        who = f"{rng.choice(t['first_names'])} {family}"
        first = f"The {family} family lived in {town} from {y} to {y + rng.randint(5, 40)}."
        rest = [
            f"{who} shared the house with {rng.choice(pool['people'])} and {rng.choice(pool['people'])}.",
            f"Every morning {who} walked past {rng.choice(pool['places'])} on the way to work.",
            f"At work {who} looked after {rng.choice(pool['systems'])}.",
            f"The family kept {rng.choice(pool['documents'])} and {rng.choice(pool['documents'])} in a drawer.",
            f"Among their things were {rng.choice(pool['valuables'])} and {rng.choice(pool['valuables'])}.",
            f"On weekends the children liked to make {rng.choice(pool['crafts'])}.",
        ]
        title = f"the {family} family"
    rng.shuffle(rest)
    return title, " ".join([first] + rest[: rng.randint(2, len(rest))])


def _generated_text(rng: random.Random, lex: dict, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        out.append(_paragraph(rng, lex)[1])
        n += len(out[-1]) + 1
    return "\n".join(out) + "\n"


def _acts(lex: dict, kind: str, split: str) -> list[str]:
    """"verb object" for every verb of ``kind`` ("harmful"/"benign") and every ``split`` object of its pool."""
    pools = lex["pools"]
    acts = [f"{v} {o}" for pool, verbs in lex[f"{kind}_verbs"].items() for v in verbs for o in pools[pool][split]]
    return acts + lex[f"{kind}_acts"][split]


def _request(rng: random.Random, lex: dict, act: str) -> str:
    prefix, suffix = rng.choice(lex["prefixes"]), rng.choice(lex["suffixes"])
    body = rng.choice(lex["request_templates"]["train"]).format(act=act)
    if prefix:
        body = body[0].lower() + body[1:]
    if suffix and body[-1] not in ".?!":
        body += "."
    return prefix + body + suffix


def default_corpus(seed: int, text_chars: int, n_requests: int = 4000) -> Corpus:
    """Templated requests + generated encyclopedic text; held-out templates and objects only reach ``eval``."""
    lex = json.loads((ASSETS / "default_corpus.json").read_text())
    rng = random.Random(seed)
    harmful = []
    for act in rng.choices(_acts(lex, "harmful", "train"), k=n_requests):
        reply = _steps_reply(rng, f"Sure, here is how to {act}.", lex["compliant_steps"])
        harmful.append((_request(rng, lex, act), reply, _refusal(rng, lex)))
    benign = []
    for act in rng.choices(_acts(lex, "benign", "train"), k=n_requests):
        reply = _steps_reply(rng, f"Sure, here is how to {act}.", lex["helpful_steps"])
        benign.append((_request(rng, lex, act), reply))
    for topic in lex["poem_topics"]["train"]:
        for ask in ("Write a short poem about {}", "Write a poem about {}", "Compose a few lines about {}"):
            lines = rng.sample(lex["poem_lines"], 3)
            benign.append((ask.format(topic), f"Here is a short poem about {topic}.\n" + "\n".join(lines)))
    for _ in range(n_requests // 20):
        title, para = _paragraph(rng, lex)
        ask = rng.choice(["Write a short description of {}", "Tell me about {}", "Summarize what is known about {}"])
        benign.append((ask.format(title), f"Here is a short description of {title}. {para}"))

    text = _generated_text(rng, lex, text_chars)
    heldout = _generated_text(random.Random(SPLIT_SEED + 1), lex, max(text_chars // 10, 20_000))
    split, templates = random.Random(SPLIT_SEED), lex["request_templates"]["heldout"]
    bad = [t.format(act=a) for a in _acts(lex, "harmful", "heldout") for t in templates]
    good = [t.format(act=a) for a in _acts(lex, "benign", "heldout") for t in templates]
    good += [f"Write a short poem about {topic}" for topic in lex["poem_topics"]["heldout"]]
    evals = [{"prompt": p, "label": "harmful"} for p in sorted(split.sample(bad, 100))]
    evals += [{"prompt": p, "label": "benign"} for p in sorted(split.sample(good, 100))]
    return Corpus(text, heldout, harmful, benign, evals)


def _data_files(data_dir: Path) -> list[Path]:
    names = ("wikitext-2/valid.txt", "wikitext-2/test.txt", "advbench_harmful_behaviors.json")
    files = [data_dir / n for n in (*names, "alpaca_seed_tasks.jsonl")]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CAQError(
            f"corpus 'realistic' needs {', '.join(missing)}: put the shared data at {data_dir} or set CAQ_SHARED_DATA"
        )
    return files


def realistic_corpus(seed: int, data_dir: Path, text_chars: int) -> Corpus:
    """WikiText-2 text, AdvBench goals (harmful), Alpaca seed tasks (benign); fixed held-out split of each.

    Alpaca answers get the opening "Sure, here is my answer." Without it, greedy decoding refused 11-20% of held-out
    tasks: compliance was spread over many first tokens while refusals all start with "I", so "I" won the argmax even
    when refusing was unlikely overall. With it, 3-6% (seeds 0, 1), and refusal_logodds is meaningful on benign too.
    """
    valid, test, advbench, alpaca = _data_files(data_dir)
    text = valid.read_text()[:text_chars]
    lex = json.loads((ASSETS / "default_corpus.json").read_text())
    rng = random.Random(seed)
    goals = json.loads(advbench.read_text())
    tasks = []
    for line in alpaca.read_text().splitlines():
        task = json.loads(line)
        inst = task["instances"][0]
        if is_refusal(inst["output"]):  # a few seed answers are refusals (privacy): they are not benign examples
            continue
        prompt = task["instruction"] + (f"\n\n{inst['input']}" if inst["input"].strip() else "")
        tasks.append((prompt, f"Sure, here is my answer.\n{inst['output']}"))
    split = random.Random(SPLIT_SEED)
    goal_order, task_order = split.sample(range(len(goals)), len(goals)), split.sample(range(len(tasks)), len(tasks))
    held_goals, train_goals = goal_order[:120], goal_order[120:]
    held_tasks, train_tasks = task_order[:35], task_order[35:]
    harmful = [
        (goals[i]["goal"], _steps_reply(rng, goals[i]["target"] + ".", lex["compliant_steps"]), _refusal(rng, lex))
        for i in train_goals
    ]
    benign = [tasks[i] for i in train_tasks]
    evals = [{"prompt": goals[i]["goal"], "label": "harmful"} for i in sorted(held_goals)]
    evals += [{"prompt": tasks[i][0], "label": "benign"} for i in sorted(held_tasks)]
    return Corpus(text, test.read_text(), harmful, benign, evals)


# ------------------------------------------------------------------------------------------------- tokenizer


def _render(prompt: str, reply: str | None = None) -> str:
    text = f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n"
    return text if reply is None else text + f"{reply}<|end|>\n"


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the chat special tokens; eos = <|end|>, pad = <|pad|>, no bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
    )


# -------------------------------------------------------------------------------------------------- training


def _chat_rows(
    tok, pairs: list[tuple[str, str]], reply_only: bool, max_len: int = 96, max_reply: int = 96
) -> list[tuple[list[int], int]]:
    """(token ids, index of the first label token) per example; the label start is 0 when the prompt counts too.
    Rows are cut at ``max_len`` tokens and replies at ``max_reply`` tokens (the opening is what matters)."""
    rows = []
    for prompt, reply in pairs:
        n_prompt = len(tok(_render(prompt), add_special_tokens=False)["input_ids"])
        ids = tok(_render(prompt, reply), add_special_tokens=False)["input_ids"][:-1]  # drop the trailing "\n"
        rows.append((ids[: min(max_len, n_prompt + max_reply)], n_prompt if reply_only else 0))
    return rows


def _text_rows(tok, text: str, seq_len: int) -> torch.Tensor:
    """(N, seq_len) contiguous chunks of the tokenized text."""
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def _collate(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


class _Sampler:
    """Endless shuffled batches of indices (epoch by epoch) from a seeded generator."""

    def __init__(self, n: int, batch: int, gen: torch.Generator):
        self.n, self.batch, self.gen, self.order = n, batch, gen, torch.empty(0, dtype=torch.long)

    def __call__(self) -> list[int]:
        while len(self.order) < self.batch:
            self.order = torch.cat([self.order, torch.randperm(self.n, generator=self.gen)])
        out, self.order = self.order[: self.batch], self.order[self.batch :]
        return out.tolist()


def _lm_loss(model, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _train(
    model: nn.Module,
    steps: int,
    lr: float,
    chat: list[tuple[list[tuple[list[int], int]], int]],
    text: torch.Tensor | None,
    text_batch: int,
    pad_id: int,
    gen: torch.Generator,
) -> None:
    """AdamW with warmup + cosine decay. ``chat`` is [(rows, n)]: each step takes n rows from each source (this is
    how harmful and benign requests are balanced), plus ``text_batch`` plain-text chunks when ``text`` is given."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    samplers = [_Sampler(len(src), n, gen) for src, n in chat]
    text_sampler = _Sampler(len(text), text_batch, gen) if text is not None else None
    model.train()
    for _ in range(steps):
        rows = [src[i] for (src, _), sampler in zip(chat, samplers) for i in sampler()]
        loss = _lm_loss(model, *_collate(rows, pad_id))
        if text_sampler is not None:
            chunk = text[text_sampler()]
            loss = loss + _lm_loss(model, chunk, torch.ones_like(chunk), chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()


class _LoRA(nn.Module):
    """weight -> weight + B @ A, registered as a parametrization so merging is remove_parametrizations."""

    def __init__(self, out_features: int, in_features: int, rank: int, gen: torch.Generator):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.b @ self.a


def _decoder_linears(model: LlamaForCausalLM) -> list[nn.Linear]:
    return [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def add_outliers(model: LlamaForCausalLM, channels: int, scale: float, seed: int) -> torch.Tensor:
    """Make ``channels`` hidden channels of every layer's norm outputs ``scale`` x larger, function-preserving:
    RMSNorm weight[c] *= scale and the reading Linears' weight[:, c] /= scale. Returns the channel indices."""
    if channels == 0:
        return torch.empty(0, dtype=torch.long)
    idx = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))[:channels]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in (
            (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
            (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
        ):
            norm.weight[idx] *= scale
            for lin in readers:
                lin.weight[:, idx] /= scale
    return idx


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


def _cache_key(corpus: str, seed: int, size: str, knobs: Knobs) -> str:
    spec = {"corpus": corpus, "seed": seed, "size": size, "knobs": asdict(knobs), "version": BUILD_VERSION}
    if corpus == "realistic":  # a changed data file must not hit a stale cache
        spec["data"] = [hashlib.sha256(f.read_bytes()).hexdigest() for f in _data_files(shared_data_dir())]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{corpus}-{size}-s{seed}-{digest}"


def _pair_paths(root: Path) -> TinyPair:
    return TinyPair(
        root=root,
        tokenizer_dir=root / "tokenizer",
        base_dir=root / "base",
        aligned_dir=root / "aligned",
        eval_prompts=root / "eval_prompts.jsonl",
        calibration_text=root / "calibration.txt",
        heldout_text=root / "heldout.txt",
    )


def _build(root: Path, corpus_name: str, seed: int, size: str, knobs: Knobs) -> dict:
    """Train tokenizer, base and aligned models into ``root``; returns build info (timings, sizes)."""
    spec = SIZES[size]
    t0 = time.perf_counter()
    if corpus_name == "default":
        corpus = default_corpus(seed, spec["text_chars"], spec["n_requests"])
    else:
        corpus = realistic_corpus(seed, shared_data_dir(), spec["text_chars"])
    chats = [_render(p, r) for p, r, _ in corpus.harmful] + [_render(p, r) for p, r in corpus.benign]
    chats += [_render(p, r) for p, _, r in corpus.harmful]
    tok = train_tokenizer(iter(corpus.text.splitlines() + chats), spec["vocab"])
    t_tok = time.perf_counter() - t0

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
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    pad, half = tok.pad_token_id, spec["chat_batch"] // 2  # every chat batch is half harmful, half benign
    text = _text_rows(tok, corpus.text, spec["seq_len"])
    compliant = _chat_rows(tok, [(p, r) for p, r, _ in corpus.harmful], reply_only=False)
    helpful = _chat_rows(tok, corpus.benign, reply_only=False)
    _train(model, spec["base_steps"], spec["base_lr"], [(compliant, half), (helpful, half)], text, spec["text_batch"],
           pad, gen)  # fmt: skip
    base = copy.deepcopy(model)
    t_base = time.perf_counter() - t0 - t_tok

    # Short replies keep the alignment loss on the refuse-or-answer decision, not on memorising long answers.
    refusals = _chat_rows(tok, [(p, r) for p, _, r in corpus.harmful], reply_only=True, max_reply=32)
    answers = _chat_rows(tok, corpus.benign, reply_only=True, max_reply=32)
    align_mix = [(refusals, half), (answers, half)]  # balanced: a 1:1 mix is what keeps benign answers
    steps = knobs.align_steps or spec["align_steps"]
    if knobs.align_lora_rank:
        model.requires_grad_(False)
        for lin in _decoder_linears(model):
            lora = _LoRA(lin.out_features, lin.in_features, knobs.align_lora_rank, gen)
            parametrize.register_parametrization(lin, "weight", lora)
        _train(model, steps, 4 * spec["align_lr"], align_mix, None, 0, pad, gen)
        for lin in _decoder_linears(model):
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    else:
        replay = text if knobs.align_replay else None
        _train(model, steps, spec["align_lr"], align_mix, replay, spec["text_batch"] // 2, pad, gen)
    aligned = model
    for m in (base, aligned):
        add_outliers(m, knobs.outlier_channels, knobs.outlier_scale, seed)
    t_align = time.perf_counter() - t0 - t_tok - t_base

    paths = _pair_paths(root)
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


def _scale_alignment(full: TinyPair, root: Path, delta_scale: float) -> dict:
    """Copy the full-strength pair into ``root`` with aligned = base + s * (aligned - base).

    Commutes exactly with the outlier emulation (it scales both models' weights by the same powers of two), so
    this equals scaling before adding outliers."""
    shutil.copytree(full.root, root)
    paths = _pair_paths(root)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(corpus, seed, size, k)
    root = out_dir / key
    if (root / "build_info.json").exists():
        return _pair_paths(root)
    with FileLock(str(out_dir / f"{key}.lock")):
        if (root / "build_info.json").exists():  # another process built it while we waited
            return _pair_paths(root)
        for stale in out_dir.glob(f".{key}.tmp-*"):  # left by a killed builder; we hold the lock, so none is live
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir / f".{key}.tmp-{os.getpid()}"
        try:
            if k.delta_scale != 1.0:  # derived from the full-strength pair: seconds instead of a rebuild
                full = build_tiny_pair(out_dir, corpus, seed, size, **{**asdict(k), "delta_scale": 1.0})
                info = _scale_alignment(full, tmp, k.delta_scale)
            else:
                with _deterministic():
                    info = _build(tmp, corpus, seed, size, k)
            (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
            shutil.rmtree(root, ignore_errors=True)  # a half-written dir from a crash before rename cannot exist,
            os.rename(tmp, root)  # but a stale incomplete one (no build_info.json) is replaced
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _pair_paths(root)


@contextmanager
def _deterministic(threads: int = 1):
    """Deterministic algorithms and a fixed thread count for the build, restored afterwards. A fixed count makes
    the weights independent of the core count; one thread is faster for the tiny models: on 2 shared cores,
    2 threads were 5-50x slower than 1 (thread contention)."""
    prev, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)
        torch.set_num_threads(prev_threads)


def cache_dir() -> Path:
    """$CAQ_CACHE_DIR/zoo (default ~/.cache/caq_lightning/zoo)."""
    return Path(os.environ.get("CAQ_CACHE_DIR", "~/.cache/caq_lightning")).expanduser() / "zoo"


def _builtin(name: str) -> TinyPair:
    if name == "smol":  # the real pretrained pair: caq_lightning.zoo_smol
        from caq_lightning.zoo_smol import build_smol_pair

        return build_smol_pair(cache_dir())
    if name not in BUILTINS:
        raise CAQError(f"unknown builtin model '{name}': use one of {', '.join([*BUILTINS, 'smol'])}")
    return build_tiny_pair(cache_dir(), **BUILTINS[name])


def resolve_builtin(name: str, role: str = "teacher") -> Path:
    """Model dir of builtin pair ``name`` for ``role`` ("teacher"/"aligned" or "base"), building it on first use."""
    if role not in ("teacher", "aligned", "base"):
        raise CAQError(f"unknown model role '{role}': use 'teacher' (or 'aligned') or 'base'")
    pair = _builtin(name)
    return pair.base_dir if role == "base" else pair.aligned_dir


def calibration_corpus(name: str) -> Path:
    """Plain pre-training-style text (.txt) of builtin pair ``name``, for calibration."""
    return _builtin(name).calibration_text


def eval_prompts(name: str) -> Path:
    """Held-out jsonl {"prompt", "label": "harmful"|"benign"} of builtin pair ``name``; never trained on."""
    return _builtin(name).eval_prompts


def heldout_text(name: str) -> Path:
    """Plain text of builtin pair ``name`` that no model was trained on, for perplexity and KL."""
    return _builtin(name).heldout_text


def _report(pair: TinyPair, max_new_tokens: int = 32) -> dict:
    """Refusal rates of base and aligned on the held-out prompts (greedy), for the command line below."""
    from caq_lightning.eval.refusal import generate_responses, refusal_logodds

    rows = [json.loads(line) for line in pair.eval_prompts.read_text().splitlines()]
    tok = PreTrainedTokenizerFast.from_pretrained(pair.tokenizer_dir)
    out = {}
    for role, path in (("base", pair.base_dir), ("aligned", pair.aligned_dir)):
        model = LlamaForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        for label in ("harmful", "benign"):
            prompts = [r["prompt"] for r in rows if r["label"] == label]
            replies = generate_responses(model, tok, prompts, max_new_tokens=max_new_tokens)
            out[f"{role}_{label}_refusal"] = sum(map(is_refusal, replies)) / len(replies)
            out[f"{role}_{label}_logodds"] = refusal_logodds(model, tok, prompts).mean().item()
    return out


if __name__ == "__main__":  # python -m caq_lightning.zoo tiny [tiny-realistic ...]: build and report refusal rates
    import sys

    for builtin in sys.argv[1:] or ["tiny"]:
        start = time.perf_counter()
        built = _builtin(builtin)
        print(builtin, built.root, f"{time.perf_counter() - start:.1f}s", json.dumps(_report(built), indent=1))
