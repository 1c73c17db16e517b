"""Load a compressed-tensors checkpoint the standard way (transformers + compressed-tensors, never caq_lightning) and
write its logits: the reference side of tests/test_serving.py and bench/serve_match.py.

    python bench/ct_reference.py EXPORT_DIR INPUTS.pt LOGITS.pt [--threads N]

INPUTS.pt holds ``input_ids`` and ``attention_mask`` (B, T). transformers' compressed-tensors integration quantizes
each Linear's input on the fly (the checkpoint's ``input_activations``: dynamic per token) and decompresses the
packed weights, but (transformers 5.25) does not apply the checkpoint's ``transform_config``: this script applies
it with compressed-tensors' own ``apply_transform_config`` and loads the transform weights the checkpoint stores.
It prints one JSON line describing what ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM


def load(folder: Path, dtype: torch.dtype = torch.float32):
    """The checkpoint as transformers loads it, plus its online transforms; and a description of what applies."""
    from compressed_tensors.transform import TransformBase, TransformConfig, apply_transform_config

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    transform = qcfg.get("transform_config") or None
    if transform and not any(isinstance(m, TransformBase) for m in model.modules()):  # transformers did not
        apply_transform_config(model, TransformConfig.model_validate(transform))
        names = {n for n, m in model.named_modules() if isinstance(m, TransformBase)}
        stored = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                stored |= {k: f.get_tensor(k) for k in f.keys() if k.rpartition(".")[0] in names}
        missing, unexpected = model.load_state_dict(stored, strict=False)
        if unexpected:
            raise SystemExit(f"transform weights without a module: {unexpected[:3]}")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in linears if getattr(m, "quantization_scheme", None) is not None]
    acts = {json.dumps(m.quantization_scheme.input_activations.model_dump(mode="json"), sort_keys=True)
            for m in quantized if m.quantization_scheme.input_activations is not None}  # fmt: skip
    info = {
        "linears": len(linears),
        "quantized": len(quantized),
        "input_activations": [json.loads(a) for a in sorted(acts)],
        "transforms": sum(isinstance(m, TransformBase) for m in model.modules()),
    }
    return model, info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("inputs", type=Path)
    p.add_argument("logits", type=Path)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = load(args.export)
    inputs = torch.load(args.inputs, weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.save(logits, args.logits)
    info["caq_lightning_imported"] = any(m == "caq_lightning" or m.startswith("caq_lightning.") for m in sys.modules)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
