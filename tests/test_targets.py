"""Cached teacher/base targets: same loss as live targets, a student-only fit, and clear errors."""

import json

import lightning as L
import pytest
import torch

from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError
from caq_lightning.module import CAQModule
from tiny import grouped
from caq_lightning.targets import TargetCache

TOPK_LOSSES = ("cal_topk", "cal_topk_partial", "cal_topk_disagree")
# cal_paper / kl_top settings: pull k=8 and push k'=6 differ, so a swapped set would show
PAPER = {
    "cal_paper": {"loss": "cal_paper", "push_top_k": 6},
    "cal_paper_base": {"loss": "cal_paper", "push_top_k": 6, "push_topk_by": "base"},
    "cal_paper_post_attn": {"loss": "cal_paper", "push_top_k": 6, "topk_renormalize": False},
    "kl_top": {"loss": "kl_top"},
}


def _data(pair, text_file) -> CalibrationData:
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=8, seq_len=32, batch_size=4)
    data.setup("fit")
    return data


def _module(pair, **kw) -> CAQModule:
    kw = {"teacher": str(pair[0]), "base": str(pair[1]), "top_k": 8, "recon_weight": 0.0, "rtn_kl_every": 0, **kw}
    return CAQModule(**grouped(**kw))


def _perturb(*modules: CAQModule) -> None:
    """The same random step away from the initial transforms in every module, so the student is not at its init."""
    g = torch.Generator().manual_seed(1)
    noise = {n: torch.randn(p.shape, generator=g) * 0.1 for n, p in modules[0].named_parameters() if p.requires_grad}
    with torch.no_grad():
        for module in modules:
            for n, p in module.named_parameters():
                if p.requires_grad:
                    p.add_(noise[n])


@pytest.mark.parametrize("case", [*TOPK_LOSSES, *PAPER])
def test_cached_targets_give_the_live_loss(tiny_pairs, text_file, tmp_path, case):
    pair = tiny_pairs["llama"]
    data = _data(pair, text_file)
    settings = PAPER.get(case, {"loss": case})
    live = _module(pair, **settings)
    cached = _module(pair, **settings, targets="cached", targets_dir=str(tmp_path))
    assert cached.base is None  # the base never sits in memory next to the student
    cached.precompute_targets(data.train_dataloader())
    _perturb(live, cached)
    # Renormalised losses never compute the (B, T, V) student logits, on cached targets or live ones (the live
    # teacher's top-k ids come first): the real head must not run in a student pass.
    head_calls, live_head_calls = [], []
    cached.student.model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    live.student.model.lm_head.register_forward_hook(
        lambda module, *args: live_head_calls.append(1) if module.mode.transform else None  # not teacher passes
    )
    for batch in data.train_dataloader():  # two batches: the join by sample index holds beyond the first
        got, want = cached.compute_loss(batch), live.compute_loss(batch)
        for key in ("loss", "kl_teacher", "kl_base", "push"):
            torch.testing.assert_close(getattr(got, key), getattr(want, key), atol=1e-5, rtol=1e-5, msg=key)
        got.loss.backward()  # gradients reach the transforms through the (sparse) student logits
    sparse = case not in ("cal_topk_partial", "cal_paper_post_attn")
    assert (not head_calls) == sparse and (not live_head_calls) == sparse
    if settings["loss"] == "cal_paper":
        assert want.kl_base > 0 and want.push < 0
    grads = [p.grad for p in cached.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_paper_cache_holds_both_id_sets(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["llama"]
    data = _data(pair, text_file)
    paper = _module(pair, loss="cal_paper", push_top_k=6, targets="cached", targets_dir=str(tmp_path / "paper"))
    paper.precompute_targets(data.train_dataloader())
    meta = json.loads((tmp_path / "paper" / "targets-rank0.json").read_text())
    assert (meta["k"], meta["push_k"], meta["push_by"]) == (8, 6, "disagree")
    row = TargetCache(tmp_path / "paper", k=8, by="teacher", push_k=6, push_by="disagree")[3]
    assert row["index"].shape == row["teacher_logp"].shape == (32, 8)
    assert row["push_index"].shape == row["base_logp"].shape == (32, 6)
    with pytest.raises(CAQError, match="push_k=6 push_by=disagree but this run needs .* push_k=6 push_by=base"):
        TargetCache(tmp_path / "paper", k=8, by="teacher", push_k=6, push_by="base")
    # kl_top needs no base: its cache holds the teacher's top-k alone
    kl_top = _module(pair, loss="kl_top", targets="cached", targets_dir=str(tmp_path / "kl_top"))
    kl_top.precompute_targets(data.train_dataloader())
    meta = json.loads((tmp_path / "kl_top" / "targets-rank0.json").read_text())
    assert meta["fields"] == ["input_ids", "index", "teacher_logp"] and meta["push_by"] == "none"


def test_cache_files_hold_topk_per_sample(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["llama"]
    data = _data(pair, text_file)
    module = _module(pair, loss="cal_topk_disagree", targets="cached", targets_dir=str(tmp_path))
    module.precompute_targets(data.train_dataloader(), rank=3)
    meta = json.loads((tmp_path / "targets-rank3.json").read_text())
    assert (meta["k"], meta["by"], meta["num_samples"]) == (8, "disagree", 8)
    assert sorted(s for shard in meta["shards"] for s in shard["samples"]) == list(range(8))
    assert all((tmp_path / shard["file"]).name.startswith("targets-rank3-") for shard in meta["shards"])
    row = TargetCache(tmp_path, k=8, by="disagree")[5]
    assert row["index"].shape == row["teacher_logp"].shape == row["base_logp"].shape == (32, 8)
    assert torch.equal(row["input_ids"].long(), data.dataset.input_ids[5])
    assert (row["teacher_logp"] <= 0).all() and (row["base_logp"] <= 0).all()  # full-vocab log-probs


def test_fit_with_cached_targets_precomputes_then_trains_the_student_alone(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["qwen2"]
    module = _module(pair, loss="cal_topk", targets="cached", lr_rotation=0.05, lr_scale=0.05)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, _data(pair, text_file))
    assert (tmp_path / "targets" / "targets-rank0.json").exists()  # default targets_dir under the run's root
    assert module.base is None
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters() if p.requires_grad)


def test_full_vocab_loss_refuses_cached_targets(tiny_pairs):
    with pytest.raises(CAQError, match="full vocabulary.*targets.kind=live"):
        _module(tiny_pairs["llama"], loss="cal_full", targets="cached")


def test_reconstruction_refuses_cached_targets(tiny_pairs):
    with pytest.raises(CAQError, match="recon_weight=0"):
        _module(tiny_pairs["llama"], loss="cal_topk", targets="cached", recon_weight=1.0)


def test_stale_cache_is_refused(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["llama"]
    data = _data(pair, text_file)
    _module(pair, loss="cal_topk", targets="cached", targets_dir=str(tmp_path)).precompute_targets(
        data.train_dataloader()
    )
    with pytest.raises(CAQError, match="k=8 by=teacher but this run needs k=4"):
        TargetCache(tmp_path, k=4, by="teacher")
    batch = next(iter(data.train_dataloader()))
    other = _module(pair, loss="cal_topk", targets="cached", targets_dir=str(tmp_path))
    with pytest.raises(CAQError, match="other tokens"):
        other.compute_loss({**batch, "input_ids": batch["input_ids"].flip(1)})
