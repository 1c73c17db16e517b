"""Tiny real models for tests: a byte-level tokenizer and aligned/base pairs of each supported family."""

from pathlib import Path

import lightning as L
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config,
)  # fmt: skip

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
TEXT = (
    "The river runs past the old mill and the bridge. Farmers bring grain to the market every week. "
    "I'm sorry, but I cannot help with that. Sure, here is a recipe for bread with flour and water. "
) * 40


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return fast


def tiny_config(family: str, vocab_size: int, **overrides):
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=0.08,  # peaky logits, so quantization error shows up in the KL
        tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return FAMILIES[family](**kwargs)


def save_tiny_pair(root: Path, family: str, seed: int = 0, **overrides) -> tuple[Path, Path]:
    """A random 'base' and an 'aligned' model fine-tuned from it (base + a small random delta), on disk."""
    tok = build_tokenizer()
    paths = root / family / "aligned", root / family / "base"
    # An embedding row for every id the family's tokenizer class can produce (Qwen2's adds <|endoftext|>).
    tok.save_pretrained(paths[0])
    tiny_config(family, len(tok)).save_pretrained(paths[0])
    vocab = len(AutoTokenizer.from_pretrained(paths[0]))
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(family, vocab, **overrides))
    with torch.no_grad():  # non-trivial norms, so fusing them into the Linears is exercised
        for name, p in base.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.2)
    aligned = AutoModelForCausalLM.from_config(base.config)
    aligned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    for model, path in zip((aligned, base), paths):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def perturbed_student(path, seed: int = 1, **quant_config):
    """A CAQStudent on the model at ``path`` with calibrated-looking (non-identity) transforms.

    It trains and folds with RTN weights unless told otherwise, so its fold reproduces its fake-quant logits exactly.
    """
    from caq_lightning.student import CAQStudent, QuantConfig

    quant_config = {"w_train": "rtn", "w_rounding": "rtn", **quant_config}
    student = CAQStudent(AutoModelForCausalLM.from_pretrained(path).eval(), QuantConfig(**quant_config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return student


def padded_batch(vocab: int, batch: int = 2, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, T) and a mask whose second row is left-padded."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask



class TruncateOnTrainEnd(L.Callback):
    """Empties ``path`` when training ends: held-out text removed mid-run (a scratch clean-up), the kind of failure
    no setup check can foresee. A class path CLI tests can name (``tiny.TruncateOnTrainEnd``)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text("")



def grouped(**settings) -> dict:
    """CAQModule keyword arguments from settings by their own names (see caq_lightning.config.group_settings)."""
    from caq_lightning.config import group_settings

    return group_settings(**settings)

def model_flags(settings: dict) -> list[str]:
    """``--model.<group>.<name>=value`` command-line flags for the same settings as :func:`grouped`."""
    from caq_lightning.config import new_key

    return [f"--model.{new_key(key) or key}={value}" for key, value in settings.items()]


def cli_error_line(argv: list[str], capsys, entry=None) -> str:
    """Run a CLI in-process (default: train.py's); return its single error line after checking exit code 2 and no
    traceback."""
    import pytest

    if entry is None:
        from caq_lightning.cli import main as entry
    with pytest.raises(SystemExit) as exit:
        code = entry(argv)
        raise SystemExit(code)  # evaluate.main returns its exit code instead of exiting
    err = capsys.readouterr().err
    assert exit.value.code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def one_step_run(pair: tuple[Path, Path], text_file: Path, root: Path) -> Path:
    """``root`` laid out as a CLI run after 1 real calibration step: root/checkpoints/last.ckpt."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from caq_lightning.data import CalibrationData
    from caq_lightning.module import CAQModule

    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0)
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=32, batch_size=2)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=1)
    L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoints],
    ).fit(module, data)  # fmt: skip
    return root
