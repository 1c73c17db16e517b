"""Speed of the integer W4A4 runtime against FP fp32, FP bf16 and the dequant runtime, in one run, as ratios.

    python bench/runtime.py [--quick] [--device cpu|cuda] [--threads N] [--shapes llama3-8b smollm2-135m]

Shapes (random weights, built from a transformers config: no hub, no files):
- ``llama3-8b``: Llama-3-8B decoder layers (hidden 4096, intermediate 14336, 32 heads, 8 KV heads), ``--layers``
  of them (default 2), with a 1024-token vocabulary so that embeddings and lm_head stay negligible;
- ``smollm2-135m``: the whole SmolLM2-135M shape (30 layers, hidden 576, 9/3 heads, head_dim 64, intermediate
  1536, vocab 49152, tied embeddings).

Runtimes: ``fp32`` and ``bf16`` (plain transformers, SDPA); ``dequant`` (the int4 Linears dequantize to bf16 every
forward, activations and KV fake-quantized: the runtime before the integer path); ``int8`` and ``packed`` (the integer
runtime, weights resident as int8 codes or as the file's nibbles). The quantized runtimes are W4 per-channel
symmetric, A4 per-token asymmetric, KV4, online R3/R4, with bf16 for everything that stays in floating point; they
are built from RTN codes of the same random weights, as ``load_quantized`` builds them from an export.

Measured: prefill tokens/s (one forward over batch x prompt tokens, filling the cache), decode tokens/s (generate
with a 16-token prompt, batch 1 and 8, a fixed number of new tokens, prompt included in the time) and the bytes of
the decoder Linears resident in memory. The runtimes take turns within each repetition (order rotated) and the
median of the repetitions is reported, so ratios within one run are comparable on a loaded machine. The last line
is ``int_prefill_over_bf16=<r> int_decode_over_bf16=<r> weight_bytes_over_fp16=<r>`` on the 8B-shaped layers with
the default residency (decode at batch 1).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caq_lightning.export import Int4Linear  # noqa: E402
from caq_lightning.quant.hadamard import apply_hadamard  # noqa: E402
from caq_lightning.quant.quantizer import QuantSpec, quantize  # noqa: E402
from caq_lightning.runtime import IntLinear, QuantRecipe, attach_int_runtime, attach_runtime  # noqa: E402

SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=1024,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True,
    ),
    "test": dict(  # a few-second shape for the bench's own test
        hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=256,
    ),
}  # fmt: skip
RUNTIMES = ("fp32", "bf16", "dequant", "int8", "packed")
DEFAULT_RESIDENCY = "int8"  # load_quantized's default; see bench/README.md for the trade-off
RECIPE = QuantRecipe(QuantSpec(4, True, 0), QuantSpec(4, False, 0), QuantSpec(4, False, 0), online_hadamard=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and repetitions: <= 5 min on 2 CPU cores")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["llama3-8b", "smollm2-135m"])
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 8B shape")
    p.add_argument("--batch", type=int, default=None, help="prefill batch (default 4; 1 with --quick)")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens (default 128; 8 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 3; 2 with --quick)")
    p.add_argument("--profile", choices=RUNTIMES, help="instead of timing: torch.profiler's op shares of one prefill "
                   "of this runtime, on the first shape (pass --layers 1 for one 8B-shaped layer)")  # fmt: skip
    return p.parse_args(argv)


# ---- building the runtimes ------------------------------------------------------------------------------------------


def build_runtimes(shape: str, layers: int, device: str) -> dict[str, nn.Module]:
    kwargs = {"num_hidden_layers": layers, **SHAPES[shape]} if shape == "llama3-8b" else SHAPES[shape]
    config = LlamaConfig(**kwargs, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    fp32 = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    models = {"fp32": fp32, "bf16": bf16}
    packed = {}  # RTN codes of each decoder Linear, computed once for the three quantized runtimes
    for name, child in fp32.model.layers.named_modules():
        if isinstance(child, nn.Linear):
            codes, scale, zero = quantize(child.weight, RECIPE.w_spec)
            packed[name] = Int4Linear.from_codes(codes.to(torch.int8), scale, zero, None, RECIPE.w_spec.symmetric)
    for runtime in ("dequant", "int8", "packed"):
        model = copy.deepcopy(bf16)
        for name, layer in packed.items():
            owner, _, leaf = name.rpartition(".")
            setattr(model.model.layers.get_submodule(owner), leaf, copy.deepcopy(layer))
        if runtime == "dequant":
            attach_runtime(model, RECIPE, linear_types=(Int4Linear,))
        else:
            attach_int_runtime(model, RECIPE, residency=runtime)
        models[runtime] = model
    for model in models.values():
        model.to(device)
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
    return models


def linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(resident bytes of the decoder Linears: weights, scales, zeros, row sums; their number of weights)."""
    nbytes = weights = 0
    for m in model.model.layers.modules():
        if isinstance(m, (nn.Linear, Int4Linear, IntLinear)):
            tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            nbytes += sum(t.numel() * t.element_size() for t in tensors)
            weights += m.in_features * m.out_features
    return nbytes, weights


