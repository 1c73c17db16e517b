import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from caq_lightning.errors import CAQError
from caq_lightning.loading import check_pair, load_config, load_model, load_tokenizer

VOCAB = 64
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


def _save_tokenizer(path: Path, words: list[str], pad: bool = True) -> None:
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "</s>"} if pad else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **kwargs).save_pretrained(path)


def _save_model(path: Path, config_cls=LlamaConfig, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**{**TINY, **overrides})).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config, MistralConfig])
def test_load_model_roundtrip_frozen_eval(tmp_path, config_cls):
    saved = _save_model(tmp_path / "m", config_cls)
    loaded = load_model(str(tmp_path / "m"))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    assert loaded.config.model_type == saved.config.model_type
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(ids).logits, saved(ids).logits)


def test_load_model_dtype(tmp_path):
    _save_model(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_model_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _save_model(tmp_path / "m")
    assert load_model("~/m").config.hidden_size == 32


def test_missing_path_fails(tmp_path):
    with pytest.raises(CAQError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CAQError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(CAQError, match="'nobody-org/no-such-model' is a hub id but HF_HUB_OFFLINE is set"):
        load_model("nobody-org/no-such-model")
    with pytest.raises(CAQError, match="hub id but HF_HUB_OFFLINE is set"):
        load_tokenizer("nobody-org/no-such-model")
    assert time.perf_counter() - start < 2.0


def test_hub_id_offline_loads_from_hf_cache(monkeypatch, tmp_path):
    # The layout huggingface_hub writes on download: refs/main names a snapshot holding the files.
    repo = tmp_path / "hub" / "models--some-org--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    saved = _save_model(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("some-org/tiny-llama")
    ids = torch.arange(8)[None]
    assert torch.equal(loaded(ids).logits, saved(ids).logits)


def test_unsupported_architecture_fails(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CAQError, match="unsupported architecture 'gpt2'.*llama, qwen2, mistral"):
        load_model(str(tmp_path / "gpt2"))


def test_pickle_weights_are_refused(tmp_path):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CAQError, match="only from safetensors"):
        load_model(str(tmp_path / "bin"))


def test_load_tokenizer_sets_pad_to_eos(tmp_path):
    _save_tokenizer(tmp_path / "tok", ["river", "flows"], pad=False)
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    assert tok("river flows")["input_ids"] == [2, 3]


def test_tokenizer_missing_from_model_dir_fails(tmp_path):
    _save_model(tmp_path / "m")
    with pytest.raises(CAQError, match="tokenizer path .* has none of tokenizer.json"):
        load_tokenizer(str(tmp_path / "m"))


def test_check_pair_accepts_matching_pair(tmp_path):
    _save_model(tmp_path / "teacher", seed=0)
    _save_model(tmp_path / "base", seed=1)
    for name in ("teacher", "base"):
        _save_tokenizer(tmp_path / name, ["river", "flows"])
    teacher, base = load_config(str(tmp_path / "teacher")), load_config(str(tmp_path / "base"))
    check_pair(teacher, base, load_tokenizer(str(tmp_path / "teacher")), load_tokenizer(str(tmp_path / "base")))


def test_check_pair_architecture_mismatch(tmp_path):
    _save_model(tmp_path / "teacher", LlamaConfig)
    _save_model(tmp_path / "base", Qwen2Config)
    with pytest.raises(CAQError, match="teacher is 'llama' but base is 'qwen2'"):
        check_pair(load_config(str(tmp_path / "teacher")), load_config(str(tmp_path / "base")))


def test_check_pair_vocab_mismatch(tmp_path):
    _save_model(tmp_path / "teacher")
    _save_model(tmp_path / "base", vocab_size=VOCAB + 8)
    with pytest.raises(CAQError, match=f"teacher vocab_size {VOCAB} != base vocab_size {VOCAB + 8}"):
        check_pair(load_config(str(tmp_path / "teacher")), load_config(str(tmp_path / "base")))


def test_check_pair_tokenizer_mismatch(tmp_path):
    _save_model(tmp_path / "teacher")
    shutil.copytree(tmp_path / "teacher", tmp_path / "base")
    _save_tokenizer(tmp_path / "teacher", ["river", "flows"])
    _save_tokenizer(tmp_path / "base", ["flows", "river"])
    teacher, base = load_config(str(tmp_path / "teacher")), load_config(str(tmp_path / "base"))
    with pytest.raises(CAQError, match="tokenizers map tokens to different ids"):
        check_pair(teacher, base, load_tokenizer(str(tmp_path / "teacher")), load_tokenizer(str(tmp_path / "base")))
