"""Load teacher/base models and tokenizers from a local path, a hub id, or a ``builtin:`` name, with clear errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from caq_lightning.env import is_offline
from caq_lightning.errors import CAQError
from caq_lightning.gguf import gguf_info, gguf_source, is_gguf, load_gguf, load_gguf_tokenizer
from caq_lightning.models import check_architecture

BUILTIN_PREFIX = "builtin:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
EXPORT_FORMAT_PREFIX = "caq-"  # quantization_config["format"] of this project's exports (caq-int4, ...)


def resolve_model_path(name: str, role: str = "teacher") -> str:
    """Turn ``builtin:<pair>`` into a local directory (building the pair on first use); leave paths and hub ids alone.

    ``role`` is ``teacher`` (the aligned model) or ``base`` (the pre-trained model) for a builtin pair.
    """
    if name.startswith(BUILTIN_PREFIX):
        from caq_lightning import zoo

        return str(zoo.resolve_builtin(name[len(BUILTIN_PREFIX) :], role=role))
    # from_pretrained does not expand "~", so do it here for anything that exists locally.
    expanded = os.path.expanduser(name)
    return expanded if expanded != name and Path(expanded).exists() else name


def _is_hub_id(name: str) -> bool:
    # A hub id is "org/name" with exactly one slash and no local directory of that name.
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def _in_hub_cache(name: str, filenames: tuple[str, ...]) -> bool:
    # Offline runs may still use a hub id that an earlier online run downloaded into the HF cache.
    return any(isinstance(try_to_load_from_cache(name, f), str) for f in filenames)


def _check_source(name: str, what: str) -> None:
    path = Path(name).expanduser()
    if path.exists():
        if what == "model" and path.is_file() and path.suffix == ".safetensors":
            raise CAQError(
                f"model path '{name}' is a single .safetensors file: pass the directory that holds it together "
                "with its config.json (model.save_pretrained(dir) writes both)"
            )
        if not (path / "config.json").exists() and what == "model":
            raise CAQError(f"{what} path '{name}' has no config.json: point it at a transformers model directory")
        if what == "tokenizer" and path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
            raise CAQError(
                f"tokenizer path '{name}' has none of {', '.join(TOKENIZER_FILES)}: "
                "save the tokenizer next to the model (tokenizer.save_pretrained) or pass --data.tokenizer"
            )
        return
    if _is_hub_id(name):
        if is_offline() and not _in_hub_cache(name, ("config.json",) + TOKENIZER_FILES):
            raise CAQError(
                f"{what} '{name}' is a hub id but HF_HUB_OFFLINE is set and it is not in the HF cache: "
                "download it first or pass a local directory"
            )
        return
    raise CAQError(f"{what} path '{name}' does not exist: pass an existing directory, a hub id, or builtin:tiny")


# ----------------------------------------------------------------------------------------------- load/check


def load_config(name: str, trust_remote_code: bool = False, role: str = "teacher"):
    """Load and validate a model config; the architecture must be one CAQ has an adapter for."""
    name = resolve_model_path(name, role)
    if is_gguf(name):
        gguf_info(name)
        folder, file = gguf_source(name)
        return AutoConfig.from_pretrained(folder, gguf_file=file)
    _check_source(name, "model")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise CAQError(
                f"model '{name}' needs custom code: review it, then pass --model.trust_remote_code=true "
                "(--trust-remote-code for python -m caq_lightning.export)"
            ) from None
        raise CAQError(f"cannot read the config of '{name}': {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise CAQError(f"cannot load model '{name}': {str(err).splitlines()[0]}") from None
    check_architecture(config.model_type, f"'{name}'")
    check_not_export(config, name, role)
    return config


def check_not_export(config, name: str, role: str) -> None:
    """Raise if ``config`` is a caq export's: its packed weights would not load into the plain architecture, and
    every Linear would silently stay at its random initialisation."""
    qcfg = getattr(config, "quantization_config", None)
    fmt = qcfg.get("format") if isinstance(qcfg, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith(EXPORT_FORMAT_PREFIX)):
        return
    if not (Path(name) / "manifest.json").is_file():
        raise CAQError(
            f"'{name}' is a {fmt} export without its manifest.json: it loads only through load_quantized with its "
            "manifest; re-export it with python -m caq_lightning.export"
        )
    raise CAQError(
        f"'{name}' is a {fmt} export, not a full-precision model: pass the FP model as the {role} "
        "(evaluate the export with python -m caq_lightning.evaluate --model DIR, or load it with load_quantized)"
    )


def load_model(
    name: str, role: str = "teacher", dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load a causal LM (safetensors only, never pickle) for the given role, frozen and in eval mode."""
    path = resolve_model_path(name, role)
    if is_gguf(path):
        return load_gguf(path, dtype, role)
    config = load_config(name, trust_remote_code, role)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
            output_loading_info=True,
        )  # fmt: skip
    except OSError as err:
        raise CAQError(
            f"cannot load weights of '{path}': {str(err).splitlines()[0]} "
            "(weights load only from safetensors, never pickle: re-save with model.save_pretrained(dir))"
        ) from None
    check_loading_info(info, path)
    model.eval().requires_grad_(False)
    return model


