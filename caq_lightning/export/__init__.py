"""Export formats of a folded CAQ student, and the loader that runs the int4 one again.

:mod:`~caq_lightning.export.formats` is the registry (:class:`ExportFormat`, :func:`register_format`,
:func:`get_format`) with what every format shares (target check, atomic directory, manifest). One module per
format, each imported below so that it registers: :mod:`~caq_lightning.export.writer` (``caq-int4``) and
:mod:`~caq_lightning.export.compressed_tensors` (``compressed-tensors-w4a16``), :mod:`~caq_lightning.export.serving`
(``compressed-tensors-w4a4`` / ``-w4a8``, the serving profile's checkpoints for vLLM). Then
:mod:`~caq_lightning.export.runtime` (loader) and :mod:`~caq_lightning.export.cli`; the nibbles and
:class:`Int4Linear` are :mod:`caq_lightning.runtime.packing`'s.

    python -m caq_lightning.export --ckpt CKPT --out DIR [--format NAME] [--overwrite] [--rounding gptq|rtn] [--trust-remote-code]
    [--w4a16-out DIR2]
Each format's ``check`` says what it can hold, called in ``setup`` before calibration.

A caq-int4 export directory holds:

- ``model.safetensors``: embeddings, norms, lm_head and biases in the model dtype, and for each decoder Linear
  ``<name>.qweight`` uint8 (out, in/2) with two 4-bit codes per byte (low nibble = even input column; symmetric
  codes are stored as code + 8), ``<name>.scales`` fp32 (out, G) and, when asymmetric, ``<name>.zeros`` uint8 (out, G).
- ``config.json``: the transformers config with a ``quantization_config`` (bits, groups and symmetry of weights,
  activations and KV cache; the online Hadamards R3/R4; the packing).
- the tokenizer files, and ``manifest.json`` with the sha256 of every other file. ``manifest.json`` and the
  ``quantization_config`` carry ``format_version`` (:data:`FORMAT_VERSION`); the loader refuses any other.

:func:`load_quantized` rebuilds the model with :class:`Int4Linear` modules and by default runs it on integer
matmuls and an integer KV cache (:mod:`caq_lightning.runtime`); ``runtime="dequant"`` instead dequantizes per
forward under the same online runtime as :func:`caq_lightning.runtime.attach_runtime`.

For symmetric weights the ``qweight`` bytes are exactly compressed-tensors' ``pack-quantized`` ``weight_packed``
(eight nibbles per little-endian int32, code + 8, when in_features is a multiple of 8);
:func:`write_compressed_tensors` writes that W4A16 view.
"""

from caq_lightning.export.cli import export_checkpoint, main
from caq_lightning.export.compressed_tensors import write_compressed_tensors  # the compressed-tensors-w4a16 format
from caq_lightning.export.formats import (
    FORMATS, MANIFEST, ExportFormat, atomic_dir, check_target, get_format, register_format, sha256, write_manifest,
)  # fmt: skip
from caq_lightning.export.runtime import load_quantized, verify_manifest
from caq_lightning.export.serving import SERVING_FORMATS  # compressed-tensors-w4a4 / -w4a8 (docs/serve.md)
from caq_lightning.export.writer import (  # the caq-int4 format
    FORMAT, FORMAT_VERSION, PACKED_SUFFIXES, WEIGHTS, export_state_dict, quantization_config, write_export,
)  # fmt: skip
from caq_lightning.runtime.packing import SYMMETRIC_OFFSET, Int4Linear, pack_int4, unpack_int4

__all__ = [
    "FORMAT", "FORMATS", "FORMAT_VERSION", "MANIFEST", "PACKED_SUFFIXES", "SERVING_FORMATS", "SYMMETRIC_OFFSET",
    "WEIGHTS", "ExportFormat", "Int4Linear", "atomic_dir", "check_target", "export_checkpoint", "export_state_dict",
    "get_format", "load_quantized", "main", "pack_int4", "quantization_config", "register_format", "sha256",
    "unpack_int4", "verify_manifest", "write_compressed_tensors", "write_export", "write_manifest",
]  # fmt: skip