# ---- timing ---------------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:  # noqa: ANN001
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(models: dict[str, nn.Module], args: argparse.Namespace, vocab: int) -> dict[str, dict[str, float]]:
    """{runtime: {prefill, decode_b1, decode_b8: tokens/s; bytes}}, medians over repetitions, runtimes interleaved."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.batch, args.prompt), generator=gen).to(args.device)
    short = {b: torch.randint(0, vocab, (b, 16), generator=gen).to(args.device) for b in (1, 8)}
    new = args.new_tokens

    def prefill(model):  # noqa: ANN001
        model(input_ids=prompt, use_cache=True)

    def decode(model, b):  # noqa: ANN001
        ids = short[b]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + new

    tasks = {"prefill": (prefill, args.batch * args.prompt)}
    tasks.update({f"decode_b{b}": (lambda m, b=b: decode(m, b), b * new) for b in (1, 8)})
    times: dict[tuple[str, str], list[float]] = {}
    names = list(models)
    with torch.inference_mode():
        for model in models.values():  # warm-up: compiled kernels, Hadamard factors, allocator
            prefill(model)
            model(input_ids=short[8], use_cache=True)
        for rep in range(args.repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for task, (fn, _) in tasks.items():
                for name in order:
                    times.setdefault((name, task), []).append(timed(lambda: fn(models[name]), args.device))
    results = {}
    for name, model in models.items():
        results[name] = {task: tokens / statistics.median(times[(name, task)]) for task, (_, tokens) in tasks.items()}
        results[name]["bytes"], results[name]["weights"] = linear_bytes(model)
    return results


# ---- micro-benchmarks behind two choices of the runtime -------------------------------------------------------------


def _median_ms(fn, device: str, repeats: int = 5) -> float:  # noqa: ANN001
    fn()
    return 1e3 * statistics.median(timed(fn, device) for _ in range(repeats))


def butterfly(x: torch.Tensor) -> torch.Tensor:
    """x @ H for a power-of-two Sylvester H, normalised, by log2(n) add/subtract stages (the alternative measured)."""
    n = x.shape[-1]
    y, h = x.reshape(-1, n), 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), 2)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(n)


def hadamard_report(device: str, rows: int) -> list[str]:
    lines = []
    for n, what in ((128, "R3 head_dim 128"), (512, "R4 pow2 part of 14336 (28 x 512)"), (14336, "R4 14336")):
        x = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
        mm = _median_ms(lambda: apply_hadamard(x), device)
        line = f"hadamard {what}, {rows} rows bf16: matmul {mm:.2f} ms"
        if n & (n - 1) == 0:
            line += f", butterfly {_median_ms(lambda: butterfly(x), device):.2f} ms"
        lines.append(line)
    return lines


def int_mm_report(device: str) -> list[str]:
    from caq_lightning.runtime.int_linear import int_mm

    w = torch.randint(-8, 8, (4096, 4096), dtype=torch.int8, device=device)
    wb = torch.randn(4096, 4096, dtype=torch.bfloat16, device=device)
    lines = []
    for m in (1, 8, 512):
        a = torch.randint(0, 16, (m, 4096), dtype=torch.int8, device=device)
        xb = torch.randn(m, 4096, dtype=torch.bfloat16, device=device)
        plain = _median_ms(lambda: torch._int_mm(a, w.t()) if m > 16 or device == "cpu" else int_mm(a, w), device)
        chosen = _median_ms(lambda: int_mm(a, w), device)
        bf16 = _median_ms(lambda: torch.nn.functional.linear(xb, wb), device)
        lines.append(f"4096x4096 matmul, M={m}: _int_mm(x, W^T) {plain:.3f} ms, runtime's int_mm {chosen:.3f} ms, "
                     f"bf16 {bf16:.3f} ms")  # fmt: skip
    return lines


# ---- report ---------------------------------------------------------------------------------------------------------


def report(shape: str, results: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"## {shape}", "| runtime | prefill tok/s | decode b1 tok/s | decode b8 tok/s | Linear MiB | bytes/fp16 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['prefill']:.1f} | {r['decode_b1']:.2f} | {r['decode_b8']:.2f} | {r['bytes'] / 2**20:.1f} "
            f"| {r['bytes'] / (2 * r['weights']):.3f} |"
        )
    bf = results["bf16"]
    for name in ("dequant", "int8", "packed"):
        r = results[name]
        lines.append(
            f"{shape} {name}: prefill_over_bf16={r['prefill'] / bf['prefill']:.3f} "
            f"decode_b1_over_bf16={r['decode_b1'] / bf['decode_b1']:.3f} "
            f"decode_b8_over_bf16={r['decode_b8'] / bf['decode_b8']:.3f} "
            f"weight_bytes_over_fp16={r['bytes'] / (2 * r['weights']):.3f}"
        )
    return lines


def profile_prefill(model: nn.Module, args: argparse.Namespace, vocab: int, top: int | None = 12) -> list[str]:
    """Share of one prefill's CPU time per op (and input shapes), from torch.profiler: where the runtime's time goes."""
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.randint(0, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=prompt.to(args.device), use_cache=True)  # warm-up: compiled kernels
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(input_ids=prompt.to(args.device), use_cache=True)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return [f"{100 * e.self_cpu_time_total / total:5.1f}%  {e.key}  {e.input_shapes}" for e in ranked]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.batch = args.batch or (1 if args.quick else 4)
    args.new_tokens = args.new_tokens or (8 if args.quick else 128)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    device_line = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {device_line}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"prefill {args.batch} x {args.prompt} tokens; decode {args.new_tokens} new tokens after a 16-token prompt; "
          f"{args.repeats} repetitions, median")  # fmt: skip
    if args.profile:
        models = build_runtimes(args.shapes[0], args.layers, args.device)
        print(f"profile of one prefill, {args.profile}, {args.shapes[0]}:")
        print("\n".join(profile_prefill(models[args.profile], args, models["fp32"].config.vocab_size)))
        return
    for line in int_mm_report(args.device) + hadamard_report(args.device, args.batch * args.prompt):
        print(line)
    final = None
    for shape in args.shapes:
        models = build_runtimes(shape, args.layers, args.device)
        results = measure(models, args, models["fp32"].config.vocab_size)
        del models
        print("\n".join(report(shape, results)), flush=True)
        if shape == "llama3-8b":
            r, bf = results[DEFAULT_RESIDENCY], results["bf16"]
            final = (r["prefill"] / bf["prefill"], r["decode_b1"] / bf["decode_b1"], r["bytes"] / (2 * r["weights"]))
    print(f"wall time {time.time() - start:.0f} s; load average {os.getloadavg()[0]:.1f}")
    if final is not None:
        print(f"int_prefill_over_bf16={final[0]:.3f} int_decode_over_bf16={final[1]:.3f} "
              f"weight_bytes_over_fp16={final[2]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
