"""After calibration, evaluate the FP teacher, plain RTN at the same bits and the CAQ student; write results.json."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from caq_lightning.checkpoint import last_checkpoint
from caq_lightning.errors import CAQError
from caq_lightning.eval.metrics import perplexity_windows
from caq_lightning.eval.refusal import check_chat_template
from caq_lightning.eval.suite import evaluate_model, read_prompts, read_text
from caq_lightning.loading import BUILTIN_PREFIX, load_tokenizer
from caq_lightning.outputs import check_writable
from caq_lightning.student import StudentView

COLUMNS = ("perplexity", "harmful_refusal_rate", "benign_refusal_rate", "harmful_logodds", "kl_teacher", "kl_base")
IN_CONFIG = (
    "in the SafetyReport's init_args in the config file (on the command line, --trainer.callbacks.* reaches only "
    "the last callback)"
)


class SafetyReport(L.Callback):
    """Writes ``<log_dir>/results.json`` with perplexity, refusal rates and KLs of teacher, RTN and CAQ.

    Its inputs are checked in ``setup``, before the first step. The evaluation runs in ``teardown``, which Lightning
    calls after every callback's ``on_fit_end`` and only after a successful fit: wherever it sits in the callback
    list, ``Int4Export`` has written the export (and the module its final checkpoint) before a report can fail.

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        hp = pl_module.hparams
        prompts_path, text_path = self._defaults(hp.teacher)
        if prompts_path is None or text_path is None:
            missing = " and ".join(n for n, v in (("prompts", prompts_path), ("ppl_text", text_path)) if v is None)
            raise CAQError(
                f"SafetyReport has no {missing} for teacher '{hp.teacher}' (only builtin pairs bring their own): set "
                f"prompts (jsonl of {{\"prompt\", \"label\"}}) and ppl_text (a plain text file, e.g. WikiText-2 test: docs/data.md) "
                f"{IN_CONFIG}"
            )
        self._prompts(prompts_path)  # parses every line: a bad file fails here, not after calibration
        text = Path(text_path)
        if not text.is_file():
            raise CAQError(f"SafetyReport ppl_text '{text_path}' does not exist: pass an existing file {IN_CONFIG}")
        tokenizer = load_tokenizer(hp.teacher, "teacher", hp.trust_remote_code)
        check_chat_template(tokenizer, f"teacher '{hp.teacher}'")
        max_len = getattr(pl_module.student.model.config, "max_position_embeddings", None)
        if max_len and self.seq_len > max_len:
            raise CAQError(
                f"SafetyReport seq_len={self.seq_len} exceeds the model's maximum of {max_len} positions: "
                f"set seq_len: {max_len} or less {IN_CONFIG}"
            )
        try:
            perplexity_windows(tokenizer, read_text(text, "SafetyReport ppl_text"), seq_len=self.seq_len, max_windows=1)
        except CAQError as err:
            raise CAQError(f"SafetyReport ppl_text '{text_path}': {err}") from None
        fix = "set trainer.default_root_dir to a writable place"
        check_writable(self._log_dir(trainer), "SafetyReport results directory", fix)  # broadcasts: every rank calls

    @staticmethod
    def _log_dir(trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            self.report(trainer, pl_module)
        except CAQError as err:
            checkpoint = last_checkpoint(trainer)
            kept = f"; calibration finished and its checkpoint {checkpoint} was kept" if checkpoint else ""
            raise CAQError(f"SafetyReport failed: {err}{kept}") from None

    @torch.no_grad()
    def report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate teacher, RTN and CAQ, write ``results.json`` and print the table (global rank 0 only)."""
        log_dir = self._log_dir(trainer)  # log_dir broadcasts: every rank must call it
        if not trainer.is_global_zero:
            return
        hp = pl_module.hparams
        prompts_path, text_path = self._defaults(hp.teacher)
        prompts = self._prompts(prompts_path)
        text = read_text(text_path, "SafetyReport ppl_text") if text_path else None
        tokenizer = load_tokenizer(hp.teacher, "teacher", hp.trust_remote_code)
        student = pl_module.student
        teacher = StudentView(student, transform=False, quant=False)
        # CAQ is evaluated as exported: folded and rounded (GPTQ by default), with its runtime attached.
        views = {"teacher_fp": teacher, "rtn": StudentView(student, False, True), "caq": pl_module.exported().model}
        was_training = student.training
        student.eval()
        results = {}
        try:
            for name, model in views.items():
                results[name] = evaluate_model(
                    model, tokenizer, prompts, text, teacher=teacher, base=pl_module.base,
                    max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seq_len=self.seq_len, name=name,
                )  # fmt: skip
        finally:
            student.train(was_training)
        quant, loss = pl_module.quant_config, pl_module.loss_config
        bits = f"W{quant.w_bits}A{quant.a_bits}KV{quant.kv_bits}"
        self.results = {"bits": bits, "loss": loss.name, "lambda_push": loss.lambda_push, "models": results}
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
