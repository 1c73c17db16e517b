"""caq-lightning: Contrastive Alignment Quantization (safety-preserving W4A4 PTQ) as a Lightning module."""

__version__ = "0.1.0"
