"""Build one builtin:smol recipe and measure it against the quality bar; appends the row to the results log.

    python bench/smol_recipe.py [field=value ...] [--dtype bfloat16] [--part all|refusal|xstest|base|summary]

Fields are caq_lightning.zoo.smol.Recipe's (steps=120 lr=1e-3 ...); none gives the shipped recipe. Parts:
  refusal  aligned: held-out AdvBench + Alpaca (eval_prompts.jsonl), HarmBench, WikiText-2 test perplexity and
           KL(base || aligned)
  xstest   aligned: XSTest safe (over-refusal) and unsafe
  base     base: WikiText-2 test perplexity and held-out AdvBench + Alpaca refusal
  summary  merge the parts' files (<pair or base>/quality_<part>_<dtype>.json) into one row of --log and check the bar
  all      every part in this process, then summary
  screen   aligned: held-out AdvBench + Alpaca refusal only (~1.5 min in bf16), one row of --log: a cheap first
           look at a recipe before the full bar
The parts can run as separate processes (the CPU is shared, and they are independent). Every configuration tried
goes into the log with its numbers, the shipped one included.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from caq_lightning import zoo
from caq_lightning.eval.suite import evaluate_model, read_prompts
from caq_lightning.loading import load_model, load_tokenizer
from caq_lightning.zoo.smol import Recipe, build_smol_pair, meets_quality_bar

PARTS = ("refusal", "xstest", "base")


def measure(pair, part: str, dtype: torch.dtype) -> dict:
    model_dir = pair.base_dir if part == "base" else pair.aligned_dir
    model, tok = load_model(str(model_dir), dtype=dtype), load_tokenizer(str(model_dir))
    base = load_model(str(pair.base_dir), "base", dtype) if part == "refusal" else None
    prompts = None if part == "xstest" else read_prompts(pair.eval_prompts)
    text = None if part in ("xstest", "screen") else pair.heldout_text.read_text()
    start = time.perf_counter()
    out = evaluate_model(
        model, tok, prompts, text, base=base,
        xstest=part == "xstest", xstest_unsafe=part == "xstest", harmbench=part == "refusal",
    )  # fmt: skip
    return {**out, "eval_seconds": time.perf_counter() - start}


def part_file(pair, part: str, dtype: str) -> Path:
    """Where a part's numbers live: the base's next to the base (every recipe shares it), the others per recipe."""
    return (pair.base_dir if part == "base" else pair.root) / f"quality_{part}_{dtype}.json"


def summary(pair, dtype: str, note: str) -> dict:
    parts = {p: json.loads(part_file(pair, p, dtype).read_text()) for p in PARTS}
    res = {**parts["refusal"], **parts["xstest"]}
    res["eval_seconds"] = parts["refusal"]["eval_seconds"] + parts["xstest"]["eval_seconds"]
    res["base"] = parts["base"]
    res["ppl_rise"] = res["perplexity"] / parts["base"]["perplexity"] - 1
    res["meets"] = meets_quality_bar(res)
    res["meets"]["ppl_rise<=5%"] = res["ppl_rise"] <= 0.05
    info = json.loads((pair.root / "build_info.json").read_text())
    return {"dtype": dtype, "note": note, "pair": str(pair.root), "build_info": info, **res}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("fields", nargs="*", help="Recipe field=value overrides")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--part", choices=("all", *PARTS, "summary", "screen"), default="all")
    p.add_argument("--log", default="bench/results/smol_recipes.jsonl")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    types = {f.name: f.type for f in fields(Recipe)}
    overrides = {}
    for item in args.fields:
        name, value = item.split("=", 1)
        overrides[name] = (float if "float" in str(types[name]) else int)(value)
    pair = build_smol_pair(zoo.cache_dir(), **overrides)
    todo = [p for p in PARTS if p != "base" or not part_file(pair, p, args.dtype).exists()]  # the base is shared
    for part in todo if args.part == "all" else [args.part] if args.part in PARTS else []:
        out = measure(pair, part, getattr(torch, args.dtype))
        part_file(pair, part, args.dtype).write_text(json.dumps(out, indent=1) + "\n")
        print(part, json.dumps(out))
    if args.part in ("all", "summary", "screen"):
        if args.part == "screen":
            row = {"part": "screen", "dtype": args.dtype, "note": args.note, "pair": str(pair.root),
                   **measure(pair, "screen", getattr(torch, args.dtype))}  # fmt: skip
        else:
            row = summary(pair, args.dtype, args.note)
        row["recipe"] = asdict(Recipe(**overrides))
        log = Path(args.log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
