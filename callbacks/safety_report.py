"""After calibration, evaluate the FP teacher, plain RTN at the same bits and the CAQ student; write results.json."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from caq_lightning.eval.suite import evaluate_model, read_prompts
from caq_lightning.loading import BUILTIN_PREFIX, load_tokenizer
from caq_lightning.student import StudentView

COLUMNS = ("perplexity", "harmful_refusal_rate", "benign_refusal_rate", "harmful_logodds", "kl_teacher", "kl_base")


class SafetyReport(L.Callback):
    """Writes ``<log_dir>/results.json`` with perplexity, refusal rates and KLs of teacher, RTN and CAQ.

    Args:
        prompts: jsonl of {"prompt", "label": "harmful"|"benign"}; default: the held-out prompts of a builtin pair.
        ppl_text: text file for perplexity and KLs; default: the held-out text of a builtin pair.
        max_new_tokens: greedy tokens generated per prompt to judge refusals.
        max_prompts: cap on prompts per label (None: all), to bound evaluation time.
    """

    def __init__(
        self,
        prompts: str | None = None,
        ppl_text: str | None = None,
        max_new_tokens: int = 24,
        max_prompts: int | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
    ):
        self.prompts, self.ppl_text = prompts, ppl_text
        self.max_new_tokens, self.max_prompts = max_new_tokens, max_prompts
        self.seq_len, self.batch_size = seq_len, batch_size
        self.results: dict | None = None
        self.path: Path | None = None

    def _defaults(self, teacher: str) -> tuple[str | None, str | None]:
        prompts, text = self.prompts, self.ppl_text
        if teacher.startswith(BUILTIN_PREFIX):
            from caq_lightning import zoo

            name = teacher[len(BUILTIN_PREFIX) :]
            prompts = prompts or str(zoo.eval_prompts(name))
            text = text or str(zoo.heldout_text(name))
        return prompts, text

    def _prompts(self, path: str | None) -> list[dict] | None:
        if path is None:
            return None
        rows = read_prompts(path)
        if self.max_prompts is None:
            return rows
        kept: dict[str, int] = {}
        out = []
        for row in rows:
            if kept.get(row["label"], 0) < self.max_prompts:
                kept[row["label"]] = kept.get(row["label"], 0) + 1
                out.append(row)
        return out

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: every rank must call it
        if not trainer.is_global_zero or getattr(trainer, "caq_diverged", False):
            return
        hp = pl_module.hparams
        prompts_path, text_path = self._defaults(hp.teacher)
        prompts = self._prompts(prompts_path)
        text = Path(text_path).read_text() if text_path else None
        tokenizer = load_tokenizer(hp.teacher, "teacher", hp.trust_remote_code)
        student = pl_module.student
        teacher = StudentView(student, transform=False, quant=False)
        views = {"teacher_fp": teacher, "rtn": StudentView(student, False, True), "caq": StudentView(student, True, True)}
        was_training = student.training
        student.eval()
        results = {}
        for name, model in views.items():
            results[name] = evaluate_model(
                model, tokenizer, prompts, text, teacher=teacher, base=pl_module.base,
                max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seq_len=self.seq_len,
            )  # fmt: skip
        student.train(was_training)
        bits = f"W{hp.w_bits}A{hp.a_bits}KV{hp.kv_bits}"
        self.results = {"bits": bits, "loss": hp.loss, "lambda_push": hp.lambda_push, "models": results}
        self.path = log_dir / "results.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.results, indent=2))
        print(format_table(self.results))
        print(f"results: {self.path}")


def format_table(results: dict) -> str:
    """A short fixed-width table of the three models."""
    lines = [f"{'model':<12}" + "".join(f"{c:>22}" for c in COLUMNS)]
    for name, row in results["models"].items():
        cells = []
        for c in COLUMNS:
            v = row.get(c)
            cells.append(f"{v:>22.4f}" if isinstance(v, (int, float)) else f"{'-':>22}")
        lines.append(f"{name:<12}" + "".join(cells))
    return "\n".join(lines)
