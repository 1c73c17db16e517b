"""Calibrate a model with CAQ. ``python train.py --config configs/tiny.yaml`` (see README)."""

from caq_lightning.cli import main

if __name__ == "__main__":
    main()
