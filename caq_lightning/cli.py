"""Command line: ``python train.py --config configs/tiny.yaml`` (bare) or ``python train.py fit --config ...``."""

from __future__ import annotations

import logging
import os
import sys

import warnings

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError
from caq_lightning.module import CAQModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class CAQCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):  # metrics.csv under default_root_dir, no TensorBoard needed
            root = config.trainer.default_root_dir or "runs"
            config.trainer.default_root_dir = root
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=root, name="caq")
            )
        if config.data.tokenizer is None:  # calibration text is tokenized with the teacher's tokenizer
            config.data.tokenizer = config.model.teacher
        if config.data.trust_remote_code is False and config.model.trust_remote_code:
            config.data.trust_remote_code = True


def with_subcommand(argv: list[str]) -> list[str]:
    """Insert ``fit`` when no subcommand is given, so the bare ``--config`` form works."""
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help")):
        return argv
    return ["fit", *argv]


def main(argv: list[str] | None = None) -> None:
    argv = with_subcommand(list(sys.argv[1:] if argv is None else argv))
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen teacher/base stay in eval mode on purpose; Lightning warns about it on every fit.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    try:
        CAQCLI(
            CAQModule,
            CalibrationData,
            args=argv,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
        )
    except CAQError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