def check_loading_info(info: dict, path: str) -> None:
    """Raise if transformers reported weights the files lack (it would initialise them at random) or hold extra."""
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()]
    problems = [
        f"{label} {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
        for label, keys in (
            ("missing", sorted(info.get("missing_keys") or ())),
            ("unexpected", sorted(info.get("unexpected_keys") or ())),
            ("other shape", sorted(map(str, mismatched))),
        )
        if keys
    ]
    if problems:
        raise CAQError(
            f"the weights of '{path}' do not match its config.json ({'; '.join(problems)}): they would load as random "
            "values; re-save the model with model.save_pretrained(dir)"
        )


def check_tokenizer_fits(
    tokenizer: PreTrainedTokenizerBase, vocab_rows: int, what: str, fix: str = "use the tokenizer saved with the model"
) -> None:
    """Raise if ``tokenizer`` can produce ids the model has no embedding row for."""
    if len(tokenizer) > vocab_rows:
        raise CAQError(
            f"{what} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_rows} "
            f"(ids past {vocab_rows - 1} have no embedding): {fix}"
        )


def load_tokenizer(name: str, role: str = "teacher", trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to a model path, hub id or builtin name."""
    path = resolve_model_path(name, role)
    if is_gguf(path):
        return load_gguf_tokenizer(path)
    _check_source(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise CAQError(f"cannot load the tokenizer of '{path}': {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_pair(teacher_config, base_config, teacher_tok=None, base_tok=None) -> None:
    """Raise if the base model cannot be contrasted with the teacher token by token."""
    if teacher_config.model_type != base_config.model_type:
        raise CAQError(
            f"teacher is '{teacher_config.model_type}' but base is '{base_config.model_type}': "
            "the base must be the pre-trained model the teacher was fine-tuned from"
        )
    if teacher_config.vocab_size != base_config.vocab_size:
        raise CAQError(
            f"teacher vocab_size {teacher_config.vocab_size} != base vocab_size {base_config.vocab_size}: "
            "the push term compares distributions token by token, so both must share a tokenizer"
        )
    if teacher_tok is not None and base_tok is not None and teacher_tok.get_vocab() != base_tok.get_vocab():
        raise CAQError("teacher and base tokenizers map tokens to different ids: use the base the teacher came from")
    teacher_template = getattr(teacher_tok, "chat_template", None)
    base_template = getattr(base_tok, "chat_template", None)
    # A pre-trained base without a template is the normal case; two different templates suggest a mismatched pair.
    if teacher_template and base_template and teacher_template != base_template:
        warnings.warn(
            "teacher and base tokenizers have different chat templates: chat calibration data is rendered with the "
            "teacher's, so check that the base is the model the teacher was fine-tuned from",
            stacklevel=2,
        )
