"""Command line: ``python train.py --config configs/tiny.yaml`` (bare) or ``python train.py fit --config ...``.

What a fit does from the first step to results.json is listed in :mod:`caq_lightning.module`'s docstring.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from caq_lightning.checkpoint import check_model_names, check_readable
from caq_lightning.config import GROUPS, new_key
from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError, fail
from caq_lightning.module import CAQModule
from caq_lightning.outputs import check_writable
from caq_lightning.fit_progress import CompactModelSummary, FitSummary, StepProgressBar
from caq_lightning.progress import set_quiet

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class CAQCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Lightning reads the checkpoint right after parsing; a missing or truncated one must not be a traceback.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":  # the newest last*.ckpt is what Lightning will pick; the model comes from the config
            found = _checkpoint_dir(config).glob("last*.ckpt")
            if (newest := max(found, key=lambda p: p.stat().st_mtime, default=None)) is not None:
                check_readable(str(newest))
        elif ckpt_path is not None and ckpt_path not in ("best", "hpc"):
            # An explicit path: Lightning rebuilds the model from the checkpoint's settings, whatever the config says.
            check_model_names(check_readable(ckpt_path), config.model.teacher, config.model.base, f"'{ckpt_path}'")

    def _parse_ckpt_path(self) -> None:
        # Lightning copies the checkpoint's model settings into the config; a checkpoint is data, so custom code from
        # a model repository runs only when this command line turns trust_remote_code on, whatever the file holds.
        given = self._model_config().trust_remote_code
        super()._parse_ckpt_path()
        self._model_config().trust_remote_code = given

    def _model_config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return (self.config[subcommand] if subcommand else self.config).model

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir = config.trainer.default_root_dir or "runs"
        if config.trainer.logger in (None, True):  # metrics.csv under default_root_dir, no TensorBoard needed
            config.trainer.logger = Namespace(  # flushed every step, so a crash keeps the metrics written so far
                class_path="caq_lightning.outputs.ExclusiveCSVLogger",  # version_N claimed atomically
                init_args=Namespace(save_dir=root, name="caq", flush_logs_every_n_steps=1),
            )
        check_writable(root, "trainer.default_root_dir", "pass --trainer.default_root_dir=<a writable directory>")
        check_trainer(config.trainer)
        config.trainer.callbacks = list(config.trainer.callbacks or []) + default_callbacks(config.trainer)
        config.trainer.plugins = with_atomic_checkpoints(config.trainer.plugins)
        summaries = [k for c in config.trainer.callbacks if isinstance(k := _import(c.class_path), type)]
        if any(issubclass(k, ModelSummary) for k in summaries):
            config.trainer.enable_model_summary = False  # the callback summarizes; Lightning would only say so
        for callback in config.trainer.callbacks:
            # A fixed directory, so `--ckpt_path last` finds the previous run's last.ckpt; Lightning's default,
            # <log dir>/version_N/checkpoints, is new for every run and a resume would silently start from scratch.
            if callback.class_path.endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(_checkpoint_dir(config))
        if config.data.tokenizer is None:  # calibration text is tokenized with the teacher's tokenizer
            config.data.tokenizer = config.model.teacher
        if config.data.trust_remote_code is False and config.model.trust_remote_code:
            config.data.trust_remote_code = True

    def instantiate_trainer(self, **kwargs: Any):
        # The Trainer's constructor only validates its settings (devices, accelerator, strategy): what it raises is
        # a bad setting, which deserves one line rather than a traceback.
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, TypeError, ValueError, ImportError) as err:
            raise CAQError(
                f"invalid trainer settings: {str(err).splitlines()[0]} (fix --trainer.accelerator, --trainer.devices "
                "or --trainer.strategy)"
            ) from None


def check_trainer(trainer: Namespace) -> None:
    """Raise for trainer settings that Lightning would accept into a traceback (or into a strategy the module does
    not implement), before any model loads."""
    strategy = trainer.strategy
    name = strategy.class_path if isinstance(strategy, Namespace) else str(strategy)
    if name in ("fsdp", "fsdp_cpu_offload") or name.endswith(".FSDPStrategy"):
        raise CAQError(
            f"--trainer.strategy={name} (FSDP1) is not supported: the module shards with FSDP2; use "
            "configs/llama_w4a4_fsdp2.yaml (ModelParallelStrategy) or --trainer.strategy=ddp"
        )
    devices = str(trainer.devices).strip()
    if devices == "[]" or (devices.lstrip("-").isdigit() and int(devices) != -1 and int(devices) < 1):
        raise CAQError(
            f"--trainer.devices={trainer.devices} selects no device: pass --trainer.devices=N with N >= 1, "
            "-1 for all, or auto"
        )
    accumulate = trainer.accumulate_grad_batches
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise CAQError(
            f"--trainer.accumulate_grad_batches={accumulate} must be an integer >= 1 (1 = one optimizer step per "
            "batch)"
        )


def check_config_files(argv: list[str]) -> None:
    """Raise for a --config file that is not UTF-8 text (jsonargparse would end in a UnicodeDecodeError traceback)."""
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                Path(path).read_bytes().decode("utf-8")
            except UnicodeDecodeError as err:
                raise CAQError(
                    f"config file '{path}' is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                    f"{err.start}): pass a YAML config file such as configs/tiny.yaml"
                ) from None
            except OSError:
                continue  # a missing file is jsonargparse's one-line error


def default_callbacks(trainer_config) -> list[Namespace]:
    """The progress bar (steps, tokens/s, ETA), the FLOPs-free model summary and the end-of-fit line, for every
    config: each one only where the config neither names one of its kind nor turns that display off."""
    given = [_import(c.class_path) for c in trainer_config.callbacks or []]

    def missing(kind: type) -> bool:
        return not any(isinstance(g, type) and issubclass(g, kind) for g in given)

    added = [FitSummary] if missing(FitSummary) else []
    if trainer_config.enable_progress_bar is not False and missing(ProgressBar):
        added.append(StepProgressBar)
    if trainer_config.enable_model_summary is not False and missing(ModelSummary):
        added.append(CompactModelSummary)
    return [Namespace(class_path=f"{c.__module__}.{c.__qualname__}", init_args=Namespace()) for c in added]


def with_atomic_checkpoints(plugins: Any) -> list:
    """The trainer's plugins plus :class:`AtomicCheckpointIO`, unless they already name a CheckpointIO."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    for plugin in plugins:
        kind = _import(plugin.class_path) if isinstance(plugin, Namespace) else type(plugin)
        if isinstance(kind, type) and issubclass(kind, CheckpointIO):
            return plugins
    return [*plugins, Namespace(class_path="caq_lightning.checkpoint.AtomicCheckpointIO", init_args=Namespace())]


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name, None) if module else None


