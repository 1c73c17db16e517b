"""python -m caq_lightning.zoo [--quiet] [--report] [NAME ...] [field=value ...]

Builds (or finds in the cache) the builtin pairs NAME (tiny, tiny-realistic, tiny-test, smol; default tiny) and
prints one line per pair: its name, cache entry, base model dir and the seconds it took. ``field=value`` sets a field
of smol's recipe (caq_lightning.zoo.smol.Recipe, e.g. steps=120 lr=1e-3). ``--report`` then measures base and
aligned refusal on the pair's held-out prompts (greedy replies: minutes on CPU, much longer for smol). A bad input
(e.g. a public set that is neither in $CAQ_DATA_DIR nor reachable) is one error line, before anything is built."""

import json
import sys
import time

from transformers import AutoModelForCausalLM, AutoTokenizer

from caq_lightning.errors import CAQError, fail
from caq_lightning.eval.refusal import generate_responses, is_refusal, refusal_logodds
from caq_lightning.progress import Progress, set_quiet
from caq_lightning.zoo import BUILTINS, TinyPair, builtin_pair


def refusal_report(pair: TinyPair, max_new_tokens: int = 32) -> dict:
    """Refusal rates and log-odds of base and aligned on the pair's held-out prompts (greedy)."""
    rows = [json.loads(line) for line in pair.eval_prompts.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(pair.tokenizer_dir)
    out = {}
    for role, path in (("base", pair.base_dir), ("aligned", pair.aligned_dir)):
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        for label in ("harmful", "benign"):
            prompts = [r["prompt"] for r in rows if r["label"] == label]
            with Progress(f"{role}: {label} prompts", 3 * -(-len(prompts) // 16), "batch") as bar:
                replies = generate_responses(model, tok, prompts, max_new_tokens=max_new_tokens, bar=bar)
                logodds = refusal_logodds(model, tok, prompts, bar=bar).mean().item()
            out[f"{role}_{label}_refusal"] = sum(map(is_refusal, replies)) / len(replies)
            out[f"{role}_{label}_logodds"] = logodds
    return out


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    flags = {a for a in argv if a.startswith("--")}
    unknown = sorted(flags - {"--quiet", "--report"})
    if unknown:
        fail(f"unknown option {unknown[0]}: use --quiet, --report, --help, pair names and smol field=value")
    if "--quiet" in flags:
        set_quiet()
    names = [a for a in argv if a not in flags and "=" not in a] or ["tiny"]
    overrides = dict(a.split("=", 1) for a in argv if a not in flags and "=" in a)
    try:
        bad = [n for n in names if n not in (*BUILTINS, "smol")]
        if bad:
            raise CAQError(f"unknown builtin model '{bad[0]}': use one of {', '.join([*BUILTINS, 'smol'])}")
        recipe = {}
        if overrides:
            if "smol" not in names:
                raise CAQError(f"recipe fields ({', '.join(sorted(overrides))}) apply to smol: name it")
            from caq_lightning.zoo.smol import recipe_from

            recipe = {k: getattr(recipe_from(overrides), k) for k in overrides}  # checked before any build
        for name in names:
            start = time.perf_counter()
            pair = builtin_pair(name, **(recipe if name == "smol" else {}))
            print(name, pair.root, pair.base_dir, f"{time.perf_counter() - start:.1f}s", flush=True)
            if "--report" in flags:
                print(json.dumps(refusal_report(pair), indent=1), flush=True)
    except CAQError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
