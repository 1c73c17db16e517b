"""llama.cpp GGUF checkpoints as plain transformers models (dequantized) and their tokenizers.

A source of its own, below :mod:`caq_lightning.loading`, so the zoo can load a GGUF without importing loading."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from caq_lightning.errors import CAQError
from caq_lightning.models import check_architecture

GGUF_FP_TYPES = ("F32", "F16", "BF16")  # tensor types a GGUF holds unquantized
log = logging.getLogger(__name__)


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def gguf_info(path: str | Path) -> tuple[str, list[str]]:
    """(architecture, sorted quantized tensor type names) from a GGUF file's header; no tensor data is read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CAQError(f"GGUF file '{path}' does not exist: pass the path of a llama.cpp .gguf checkpoint")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CAQError("loading a .gguf checkpoint needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError) as err:
        raise CAQError(f"'{path}' is not a readable GGUF file ({err}): pass a llama.cpp .gguf checkpoint") from None
    quantized = sorted({t.tensor_type.name for t in reader.tensors} - set(GGUF_FP_TYPES))
    check_architecture(arch, f"'{path}'", kind="GGUF architecture")
    return arch, quantized


def gguf_source(path: str) -> tuple[str, str]:
    p = Path(path).expanduser().resolve()
    return str(p.parent), p.name


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, role: str = "teacher") -> PreTrainedModel:
    """A GGUF checkpoint as a plain transformers model (dequantized to ``dtype``), frozen and in eval mode.

    The result saves with ``save_pretrained`` like any transformers model (the GGUF quantization config is dropped:
    the weights are already dequantized)."""
    _, quantized = gguf_info(path)
    if quantized:
        log.warning(
            "%s '%s' is a quantized GGUF (%s): it loads dequantized, so it is not the original FP model",
            role, path, ", ".join(quantized),
        )  # fmt: skip
    folder, name = gguf_source(str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise CAQError(f"cannot load GGUF '{path}': {str(err).splitlines()[0]}") from None
    model.hf_quantizer = None  # dequantized already; without this save_pretrained refuses the model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval().requires_grad_(False)
    return model


def load_gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file embeds (padding with its end-of-sequence token when it has no pad token)."""
    gguf_info(path)
    folder, file = gguf_source(str(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
