"""Quantization quality on the real pair: which rounding and which calibration give a 4-bit model a user would ship.

    python bench/quality.py                          # builtin:smol, every recipe x every bit setting (resumable)
    python bench/quality.py --recipes hadamard_gptq caq_fp_24 --bits W4A4KV4
    python bench/quality.py --long caq_fp_24         # also 64 x 512 test windows for these recipes
    python bench/quality.py --report-only            # rewrite quality.{json,md} from the log
    python bench/quality.py --quick                  # test-size tiny pair, seconds (the test suite runs it)

Every model is evaluated as it would be exported: folded, its weights rounded (RTN or GPTQ on the same
--gptq-samples x 256 WikiText-2 valid tokens for every recipe), with the online runtime attached (activation and KV
quantization, Hadamards). The one exception is ``rtn_plain``, the fake-quant model with no transforms.

Recipes (RECIPES; a ``calibrate`` recipe trains the student's transforms with kl_top, the loss every CAQ method
shares, and relative block reconstruction, on WikiText-2 valid windows, seed 0, then rounds as the recipe says):
  rtn_plain               no transforms, per-channel RTN weights
  hadamard_rtn            R1/R2 random Hadamard, online R3/R4, clip 0.98, no training, RTN
  hadamard_gptq           the same, GPTQ with sequential Hessians (each layer sees the rounded layers before it)
  hadamard_gptq_one_pass  the same, GPTQ with Hessians from one pass over the unrounded model
  hadamard_gptq_ao_mse    sequential GPTQ with act_order and the searched (mse) weight clip: the default since
                          it was measured; the rows above pin GPTQ as first landed (GPTQ_V1)
  caq_*                   calibrations: see RECIPES for each one's settings; all of them are logged
Measures: WikiText-2 test perplexity (--ppl-windows x 256) and its ratio to FP, KL to the FP teacher on the same
windows, harmful and benign refusal on --max-per-set held-out prompts each (greedy, --max-new-tokens), seconds of
calibration and of rounding. Each run is appended to bench/results/quality_log.jsonl; reruns reuse entries whose
key and settings match.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from caq_lightning import zoo  # noqa: E402
from caq_lightning.config import group_settings  # noqa: E402
from caq_lightning.data import CalibrationData  # noqa: E402
from caq_lightning.eval.suite import evaluate_model, read_prompts  # noqa: E402
from caq_lightning.fold import fold  # noqa: E402
from caq_lightning.loading import load_model, load_tokenizer  # noqa: E402
from caq_lightning.module import CAQModule  # noqa: E402
from caq_lightning.outputs import sha256  # noqa: E402
from caq_lightning.student import CAQStudent, QuantConfig, StudentView  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_safety", Path(__file__).with_name("safety.py"))
_safety = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_safety)
RunLog = _safety.RunLog

RESULTS = Path(__file__).resolve().parent / "results"
BITS = {
    "W4A16": dict(w_bits=4, a_bits=16, kv_bits=16),
    "W4A8KV8": dict(w_bits=4, a_bits=8, kv_bits=8),
    "W4A4KV16": dict(w_bits=4, a_bits=4, kv_bits=16),
    "W4A4KV4": dict(w_bits=4, a_bits=4, kv_bits=4),
    "W4A8KV16": dict(w_bits=4, a_bits=8, kv_bits=16),  # the serving profile's W4A8 (vLLM keeps a 16-bit KV cache)
}
# The serving profile (docs/serve.md): what compressed-tensors W4A4/W4A8 and vLLM express; at W4A4KV16 / W4A8KV16
SERVE = dict(profile="serve", a_symmetric=True, online_r3=False)
# What every calibration shares unless its recipe says otherwise (the real configs' settings, kl_top's paper k).
CALIBRATE = dict(loss="kl_top", recon="relative", recon_weight=1.0, dtype="bfloat16", rtn_kl_every=0,
                 w_train="fp", steps=24, batch_size=2, seq_len=256, lr_rotation=1.5e-3, lr_scale=5e-3,
                 lr_clip=5e-3, lr_schedule="cosine", precision="bf16-mixed", targets="live")  # fmt: skip
# GPTQ as first landed (no act_order, the fixed 0.98 clip), pinned so that these rows keep their meaning
GPTQ_V1 = dict(gptq_act_order=False, w_clip_search="none")
GPTQ_V2 = dict(gptq_act_order=True, w_clip_search="mse")  # today's default, pinned too
RECIPES: dict[str, dict] = {
    "rtn_plain": dict(kind="plain"),
    "hadamard_rtn": dict(kind="init", w_rounding="rtn", **GPTQ_V1),
    "hadamard_gptq": dict(kind="init", w_rounding="gptq", gptq_hessians="sequential", **GPTQ_V1),
    "hadamard_gptq_one_pass": dict(kind="init", w_rounding="gptq", gptq_hessians="one_pass", **GPTQ_V1),
    "hadamard_gptq_act_order": dict(kind="init", w_rounding="gptq", gptq_act_order=True, w_clip_search="none"),
    "hadamard_gptq_mse_clip": dict(kind="init", w_rounding="gptq", gptq_act_order=False, w_clip_search="mse"),
    "hadamard_gptq_ao_mse": dict(kind="init", w_rounding="gptq", gptq_act_order=True, w_clip_search="mse"),
    "hadamard_gptq_aclip0.9": dict(kind="init", w_rounding="gptq", a_clip_ratio=0.9, kv_clip_ratio=0.9, **GPTQ_V1),
    "hadamard_gptq_kv_g32": dict(kind="init", w_rounding="gptq", kv_group_size=32, **GPTQ_V1),  # per head is 64
    "hadamard_gptq_ao_mse_kv_g32": dict(kind="init", w_rounding="gptq", kv_group_size=32, **GPTQ_V2),
    # calibrations: FP weights in training then GPTQ (the AAQ code) vs fake-quant RTN weights with learned clip
    "caq_fp_24": dict(kind="calibrate", w_rounding="gptq", **GPTQ_V1),
    "caq_fp_24_ao_mse": dict(kind="calibrate", w_rounding="gptq", gptq_act_order=True, w_clip_search="mse"),
    "caq_fp_100_ao_mse": dict(kind="calibrate", w_rounding="gptq", steps=100, **GPTQ_V2),
    "caq_fp_200_ao_mse": dict(kind="calibrate", w_rounding="gptq", steps=200, **GPTQ_V2),
    "caq_fp_24_ao_mse_const_lr": dict(kind="calibrate", w_rounding="gptq", lr_schedule="constant", **GPTQ_V2),
    "caq_fp_24_ao_mse_b8": dict(kind="calibrate", w_rounding="gptq", batch_size=8, **GPTQ_V2),
    "caq_fp_24_ao_mse_lr5x": dict(kind="calibrate", w_rounding="gptq", lr_rotation=7.5e-3, lr_scale=2.5e-2,
                                  **GPTQ_V2),
    "caq_fp_24_ao_mse_lr10x": dict(kind="calibrate", w_rounding="gptq", lr_rotation=1.5e-2, lr_scale=5e-2,
                                   **GPTQ_V2),
    "serve_gptq": dict(kind="init", w_rounding="gptq", **SERVE, **GPTQ_V2),
    "serve_caq_fp_24": dict(kind="calibrate", w_rounding="gptq", **SERVE, **GPTQ_V2),
    "caq_rtn_24": dict(kind="calibrate", w_rounding="gptq", w_train="rtn", **GPTQ_V1),
    "caq_rtn_24_rtn": dict(kind="calibrate", w_rounding="rtn", w_train="rtn", **GPTQ_V1),  # the landed recipe
    "caq_fp_24_lr0.2x": dict(kind="calibrate", w_rounding="gptq", lr_rotation=3e-4, lr_scale=1e-3, **GPTQ_V1),
    "caq_fp_24_b8": dict(kind="calibrate", w_rounding="gptq", batch_size=8, **GPTQ_V1),
    "caq_fp_100": dict(kind="calibrate", w_rounding="gptq", steps=100, **GPTQ_V1),
}
QUICK = dict(steps=4, top_k=64)
QUICK_RECIPES = ("rtn_plain", "hadamard_rtn", "hadamard_gptq", "caq_fp_24", "caq_rtn_24")  # the test-size tiny pair's vocabulary (320) is below k=500


def settings_of(recipe: str, bits: str, quick: bool) -> dict:
    """Every setting that changes the result of ``recipe`` at ``bits`` (the log key holds all of it)."""
    r = dict(RECIPES[recipe])
    out = {**BITS[bits], **r}
    if r["kind"] == "calibrate":
        out = {**BITS[bits], **CALIBRATE, **r, **(QUICK if quick else {})}
    return out


class Pair:
    """The pair's tokenizer, prompts, held-out text, FP teacher and GPTQ calibration batches, loaded on first use."""

    def __init__(self, name: str, args) -> None:
        self.pair = zoo.builtin_pair(name)
        self.args = args
        self.prompts = read_prompts(self.pair.eval_prompts)
        self.text = Path(self.pair.heldout_text).read_text()

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(str(self.pair.aligned_dir))

    @functools.cached_property
    def teacher(self) -> torch.nn.Module:
        return load_model(str(self.pair.aligned_dir))

    def data(self, num_samples: int, batch_size: int, seq_len: int, seed: int = 0) -> CalibrationData:
        data = CalibrationData(source=str(self.pair.calibration_text), tokenizer=str(self.pair.aligned_dir),
                               num_samples=num_samples, seq_len=seq_len, batch_size=batch_size, seed=seed)  # fmt: skip
        data.setup("fit")
        return data

    @functools.cached_property
    def gptq_batches(self) -> list[dict]:
        """The same GPTQ calibration for every recipe: --gptq-samples x 256 tokens of WikiText-2 valid."""
        return list(self.data(self.args.gptq_samples, 8, 256, seed=1234).train_dataloader())

    def evaluate(self, model, windows: int, seq_len: int, refusal: bool = True) -> dict:
        a = self.args
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = evaluate_model(
                model, self.tokenizer, self.prompts if refusal else None, self.text, teacher=self.teacher,
                max_new_tokens=a.max_new_tokens, batch_size=16, seq_len=seq_len, max_windows=windows,
                max_per_set=a.max_per_set,
            )  # fmt: skip
        keys = ("perplexity", "kl_teacher", "harmful_refusal_rate", "benign_refusal_rate")
        return {k: (None if out.get(k) is None else float(out[k])) for k in keys}


