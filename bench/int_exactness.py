"""How far the integer runtime's logits are from the fake-quant student's, on a real model.

    python bench/int_exactness.py --model builtin:smol            # or a transformers model directory
    python bench/int_exactness.py --model DIR --seqs 4 --seq-len 128

Wraps the model in the CAQ student (the default W4A4KV4 recipe with its initial R1/R2 rotations and the online
R3/R4 Hadamards, RTN), folds it, writes the int4 export to a temporary directory, loads it with the integer runtime
and with the dequant runtime, and compares their fp32 logits with the student's on WikiText-2 validation text
(random token ids when the set cannot be loaded): max and mean abs difference, top-1 agreement and mean
KL(student || runtime). For scale, the same figures for two float-rounding-sized changes of the dequant runtime
(which equals the student bit for bit): its matmuls in float64, and its Linear outputs times (1 + 1e-7 noise).
Where W4A4 is chaotic (a real model with massive activations), a rounding difference flips a few activation codes
and the flips grow through the layers; the integer path then differs from the student as much as these controls
do, and no more. The last line is
``int_max_abs_diff=<d> dequant_max_abs_diff=<d> float64_max_abs_diff=<d> noise1e-7_max_abs_diff=<d> logit_absmax=<m>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caq_lightning.export import Int4Linear, load_quantized, write_export  # noqa: E402
from caq_lightning.fold import fold  # noqa: E402
from caq_lightning.loading import load_model, load_tokenizer  # noqa: E402
from caq_lightning.student import CAQStudent, QuantConfig  # noqa: E402
from caq_lightning.data_sources import load_public  # noqa: E402
from caq_lightning.errors import CAQError  # noqa: E402


def compare(got: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """Figures of ``got`` against ``expected`` logits (B, T, V)."""
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none")
    return {
        "max_abs": (got - expected).abs().max().item(),
        "mean_abs": (got - expected).abs().mean().item(),
        "top1_agree": (got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
        "mean_kl": kl.sum(-1).mean().item(),
    }



def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="builtin:<name> or a transformers model directory")
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--a-bits", type=int, default=4, help="activation bits (8: a regime where W4 is not chaotic)")
    p.add_argument("--kv-bits", type=int, default=4)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    config = QuantConfig(a_bits=args.a_bits, kv_bits=args.kv_bits)
    student = CAQStudent(load_model(args.model, dtype=torch.float32).eval(), config)
    n = args.seqs * args.seq_len
    try:
        ids = tokenizer(load_public("wikitext2_valid")[: 20 * n], return_tensors="pt").input_ids[0, :n]
        source = "WikiText-2 valid"
    except CAQError:
        ids, source = torch.randint(0, tokenizer.vocab_size, (n,)), "random token ids"
    ids = ids.view(args.seqs, args.seq_len)
    model, recipe = fold(student)
    with torch.no_grad():
        expected = student(input_ids=ids).logits
    figures = {}
    plain = Int4Linear.forward
    controls = {
        "int": None,
        "dequant": plain,
        "float64": lambda self, x: F.linear(x.double(), self.dequantized_weight().double()).float(),
        "noise1e-7": lambda self, x: (lambda y: y * (1 + 1e-7 * torch.randn_like(y)))(plain(self, x)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = write_export(model, recipe, tokenizer, Path(tmp) / "int4")
        for name, forward in controls.items():
            loaded, _ = load_quantized(out, runtime="int" if forward is None else "dequant")
            Int4Linear.forward = forward or plain
            try:
                with torch.no_grad():
                    figures[name] = compare(loaded(input_ids=ids).logits, expected)
            finally:
                Int4Linear.forward = plain
            del loaded
    bits = f"W4A{args.a_bits}KV{args.kv_bits}"
    print(f"model {args.model}: {args.seqs} x {args.seq_len} tokens of {source}, fp32, {bits} RTN")
    print(f"logits of the student (batched): abs max {expected.abs().max().item():.3g}")
    for name, f in figures.items():
        print(f"{name} vs student: max abs {f['max_abs']:.3g}, mean abs {f['mean_abs']:.3g}, "
              f"top-1 agreement {f['top1_agree']:.4f}, mean KL {f['mean_kl']:.3g}")  # fmt: skip
    print(" ".join(f"{name}_max_abs_diff={f['max_abs']:.3g}" for name, f in figures.items())
          + f" logit_absmax={expected.abs().max().item():.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
