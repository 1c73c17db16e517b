"""Safety evaluation CLI: refusal rates and log-odds, perplexity, KL to teacher/base, XSTest, HarmBench, SafetyBench.

    python -m caq_lightning.evaluate --model PATH [--prompts FILE.jsonl] [--ppl-text FILE] [--teacher PATH]
        [--base PATH] [--xstest] [--xstest-unsafe] [--harmbench] [--safetybench] [--max-new-tokens N] [--max-per-set N]
        [--runtime int|dequant] [--per-prompt] [--out results.json] [--quiet]

PATH is a transformers model directory, a hub id, ``builtin:<name>``, or an int4 export directory (has manifest.json).
Prints the results as JSON; a bad input prints one ``error: ...`` line and exits with code 2. The public sets
(XSTest, HarmBench, SafetyBench, WikiText-2) load from the hub by id, or from $CAQ_DATA_DIR (docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from caq_lightning.env import DTYPES
from caq_lightning.errors import CAQError, print_error
from caq_lightning.loading import BUILTIN_PREFIX, EXPORT_FORMAT_PREFIX, load_model, load_tokenizer
from caq_lightning.progress import set_quiet



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m caq_lightning.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model dir, hub id, builtin:<name>, or int4 export dir")
    p.add_argument("--prompts", help='jsonl of {"prompt": ..., "label": "harmful"|"benign"} (default for builtin:)')
    p.add_argument("--ppl-text", help="plain text for perplexity/KL (default with --teacher/--base: WikiText-2 test)")
    p.add_argument("--teacher", help="FP aligned model: report mean per-token KL(teacher || model)")
    p.add_argument("--base", help="FP pre-trained model: report mean per-token KL(base || model)")
    p.add_argument("--xstest", action="store_true", help="over-refusal on XSTest's 250 safe prompts")
    p.add_argument("--xstest-unsafe", action="store_true", help="refusal on XSTest's 200 unsafe prompts")
    p.add_argument("--harmbench", action="store_true", help="refusal on HarmBench's standard behaviours")
    p.add_argument("--safetybench", action="store_true", help="SafetyBench dev (en) accuracy, option log-likelihood")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-per-set", type=int, help="at most this many prompts of each set (a fixed seeded sample)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256, help="perplexity window length in tokens")
    p.add_argument("--ppl-windows", type=int, default=32, help="at most this many perplexity windows")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--runtime", choices=["int", "dequant"], default="int",
        help="int4 exports: integer matmuls (default) or dequantize per forward",
    )  # fmt: skip
    p.add_argument(
        "--per-prompt", action="store_true",
        help="also report <set>_refused: one true/false per prompt of each set's sample, in order",
    )  # fmt: skip
    p.add_argument("--out", help="also write the JSON results to this file")
    p.add_argument("--quiet", action="store_true", help="one line per evaluation phase instead of progress bars")
    return p.parse_args(argv)


def is_int4_export(path: str) -> bool:
    """Whether ``path`` is an int4 export dir: it has a manifest.json, and that manifest is not the model cache's
    (``{"files": ...}`` beside a full-precision model, as the zoo writes for its pairs)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return True  # a broken export manifest: load_quantized names the fix
    if not (isinstance(data, dict) and set(data) == {"files"}):
        return True
    try:
        qcfg = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return True
    return isinstance(qcfg, dict) and str(qcfg.get("format", "")).startswith(EXPORT_FORMAT_PREFIX)


def load_for_eval(path: str, role: str, dtype: torch.dtype, device: str, runtime: str = "int"):
    """(model, tokenizer) from an int4 export dir (manifest.json, run by ``runtime``), a model dir, a hub id or
    ``builtin:<name>``."""
    if is_int4_export(path):
        try:
            from caq_lightning.export import load_quantized
        except ImportError as err:
            raise CAQError(
                f"'{path}' is an int4 export but caq_lightning.export cannot be imported ({err}): "
                "install the full caq-lightning package or evaluate the fake-quant checkpoint instead"
            ) from None
        model, tokenizer = load_quantized(path, runtime=runtime)
    else:
        model, tokenizer = load_model(path, role=role, dtype=dtype), load_tokenizer(path, role=role)
    return model.to(device), tokenizer


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise CAQError(f"--{name} must be >= 1, got {value}")


def run(args: argparse.Namespace, model: torch.nn.Module | None = None) -> dict:
    """The evaluation ``args`` ask for; ``model`` (a loaded model, e.g. bitsandbytes-quantized) is evaluated in place
    of ``--model``, whose tokenizer it uses."""
    from caq_lightning.eval.suite import (
        evaluate_model, load_requested_sets, read_prompts, read_text, wikitext2_test_text,
    )  # fmt: skip

    for name in ("max_new_tokens", "batch_size", "seq_len", "ppl_windows", "max_per_set"):
        if getattr(args, name) is not None:
            _positive(name.replace("_", "-"), getattr(args, name))
    ppl_text = None
    if args.ppl_text is not None:
        if not Path(args.ppl_text).is_file():
            raise CAQError(f"--ppl-text file '{args.ppl_text}' not found: pass an existing plain-text file")
        ppl_text = read_text(args.ppl_text, "--ppl-text file")
    elif args.teacher or args.base:  # KL is measured on held-out text: WikiText-2 test unless --ppl-text is given
        ppl_text = wikitext2_test_text()
    # Every public set loads before any model or builtin pair: a missing one is one line in seconds.
    sets = load_requested_sets(args.xstest, args.xstest_unsafe, args.harmbench, args.safetybench)

    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.model.startswith(BUILTIN_PREFIX):
        from caq_lightning import zoo

        prompts = read_prompts(zoo.eval_prompts(args.model[len(BUILTIN_PREFIX) :]))
    else:
        raise CAQError("no prompts to score: pass --prompts FILE.jsonl with {\"prompt\", \"label\"} lines")

    dtype = DTYPES[args.dtype]
    if model is None:
        model, tokenizer = load_for_eval(args.model, "teacher", dtype, args.device, args.runtime)
    else:
        tokenizer = load_tokenizer(args.model)
    teacher = load_model(args.teacher, role="teacher", dtype=dtype).to(args.device) if args.teacher else None
    base = load_model(args.base, role="base", dtype=dtype).to(args.device) if args.base else None
    return evaluate_model(
        model,
        tokenizer,
        prompts,
        ppl_text,
        teacher=teacher,
        base=base,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_windows=args.ppl_windows,
        xstest=args.xstest,
        safetybench=args.safetybench,
        xstest_unsafe=args.xstest_unsafe,
        harmbench=args.harmbench,
        max_per_set=args.max_per_set,
        sets=sets,
        per_prompt=args.per_prompt,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quiet:
        set_quiet()
    try:
        results = run(args)
    except CAQError as err:
        return print_error(str(err))
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
