"""caq-lightning: Contrastive Alignment Quantization (safety-preserving W4A4 PTQ) as a Lightning module."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import caq_lightning` stays light: load_quantized pulls in transformers and safetensors.
    if name == "load_quantized":
        from caq_lightning.export import load_quantized

        return load_quantized
    raise AttributeError(f"module 'caq_lightning' has no attribute {name!r}")