def build(pair: Pair, recipe: str, bits: str, quick: bool) -> tuple[torch.nn.Module, dict]:
    """The model ``recipe`` exports at ``bits``, and its seconds of calibration and rounding."""
    s = settings_of(recipe, bits, quick)
    quant_keys = {f for f in QuantConfig.__dataclass_fields__}
    if s["kind"] == "plain":
        student = CAQStudent(load_model(str(pair.pair.aligned_dir)), QuantConfig(**BITS[bits]))
        return StudentView(student, False, True), {"steps": 0, "seconds_calibrate": 0.0, "seconds_round": 0.0}
    steps, seconds = 0, 0.0
    if s["kind"] == "init":
        student = CAQStudent(load_model(str(pair.pair.aligned_dir)),
                             QuantConfig(**{k: v for k, v in s.items() if k in quant_keys}))  # fmt: skip
    else:
        L.seed_everything(0, verbose=False)
        skip = {"kind", "steps", "batch_size", "seq_len", "precision", "targets"}
        module = CAQModule(teacher=str(pair.pair.aligned_dir), base=str(pair.pair.base_dir),
                           targets={"kind": s["targets"]}, **group_settings(**{k: v for k, v in s.items()
                                                                                if k not in skip}))  # fmt: skip
        trainer = L.Trainer(
            max_steps=s["steps"], accelerator="cpu", devices=1, precision=s["precision"], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
            default_root_dir=str(pair.args.work_dir / f"{recipe}-{bits}"),
        )  # fmt: skip
        data = pair.data(s["steps"] * s["batch_size"], s["batch_size"], s["seq_len"])
        start = time.perf_counter()
        trainer.fit(module, data)
        steps, seconds = trainer.global_step, time.perf_counter() - start
        student = module.student
        student.eval()
    start = time.perf_counter()
    folded = fold(student, calibration=pair.gptq_batches)
    return folded.model, {"steps": steps, "seconds_calibrate": seconds, "seconds_round": time.perf_counter() - start}


