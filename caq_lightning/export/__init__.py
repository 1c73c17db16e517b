"""Int4 export of a folded CAQ student, and the runtime that reproduces the student from the packed bytes.

One concern per module: :mod:`~caq_lightning.export.packing` (nibbles, :class:`Int4Linear`),
:mod:`~caq_lightning.export.writer` (atomic directory, manifest), :mod:`~caq_lightning.export.runtime` (loader),
:mod:`~caq_lightning.export.compressed_tensors` (W4A16 view), :mod:`~caq_lightning.export.checks` (what an export
can hold, checked before calibration) and :mod:`~caq_lightning.export.cli`.

    python -m caq_lightning.export --ckpt CKPT --out DIR [--overwrite] [--gptq] [--trust-remote-code] [--w4a16-out DIR2]

An export directory holds:

- ``model.safetensors``: embeddings, norms, lm_head and biases in the model dtype, and for each decoder Linear
  ``<name>.qweight`` uint8 (out, in/2) with two 4-bit codes per byte (low nibble = even input column; symmetric
  codes are stored as code + 8), ``<name>.scales`` fp32 (out, G) and, when asymmetric, ``<name>.zeros`` uint8 (out, G).
- ``config.json``: the transformers config with a ``quantization_config`` (bits, groups and symmetry of weights,
  activations and KV cache; the online Hadamards R3/R4; the packing).
- the tokenizer files, and ``manifest.json`` with the sha256 of every other file. ``manifest.json`` and the
  ``quantization_config`` carry ``format_version`` (:data:`FORMAT_VERSION`); the loader refuses any other.

:func:`load_quantized` rebuilds the model with :class:`Int4Linear` modules and by default runs it on integer
matmuls and an integer KV cache (:mod:`caq_lightning.int_runtime`); ``runtime="dequant"`` instead dequantizes per
forward under the same online runtime as :func:`caq_lightning.fold.attach_runtime`.

For symmetric weights the ``qweight`` bytes are exactly compressed-tensors' ``pack-quantized`` ``weight_packed``
(eight nibbles per little-endian int32, code + 8, when in_features is a multiple of 8);
:func:`write_compressed_tensors` writes that W4A16 view.
"""

from caq_lightning.export.cli import export_checkpoint, main
from caq_lightning.export.compressed_tensors import write_compressed_tensors
from caq_lightning.export.packing import SYMMETRIC_OFFSET, Int4Linear, pack_int4, unpack_int4
from caq_lightning.export.runtime import load_quantized, verify_manifest
from caq_lightning.export.writer import (
    FORMAT, FORMAT_VERSION, MANIFEST, PACKED_SUFFIXES, WEIGHTS, export_state_dict, quantization_config, sha256,
    write_export, write_manifest,
)  # fmt: skip

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "PACKED_SUFFIXES", "SYMMETRIC_OFFSET", "WEIGHTS", "Int4Linear",
    "export_checkpoint", "export_state_dict", "load_quantized", "main", "pack_int4", "quantization_config", "sha256", "unpack_int4",
    "verify_manifest", "write_compressed_tensors", "write_export", "write_manifest",
]  # fmt: skip
