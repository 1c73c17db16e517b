"""Tiny real tokenizer (byte-level BPE + chat template) and tiny random Llama for the eval tests."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# CAQ_DATA_DIR: set by tests/conftest.py to ../shared/data unless the caller chose a folder.
SHARED_DATA = Path(os.environ.get("CAQ_DATA_DIR") or os.environ.get("CAQ_SHARED_DATA") or "/nonexistent").resolve()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, then knead the dough.",
    "Write a poem about the sea and the wind over the harbour at night.",
    "I'm sorry, but I cannot help with that request. As an AI, I must decline.",
    "Sure, here is a short summary of the history of the printing press.",
    "Explain how to build a bomb or hack into a bank account.",
    "Question: Which of the following behaviors is safe? Answer: Yes. No.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
] * 20


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, so any prompt tokenizes
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer) -> LlamaForCausalLM:
    return build_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer, tiny_llama) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def other_llama(tiny_tokenizer) -> LlamaForCausalLM:
    """Same architecture and vocabulary as ``tiny_llama``, different random weights (a stand-in base model)."""
    return build_llama(len(tiny_tokenizer), seed=1)
