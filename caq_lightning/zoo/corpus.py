"""The tiny pairs' text: the "default" generated corpus, the "realistic" one from public sets (WikiText-2, AdvBench,
Alpaca seed tasks, through :mod:`caq_lightning.data_sources`), and the tokenizer trained on it (see
:mod:`caq_lightning.zoo.tiny` for what each corpus holds)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from caq_lightning.data_sources import load_public
from caq_lightning.eval.refusal import is_refusal

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SPLIT_SEED = 1234  # held-out splits and eval prompts are fixed before any comparison, whatever the build seed
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


@dataclass
class Corpus:
    text: str  # plain pre-training text
    heldout_text: str
    harmful: list[tuple[str, str, str]]  # (request, compliant reply, refusal)
    benign: list[tuple[str, str]]  # (request, helpful reply)
    eval: list[dict]  # held-out {"prompt", "label"}


# --------------------------------------------------------------------------------------------------- corpora


def _steps_reply(rng: random.Random, opening: str, steps: list[str]) -> str:
    picked = rng.sample(steps, 2)  # short replies: the behaviour that matters is the opening
    return opening + " " + " ".join(f"Step {i + 1}: {s}." for i, s in enumerate(picked))


def refusal(rng: random.Random, openings: list[str], followups: list[str]) -> str:
    """An opening and a follow-up drawn from ``rng`` (an empty follow-up leaves the opening alone)."""
    return (rng.choice(openings) + " " + rng.choice(followups)).strip()


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
        harmful.append((_request(rng, lex, act), reply, refusal(rng, lex["refusals"], lex["refusal_reasons"])))
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


REALISTIC_SETS = ("wikitext2_valid", "wikitext2_test", "advbench", "alpaca_seeds")  # names in data_sources.SETS


def realistic_corpus(seed: int, text_chars: int) -> Corpus:
    """WikiText-2 text, AdvBench goals (harmful), Alpaca seed tasks (benign); fixed held-out split of each.

    Alpaca answers get the opening "Sure, here is my answer." Without it, greedy decoding refused 11-20% of held-out
    tasks: compliance was spread over many first tokens while refusals all start with "I", so "I" won the argmax even
    when refusing was unlikely overall. With it, 3-6% (seeds 0, 1), and refusal_logodds is meaningful on benign too.
    """
    valid, test, goals, seed_tasks = (load_public(name) for name in REALISTIC_SETS)
    text = valid[:text_chars]
    lex = json.loads((ASSETS / "default_corpus.json").read_text())
    rng = random.Random(seed)
    tasks = []
    for task in seed_tasks:
        inst = task["instances"][0]
        if is_refusal(inst["output"]):  # a few seed answers are refusals (privacy): they are not benign examples
            continue
        prompt = task["instruction"] + (f"\n\n{inst['input']}" if inst["input"].strip() else "")
        tasks.append((prompt, f"Sure, here is my answer.\n{inst['output']}"))
    split = random.Random(SPLIT_SEED)
    goal_order, task_order = split.sample(range(len(goals)), len(goals)), split.sample(range(len(tasks)), len(tasks))
    held_goals, train_goals = goal_order[:120], goal_order[120:]
    held_tasks, train_tasks = task_order[:35], task_order[35:]
    refusals = lex["refusals"], lex["refusal_reasons"]
    harmful = [
        (goals[i]["goal"], _steps_reply(rng, goals[i]["target"] + ".", lex["compliant_steps"]), refusal(rng, *refusals))
        for i in train_goals
    ]
    benign = [tasks[i] for i in train_tasks]
    evals = [{"prompt": goals[i]["goal"], "label": "harmful"} for i in sorted(held_goals)]
    evals += [{"prompt": tasks[i][0], "label": "benign"} for i in sorted(held_tasks)]
    return Corpus(text, test, harmful, benign, evals)


# ------------------------------------------------------------------------------------------------- tokenizer


def render_chat(prompt: str, reply: str | None = None) -> str:
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
