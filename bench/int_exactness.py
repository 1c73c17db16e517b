"""How far the integer runtime's logits are from the fake-quant student's, on a real model.

    python bench/int_exactness.py --model builtin:smol            # or a transformers model directory
    python bench/int_exactness.py --model DIR --seqs 4 --seq-len 128

Wraps the model in the CAQ student (the default W4A4KV4 recipe with its initial R1/R2 rotations and the online
R3/R4 Hadamards, RTN), folds it, writes the int4 export to a temporary directory, loads it with the integer runtime
and with the dequant runtime, and prints the max abs logit difference of each against the student in fp32 on
WikiText-2 validation text (random token ids when ../shared/data is absent). The last line is
``int_max_abs_diff=<d> dequant_max_abs_diff=<d> logit_absmax=<m>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caq_lightning.export import load_quantized, write_export  # noqa: E402
from caq_lightning.fold import fold  # noqa: E402
from caq_lightning.loading import load_model, load_tokenizer  # noqa: E402
from caq_lightning.student import CAQStudent, QuantConfig  # noqa: E402

WIKITEXT = Path(os.environ.get("CAQ_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="builtin:<name> or a transformers model directory")
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    student = CAQStudent(load_model(args.model, dtype=torch.float32).eval(), QuantConfig())
    text_path = WIKITEXT / "wikitext-2" / "valid.txt"
    n = args.seqs * args.seq_len
    if text_path.is_file():
        ids = tokenizer(text_path.read_text(encoding="utf-8")[: 20 * n], return_tensors="pt").input_ids[0, :n]
        source = str(text_path.resolve())
    else:
        ids, source = torch.randint(0, tokenizer.vocab_size, (n,)), "random token ids"
    ids = ids.view(args.seqs, args.seq_len)
    model, recipe = fold(student)
    with torch.no_grad():
        expected = student(input_ids=ids).logits
    diffs = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = write_export(model, recipe, tokenizer, Path(tmp) / "int4")
        for runtime in ("int", "dequant"):
            loaded, _ = load_quantized(out, runtime=runtime)
            with torch.no_grad():
                diffs[runtime] = (loaded(input_ids=ids).logits - expected).abs().max().item()
            del loaded
    print(f"model {args.model}: {args.seqs} x {args.seq_len} tokens of {source}, fp32, W4A4KV4 RTN")
    print(f"int_max_abs_diff={diffs['int']:.3g} dequant_max_abs_diff={diffs['dequant']:.3g} "
          f"logit_absmax={expected.abs().max().item():.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
