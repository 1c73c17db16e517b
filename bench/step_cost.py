"""Step cost of CAQ's objectives on one batch, in one run: time ratios (and memory) against KL-only and an
official-style step. The last line is ``caq_cached_over_kl=<ratio>``.

    python bench/step_cost.py                                    # CPU: a small Llama (hidden 256, 4 layers)
    python bench/step_cost.py --shape llama3-8b --layers 2 --dtype bfloat16 --seq 2048 --batch 1 --device cuda
    python bench/step_cost.py --shape smol --vs-ref <git ref>    # this tree's kl_top step against <ref>'s, in tokens/s

Phases (each a real ``CAQModule.compute_loss`` + ``backward`` on the same batch; ``recon_weight=0`` everywhere, the
optimizer step is left out as it is the same for all):
  kl          KL-only (OSTQuant): FP teacher forward + student forward/backward, full-vocab KL
  caq_live    CAQ cal_topk with live targets: teacher and base forwards + student forward/backward, top-k loss
  caq_cached  CAQ cal_topk with cached targets: student forward/backward only (targets read from the safetensors cache)
  official    the paper's layout: student forward/backward + quant-off FP forward + base forward, three full-vocab
              logit tensors (cal_full). Its FP pass shares the student's weights here; the paper's code keeps a
              separate copy, which the resident-weights column adds.
Repeats are interleaved (phase order rotates every round) and each phase reports its median. The ratios use wall time
on CUDA and, on CPU, the process's CPU time with one thread (``--threads 1``, the default there): on a machine shared
with other jobs, wall time mostly measures the neighbours (and multi-threaded OpenMP spins while they run).
Memory: on CUDA the measured peak above what was allocated before the step
(plus the weights each phase needs resident); on CPU there are no allocator statistics, so only the resident weights.

``--vs-ref REF`` times the calibration step of ``kl_top`` at W4A4KV4 as the CPU configs run it (bf16 frozen weights,
bf16-mixed autocast, ``compute_loss`` + ``backward``) with REF's code (unpacked by ``git archive``) and this tree's,
each phase a fresh process, the phases taking turns round after round (order rotated); PROTOCOL lists them. The last
line is ``best_tokens_per_s_over_ref=<ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("CAQ_STEP_COST_CODE", str(REPO)))  # --vs-ref workers import the ref's code
from caq_lightning.config import LossConfig, TargetsConfig  # noqa: E402
from caq_lightning.env import DTYPES as ALL_DTYPES  # noqa: E402
from caq_lightning.module import CAQModule  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=4096, num_hidden_layers=4, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, num_hidden_layers=32, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "smol": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                 vocab_size=49152, num_hidden_layers=30, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}  # fmt: skip
PHASES = ("kl", "caq_live", "caq_cached", "official")
DTYPES = {name: ALL_DTYPES[name] for name in ("float32", "bfloat16")}  # the choices for the frozen weights
# --vs-ref phases: (code, targets, recon_weight, batch). "ref_live" is the protocol the CPU configs ran: kl_top with
# live targets and relative block reconstruction, 2 x 256 tokens. "batch" None = --big-batch.
PROTOCOL = {
    "ref_live": ("ref", "live", 1.0, 2),
    "live": ("this", "live", 1.0, 2),
    "live_big": ("this", "live", 1.0, None),
    "cached": ("this", "cached", 0.0, 2),
    "cached_big": ("this", "cached", 0.0, None),
}


def save_pair(root: Path, shape: str, layers: int | None, dtype: torch.dtype, seed: int = 0) -> tuple[str, str]:
    """A random base and an 'aligned' copy (base + small noise) with a stub tokenizer, as safetensors on disk."""
    kwargs = {"tie_word_embeddings": False, **SHAPES[shape]}
    if layers:
        kwargs["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**kwargs), dtype=dtype)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>")), eos_token="<eos>"
    )  # only for the pair check; the batch is random token ids
    paths = root / "base", root / "aligned"
    base.save_pretrained(paths[0])
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.01 * p.float().std().to(p.dtype))
    base.save_pretrained(paths[1])
    for path in paths:
        tokenizer.save_pretrained(path)
    return str(paths[1]), str(paths[0])


def nbytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules if m is not None for t in (*m.parameters(), *m.buffers()))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(module: CAQModule, batch: dict[str, torch.Tensor]) -> None:
    module.zero_grad(set_to_none=True)
    module.compute_loss(batch).loss.backward()


def timed(module: CAQModule, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step(module, batch)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_step_bytes(module: CAQModule, batch: dict[str, torch.Tensor], device: torch.device) -> int | None:
    """CUDA: peak memory one step adds on top of what is resident before it. CPU has no allocator stats: None."""
    if device.type != "cuda":
        return None
    sync(device)
    module.zero_grad(set_to_none=True)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(module, batch)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def time_kl_top(spec: dict) -> dict:
    """Build a kl_top CAQModule at W4A4KV4 from ``spec`` and time ``steps`` steps after ``warmup`` ones.

    spec: teacher, targets (live|cached), targets_dir, recon_weight, batch, seq, precision (bf16-mixed|32), warmup,
    steps, and optionally device (default cpu). Step times are process CPU seconds on CPU, synchronised wall seconds
    on CUDA; peak memory is the CUDA allocator's peak (weights included) or, on CPU, the process's peak RSS.
    """
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    kwargs = dict(teacher=spec["teacher"], base=spec["teacher"], rtn_kl_every=0, dtype="bfloat16",
                  loss=LossConfig(name="kl_top", recon_weight=spec["recon_weight"], recon="relative"))  # fmt: skip
    if spec["targets"] == "cached":
        kwargs["targets"] = TargetsConfig(kind="cached", dir=spec["targets_dir"])
    module = CAQModule(**kwargs).to(device)
    vocab = module.student.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(vocab, (spec["batch"], spec["seq"]), generator=g).to(device),
        "attention_mask": torch.ones(spec["batch"], spec["seq"], dtype=torch.long, device=device),
        "index": torch.arange(spec["batch"]),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16-mixed")
    if spec["targets"] == "cached":
        with autocast:
            module.precompute_targets([batch])  # once, untimed: what the cache amortises over a run

    def one_step() -> float:
        module.zero_grad(set_to_none=True)
        with autocast:
            terms = module.compute_loss(batch)  # a dict in the reference's code, LossTerms in this tree's
            loss = terms["loss"] if isinstance(terms, dict) else terms.loss
        loss.backward()
        return loss.item()  # synchronises on CUDA

    start = time.perf_counter()
    for _ in range(spec["warmup"]):
        loss = one_step()
    warmup_s = time.perf_counter() - start
    step_s, wall = [], []
    for _ in range(spec["steps"]):
        c, w = time.process_time(), time.perf_counter()
        loss = one_step()
        wall.append(time.perf_counter() - w)
        step_s.append(wall[-1] if cuda else time.process_time() - c)
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = spec["batch"] * spec["seq"]
    return {"step_s": step_s, "wall_s": wall, "warmup_wall_s": warmup_s, "loss": loss, "tokens": tokens,
            "tokens_per_s": tokens / statistics.median(step_s), "peak_mib": peak / 2**20,
            "peak_kind": "cuda_max_allocated" if cuda else "process_peak_rss"}  # fmt: skip


def unpack_ref(ref: str, into: Path) -> Path:
    """REF's tracked files under ``into`` (git archive: no worktree, nothing written to the repository)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"--vs-ref {ref}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def vs_ref(args: argparse.Namespace) -> None:
    phases = [name for name in PROTOCOL if name in args.phases]
    env_base = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        ref_code = unpack_ref(args.vs_ref, Path(tmp) / "ref")
        teacher = args.teacher or save_pair(Path(tmp), args.shape, args.layers, torch.bfloat16)[0]
        runs: dict[str, list[dict]] = {name: [] for name in phases}
        for r in range(args.rounds):
            order = phases[r % len(phases) :] + phases[: r % len(phases)]
            for name in order:
                code, targets, recon, batch = PROTOCOL[name]
                spec = {"teacher": teacher, "targets": targets, "recon_weight": recon, "batch": batch or args.big_batch,
                        "seq": args.seq, "precision": args.precision, "warmup": args.warmup, "steps": args.repeats,
                        "targets_dir": f"{tmp}/targets-{name}-{r}"}  # fmt: skip
                env = {**env_base, "CAQ_STEP_COST_CODE": str(ref_code if code == "ref" else REPO)}
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                      capture_output=True, text=True, cwd=tmp)  # fmt: skip
                if done.returncode:
                    raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[name].append({**result, "batch": spec["batch"]})
                print(f"round {r} {name}: cpu_s={[round(t, 2) for t in result['step_s']]} loss={result['loss']:.5f}",
                      file=sys.stderr, flush=True)  # fmt: skip
    lines = [
        f"device=cpu (threads=1) model={args.teacher or f'random {args.shape}'} layers={args.layers or 'all'} "
        f"seq={args.seq} "
        f"precision={args.precision} dtype=bfloat16 loss=kl_top W4A4KV4 ref={args.vs_ref} rounds={args.rounds} "
        f"steps_per_round={args.repeats} torch={torch.__version__} tokens_per_s_from=median_process_cpu_time",
        f"{'phase':<12}{'code':>6}{'targets':>9}{'recon':>7}{'tokens':>8}{'median_cpu_s':>14}{'tokens_per_s':>14}"
        f"{'over_ref':>10}{'loss':>10}{'peak_rss_mib':>14}",
    ]
    rate = {}
    for name in phases:
        code, targets, recon, _ = PROTOCOL[name]
        tokens = runs[name][0]["batch"] * args.seq
        median = statistics.median(t for run in runs[name] for t in run["step_s"])
        rate[name] = tokens / median
    for name in phases:
        code, targets, recon, _ = PROTOCOL[name]
        tokens = runs[name][0]["batch"] * args.seq
        over = rate[name] / rate["ref_live"] if "ref_live" in rate else float("nan")
        lines.append(
            f"{name:<12}{code:>6}{targets:>9}{recon:>7g}{tokens:>8}{tokens / rate[name]:>14.2f}{rate[name]:>14.1f}"
            f"{over:>10.2f}{runs[name][-1]['loss']:>10.5f}{max(run['peak_mib'] for run in runs[name]):>14.0f}"
        )
    best = max((n for n in phases if n != "ref_live"), key=rate.get)
    lines.append(f"best={best} best_tokens_per_s_over_ref={rate[best] / rate.get('ref_live', float('nan')):.2f}")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="frozen weights; transforms fp32")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    parser.add_argument("--vs-ref", metavar="REF", help="time kl_top steps of REF's code against this tree's")
    parser.add_argument("--phases", nargs="+", choices=list(PROTOCOL), default=list(PROTOCOL), help="--vs-ref phases")
    parser.add_argument("--teacher", help="--vs-ref: a real model (e.g. builtin:smol) instead of the random --shape")
    parser.add_argument("--big-batch", type=int, default=8, help="--vs-ref: the batch of the *_big phases")
    parser.add_argument("--rounds", type=int, default=2, help="--vs-ref: rounds of all phases, order rotated")
    parser.add_argument("--precision", choices=["bf16-mixed", "32"], default="bf16-mixed", help="--vs-ref autocast")
    parser.add_argument("--out", help="--vs-ref: also write the table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(1)
        print(json.dumps(time_kl_top(json.loads(args.worker))))
        return
    if args.vs_ref:
        vs_ref(args)
        return
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    clock = 0 if device.type == "cuda" else 1  # wall time on CUDA, CPU time on CPU

    with tempfile.TemporaryDirectory() as tmp:
        teacher, base = save_pair(Path(tmp), args.shape, args.layers, DTYPES[args.dtype])
        common = dict(teacher=teacher, rtn_kl_every=0, dtype=args.dtype)

        def loss(name: str) -> LossConfig:
            return LossConfig(name=name, recon_weight=0.0, top_k=args.top_k)

        modules = {
            "kl": CAQModule(base=None, loss=loss("kl"), **common),
            "caq_live": CAQModule(base=base, loss=loss("cal_topk"), **common),
            "caq_cached": CAQModule(
                base=base, loss=loss("cal_topk"), targets=TargetsConfig(kind="cached", dir=f"{tmp}/targets"), **common
            ),
            "official": CAQModule(base=base, loss=loss("cal_full"), **common),
        }
        for module in modules.values():
            module.to(device)
        cfg = modules["kl"].student.model.config
        g = torch.Generator().manual_seed(0)
        batch = {
            "input_ids": torch.randint(cfg.vocab_size, (args.batch, args.seq), generator=g).to(device),
            "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
            "index": torch.arange(args.batch),
        }
        modules["caq_cached"].precompute_targets([batch])  # once, untimed: this is what the cache amortises

        times: dict[str, list[tuple[float, float]]] = {name: [] for name in PHASES}
        for r in range(args.warmup + args.repeats):
            order = PHASES[r % len(PHASES) :] + PHASES[: r % len(PHASES)]
            for name in order:
                elapsed = timed(modules[name], batch, device)
                if r >= args.warmup:
                    times[name].append(elapsed)
        wall = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
        median = {name: statistics.median(t[clock] for t in values) for name, values in times.items()}
        peaks = {name: peak_step_bytes(modules[name], batch, device) for name in PHASES}
        student, base_model = modules["kl"].student, modules["caq_live"].base
        resident = {
            "kl": nbytes(student),
            "caq_live": nbytes(student, base_model),
            "caq_cached": nbytes(student),
            "official": nbytes(student, base_model) + nbytes(student.model),  # + the separate FP copy
        }

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu (threads={torch.get_num_threads()})"
    mib = 2**20
    print(
        f"device={where} shape={args.shape} layers={cfg.num_hidden_layers} hidden={cfg.hidden_size} "
        f"vocab={cfg.vocab_size} batch={args.batch}x{args.seq} dtype={args.dtype} top_k={args.top_k} "
        f"repeats={args.repeats} torch={torch.__version__} ratios_from={'wall' if clock == 0 else 'cpu'}_time"
    )
    print(f"{'phase':<12}{'median_ms':>11}{'wall_ms':>10}{'step_peak_mib':>15}{'resident_weights_mib':>22}")
    for name in PHASES:
        peak = "n/a" if peaks[name] is None else f"{peaks[name] / mib:.1f}"
        print(f"{name:<12}{median[name] * 1e3:>11.1f}{wall[name] * 1e3:>10.1f}{peak:>15}{resident[name] / mib:>22.1f}")
    for name in PHASES:
        if peaks[name] is not None:
            print(f"peak_mib_{name}={(peaks[name] + resident[name]) / mib:.1f}")
    print(f"caq_live_over_kl={median['caq_live'] / median['kl']:.3f}")
    print(f"caq_cached_over_official={median['caq_cached'] / median['official']:.3f}")
    print(f"caq_cached_over_kl={median['caq_cached'] / median['kl']:.3f}")


if __name__ == "__main__":
    main()