def _checkpoint_dir(config) -> Path:
    return Path(config.trainer.default_root_dir or "runs") / "checkpoints"


def silence_library_notices() -> None:
    """Notices of Lightning, jsonargparse and torch that say nothing about this run; the project's own warnings and
    every other library warning stay."""
    # Lightning's CLI calls jsonargparse APIs that jsonargparse deprecates (skip_none, ...): not the user's to fix.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="lightning\\.pytorch\\.cli")
    # Lightning's pytree helper builds the LeafSpec that torch deprecates.
    leaf_spec = "`isinstance\\(treespec, LeafSpec\\)` is deprecated"
    warnings.filterwarnings("ignore", message=leaf_spec, category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_a_tip)  # the litlogger / litmodels advertisements


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def with_subcommand(argv: list[str]) -> list[str]:
    """Insert ``fit`` when no subcommand is given, so the bare ``--config`` form works."""
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help")):
        return argv
    return ["fit", *argv]


def main(argv: list[str] | None = None) -> None:
    argv = with_subcommand(list(sys.argv[1:] if argv is None else argv))
    if "--quiet" in argv:  # one line per phase (evaluation, cached targets) and no step bar
        set_quiet()
        argv = [a for a in argv if a != "--quiet"] + ["--trainer.enable_progress_bar=false"]
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen teacher/base stay in eval mode on purpose; Lightning warns about it on every fit.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    # main() hands LightningCLI the argv it was given (with `fit` inserted): that is intended, not a mistake.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    silence_library_notices()
    try:
        check_config_files(argv)
        CAQCLI(
            CAQModule,
            CalibrationData,
            args=argv,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            # Bad options raise instead of printing the whole usage, so they become one `error:` line below.
            parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in SUBCOMMANDS}},
        )
    except ArgumentError as err:
        message = literal_error(" ".join(str(err).split())) + flat_key_hint(argv)
        fail(f"{message} (list the options with: python train.py fit --help)")
    except Exception as err:
        # Lightning's teardown after a failed restore can raise its own error on top of ours: report ours.
        cause = caq_error_in(err)
        if cause is not None:
            fail(str(cause))
        if isinstance(err, MisconfigurationException):  # Lightning's own check of a setting: its message names it
            fail(f"{str(err).splitlines()[0]} (list the options with: python train.py fit --help)")
        raise


def literal_error(message: str) -> str:
    """jsonargparse's complaint about a value outside a Literal, in this project's words (unknown X: choose one of)."""
    literal = r'Parser key "(?P<key>[\w.]+)": Expected a typing\.Literal\[(?P<choices>.*?)\]\. Got value: (?P<value>.*)$'
    m = re.match(literal, message)
    if m is None:
        return message
    parts = m["key"].split(".")
    name = parts[-2] if parts[-1] in ("name", "kind") and len(parts) > 2 else parts[-1]  # loss.name -> loss
    choices = ", ".join(c.strip().strip("'\"") for c in m["choices"].split(","))
    return f"unknown {name} '{m['value']}': choose one of {choices} (--{m['key']})"


def flat_key_hint(argv: list[str]) -> str:
    """'; the model settings are grouped now: ...' naming the new key of each flat model setting that ``argv`` uses
    (--model.w_bits, or w_bits under model: in a --config file); '' if it uses none."""
    hints = []
    for i, arg in enumerate(argv):
        if arg.startswith("--model."):
            key, _, value = arg[len("--model.") :].partition("=")
            if (new := _new_key(key, value or (argv[i + 1] if i + 1 < len(argv) else ""))) is not None:
                hints.append(f"--model.{key} is --model.{new}")
        elif arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            found = [f"{key} is {new}" for key, value in _model_section(path).items() if (new := _new_key(key, value))]
            if found:
                hints.append(f"under model: in {path}, {', '.join(found)}")
    return f"; the model settings are grouped now: {'; '.join(hints)}" if hints else ""


def _new_key(key: str, value: Any) -> str | None:
    if key in GROUPS and (isinstance(value, dict) or str(value).lstrip().startswith("{")):
        return None  # a group given whole (YAML mapping or JSON)
    return new_key(key)


def _model_section(path: str) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    model = config.get("model") if isinstance(config, dict) else None
    return model if isinstance(model, dict) else {}


def caq_error_in(err: BaseException | None) -> CAQError | None:
    """The CAQError that ``err`` is, or that it was raised while handling (Lightning may mask it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, CAQError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None

