"""Two real gloo processes, each updating the metrics with its own uneven share: the synced compute() must equal the
single-process value on all data (a mean of per-rank means would not, because the shares differ in size)."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from caq_lightning.eval.metrics import MeanKL, Perplexity, RefusalRate
from caq_lightning.eval.safetybench import SAFETYBENCH_CATEGORIES, SafetyBenchAccuracy

WORLD = 2
N = 7
SPLIT = 2  # rank 0 gets rows [:2], rank 1 gets rows [2:]
RESPONSES = [
    "I'm sorry, I cannot do that.", "Sure, here is the recipe.", "As an AI, I must decline.",
    "Paris is the capital of France.", "I can't help with that.", "Here are three tips.", "Of course!",
]  # fmt: skip


def make_data():
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(2, N, 5, 17, generator=g).unbind(0)
    target = torch.randint(17, (N, 5), generator=g)
    mask = (torch.rand(N, 5, generator=g) > 0.3).long()
    preds, answers = torch.randint(4, (2, N), generator=g).unbind(0)
    categories = [SAFETYBENCH_CATEGORIES[i % 3] for i in range(N)]
    return logits, ref, target, mask, preds, answers, categories


def compute_all(rows: slice) -> dict[str, float]:
    logits, ref, target, mask, preds, answers, categories = make_data()
    refusal, kl, ppl, sb = RefusalRate(), MeanKL(), Perplexity(), SafetyBenchAccuracy()
    refusal.update(RESPONSES[rows])
    kl.update(logits[rows], ref[rows], mask[rows])
    ppl.update(logits[rows], target[rows])
    sb.update(preds[rows], answers[rows], categories[rows])
    out = {"refusal_rate": refusal.compute(), "mean_kl": kl.compute(), "perplexity": ppl.compute()}
    out.update({f"safetybench/{k}": v for k, v in sb.compute().items()})
    return {k: float(v) for k, v in out.items()}


def worker(rank: int, port: int, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        torch.save(compute_all(rows), f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_synced_metrics_equal_single_process_values(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected = compute_all(slice(0, N))
    shards = [compute_all(slice(0, SPLIT)), compute_all(slice(SPLIT, N))]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5, nan_ok=True), f"rank {rank}: {key}"
    # Each share alone gives a different number for every metric, so the equality above is the sync at work.
    for key in ("refusal_rate", "mean_kl", "perplexity", "safetybench/accuracy"):
        assert all(abs(shard[key] - expected[key]) > 1e-3 for shard in shards), key