def run(pair: Pair, log: RunLog, recipe: str, bits: str, args) -> dict | None:
    key = {"recipe": recipe, "bits": bits, "config": settings_of(recipe, bits, args.quick)}
    found = log.find(key)
    add_long = found is not None and recipe in args.long and "perplexity_long" not in found
    if (found is None or add_long) and not args.report_only:
        model, cost = build(pair, recipe, bits, args.quick)  # for add_long: rebuilt, the same seed and data
        found = found or {**pair.evaluate(model, args.ppl_windows, 256), **cost}
        if recipe in args.long:
            long = pair.evaluate(model, args.long_windows, 512, refusal=False)
            found.update(perplexity_long=long["perplexity"], kl_teacher_long=long["kl_teacher"])
        log.add(key, found)
        print(f"{bits} {recipe}: ppl {found['perplexity']:.2f} kl {found['kl_teacher']:.3f} harmful "
              f"{found['harmful_refusal_rate']:.2f} benign {found['benign_refusal_rate']:.2f} "
              f"({cost['seconds_calibrate']:.0f}s + {cost['seconds_round']:.0f}s)", flush=True)  # fmt: skip
    return found


def report(log: RunLog, fp: dict, args) -> dict:
    """quality.json rows (every logged entry under these settings) and quality.md (ratio tables)."""
    rows = []
    for text, value in log.done.items():
        key = json.loads(text)
        if key["recipe"] not in RECIPES:  # the FP row
            continue
        rows.append({"recipe": key["recipe"], "bits": key["bits"], **value, "fp_perplexity": fp["perplexity"],
                     "perplexity_ratio": value["perplexity"] / fp["perplexity"],
                     "fp_harmful_refusal_rate": fp["harmful_refusal_rate"],
                     "seconds": value["seconds_calibrate"] + value["seconds_round"], "config": key["config"]})  # fmt: skip
    out = {"settings": log.settings, "fp": fp, "rows": rows}
    stem = "quality_quick" if args.quick else "quality"
    (Path(args.out) / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    (Path(args.out) / f"{stem}.md").write_text(markdown(out))
    if Path(args.out).resolve() == RESULTS and not args.quick:
        sync_readme(markdown(out))
    return out


README = RESULTS.parents[1] / "README.md"
README_MARKS = ("<!-- quality table: from bench/results/quality.md -->", "<!-- end quality table -->")


def sync_readme(md: str) -> None:
    """The README's quality table is quality.md's first two paragraphs (the FP line and the ratio table)."""
    text = README.read_text()
    start, end = README_MARKS
    if start not in text or end not in text:
        return
    head = "\n\n".join(md.split("\n\n")[:2]).strip()
    before, rest = text.split(start, 1)
    README.write_text(f"{before}{start}\n{head}\n{end}{rest.split(end, 1)[1]}")


def markdown(out: dict) -> str:
    fp = out["fp"]
    cells: dict[str, dict[str, str]] = {}
    for r in out["rows"]:
        cells.setdefault(r["recipe"], {})[r["bits"]] = (
            f"{r['perplexity_ratio']:.2f}x / {100 * r['harmful_refusal_rate']:.0f}% / "
            f"{100 * r['benign_refusal_rate']:.0f}%"
        )
    bits = [b for b in BITS if any(b in c for c in cells.values())]
    lines = [
        f"FP aligned: perplexity {fp['perplexity']:.2f}, harmful refusal {100 * fp['harmful_refusal_rate']:.0f}%, "
        f"benign {100 * fp['benign_refusal_rate']:.0f}%. Cells: perplexity / FP, harmful refusal, benign refusal.",
        "",
        "| recipe | " + " | ".join(bits) + " |",
        "|---|" + "---|" * len(bits),
    ]
    lines += [f"| {name} | " + " | ".join(c.get(b, "–") for b in bits) + " |" for name, c in cells.items()]
    lines += ["", "| recipe | bits | perplexity | KL to FP | harmful | benign | steps | s calibrate | s round |"
              " ppl 64x512 |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    fp_long = out["fp"].get("perplexity_long")
    for r in out["rows"]:
        long = r.get("perplexity_long")
        if long is not None and fp_long:
            long = f"{long:.2f} ({long / fp_long:.2f}x of FP {fp_long:.2f})"
        lines.append(
            f"| {r['recipe']} | {r['bits']} | {r['perplexity']:.2f} | {r['kl_teacher']:.3f} | "
            f"{100 * r['harmful_refusal_rate']:.0f}% | {100 * r['benign_refusal_rate']:.0f}% | {r['steps']} | "
            f"{r['seconds_calibrate']:.0f} | {r['seconds_round']:.0f} | {'–' if long is None else long} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="test-size tiny pair, 4 calibration steps")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--bits", nargs="+", choices=list(BITS), default=[b for b in BITS if b != "W4A8KV16"])
    p.add_argument("--long", nargs="*", default=[], help="recipes also measured on 64 x 512 test windows")
    p.add_argument("--long-windows", type=int, default=64)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--max-per-set", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--gptq-samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--report-only", action="store_true", help="write the reports from the log; run nothing")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    name = "tiny-test" if args.quick else "smol"
    if args.quick:
        args.recipes = [r for r in args.recipes if r in QUICK_RECIPES]
        args.ppl_windows, args.max_per_set, args.max_new_tokens, args.gptq_samples = 4, 8, 8, 8
        args.long_windows = 4
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir = Path(os.environ.get("CAQ_CACHE_DIR", "~/.cache/caq_lightning")).expanduser() / "bench_quality"
    stem = "quality_quick" if args.quick else "quality"
    pair = Pair(name, args)  # builds the pair if it is not cached
    weights = sha256(Path(pair.pair.aligned_dir) / "model.safetensors")[:12]  # rows on other weights never match
    settings = {"pair": f"{name}@{weights}", "ppl_windows": args.ppl_windows, "max_per_set": args.max_per_set,
                "max_new_tokens": args.max_new_tokens, "gptq_samples": args.gptq_samples,
                "long_windows": args.long_windows}  # fmt: skip
    log = RunLog(args.out / f"{stem}_log.jsonl", time.strftime("%Y-%m-%dT%H:%M:%S"), settings, resume=True)
    fp_key = {"recipe": "fp_aligned", "bits": None, "config": {}}
    fp = log.find(fp_key)
    if fp is None and not args.report_only:
        fp = pair.evaluate(pair.teacher, args.ppl_windows, 256)
        log.add(fp_key, fp)
    if fp is None:
        raise SystemExit("nothing logged yet under these settings: run without --report-only")
    if args.long and "perplexity_long" not in fp and not args.report_only:
        long = pair.evaluate(pair.teacher, args.long_windows, 512, refusal=False)
        fp = {**fp, "perplexity_long": long["perplexity"], "kl_teacher_long": long["kl_teacher"]}
        log.add(fp_key, fp)
    for bits in args.bits:
        for recipe in args.recipes:
            if run(pair, log, recipe, bits, args) is not None:
                report(log, fp, args)
    return report(log, fp, args)


if __name__ == "__main__":
    main()
