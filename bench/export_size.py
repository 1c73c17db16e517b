"""Bytes of an int4 export against fp16: the packed decoder Linears (codes + scales + zeros) and the whole file.

    python bench/export_size.py                        # Llama-ish shapes: hidden 512, 2 layers, intermediate 1376
    python bench/export_size.py --group-size 128 --intermediate 1408 --asymmetric   # groups must divide 1376

Builds a random Llama of the given shape (sizes are all that matter here), wraps it in the CAQ student, folds it,
writes the export and reads the tensor sizes back from model.safetensors. fp16 bytes = 2 per weight. The last lines
are ``int4_bytes_over_fp16=<ratio>`` (quantized Linears) and ``file_bytes_over_fp16=<ratio>`` (whole safetensors
file, embeddings and lm_head included, against the same model saved in fp16).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caq_lightning.export import PACKED_SUFFIXES, write_export  # noqa: E402
from caq_lightning.fold import fold  # noqa: E402
from caq_lightning.student import CAQStudent, QuantConfig  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--group-size", type=int, default=0, help="weight group size (0 = per output channel)")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric weights (stores uint8 zeros)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()  # 2-byte non-quantized tensors
    quant = QuantConfig(w_group_size=args.group_size, w_symmetric=not args.asymmetric)
    folded, recipe = fold(CAQStudent(model, quant))
    with tempfile.TemporaryDirectory() as tmp:
        out = write_export(folded, recipe, None, Path(tmp) / "int4")
        packed = weights = plain = 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                numel = torch.Size(t.get_shape()).numel()
                nbytes = numel * {"U8": 1, "F32": 4, "F16": 2, "BF16": 2}[t.get_dtype()]
                if key.endswith(PACKED_SUFFIXES):
                    packed += nbytes
                    weights += 2 * numel if key.endswith(".qweight") else 0  # two 4-bit weights per byte
                else:
                    plain += numel  # stays in the model dtype (bf16 here, as large as fp16)
        file_bytes = os.path.getsize(out / "model.safetensors")
    linear_fp16 = 2 * weights
    model_fp16 = linear_fp16 + 2 * plain
    print(f"shape: hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} vocab={args.vocab}")
    kind = "asymmetric" if args.asymmetric else "symmetric"
    print(f"weights: 4-bit {kind}, group_size={args.group_size}, fp32 scales")
    print(f"quantized linears: {weights} weights, {packed} bytes packed vs {linear_fp16} bytes fp16")
    print(f"whole file: {file_bytes} bytes (embeddings, norms, lm_head in bf16) vs {model_fp16} bytes fp16")
    print(f"int4_bytes_over_fp16={packed / linear_fp16:.4f}")
    print(f"file_bytes_over_fp16={file_bytes / model_fp16:.4f}")


if __name__ == "__main__":
    main()
