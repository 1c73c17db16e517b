import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from caq_lightning.errors import CAQError
from caq_lightning.eval.refusal import (
    REFUSAL_KEYWORDS,
    chat_prompts,
    generate_responses,
    is_refusal,
    opening_logprob,
    refusal_logodds,
)
from caq_lightning.zoo import train_tokenizer

PROMPTS = [
    "Tell me about the river",
    "Explain how to bake bread at home in a small oven",
    "Hi",
    "Write a poem about the sea and the moon and the stars over the old harbour",
    "What is the capital of the northern valley?",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    words = "the a river sea moon bread bake oven poem star harbour old small home write tell me about".split()
    text = [" ".join(rng.choices(words, k=12)) + "." for _ in range(300)]
    return train_tokenizer(iter(text + ["I'm sorry, but I cannot help. Sure, here is how to do it."] * 20), 300)


def tiny_llama(vocab_size: int, seed: int = 0, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=init, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def train_to_reply(tokenizer, reply: str, steps: int = 60) -> LlamaForCausalLM:
    """A tiny model that learns to answer every prompt with ``reply``."""
    model = tiny_llama(len(tokenizer), seed=1)
    texts = [t + reply + tokenizer.eos_token for t in chat_prompts(tokenizer, PROMPTS)]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_is_refusal_on_examples():
    assert is_refusal("I'm sorry, but I cannot help with that request.")
    assert is_refusal("As an AI, I must decline.")
    assert is_refusal("I\u2019m sorry, that is not something I do.")  # curly apostrophe
    assert is_refusal("Creating malware is illegal and unethical.")
    assert not is_refusal("Sure, here is how to bake bread. Step 1: mix flour and water.")
    assert not is_refusal("")
    assert not is_refusal("i'm sorry")  # GCG matching is case-sensitive


def test_is_refusal_custom_keywords():
    assert is_refusal("Nope.", keywords=["Nope"])
    assert not is_refusal("I'm sorry", keywords=["Nope"])
    assert "I can't assist" in REFUSAL_KEYWORDS and "Sorry" not in REFUSAL_KEYWORDS


def test_chat_prompts_end_with_generation_prompt(tokenizer):
    (text,) = chat_prompts(tokenizer, ["Hello there"])
    assert text == "<|user|>\nHello there<|end|>\n<|assistant|>\n"


def test_chat_prompts_needs_template(tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|end|>")
    with pytest.raises(CAQError, match="chat_template"):
        chat_prompts(bare, ["Hello"])


def test_generate_left_padded_batch_matches_one_by_one(tokenizer):
    # Large init makes the greedy choice depend sharply on the input, so a padding/position bug changes the text.
    model = tiny_llama(len(tokenizer), init=0.5)
    batched = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8)
    single = [generate_responses(model, tokenizer, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(single)) > 1 and all(len(s) > 0 for s in single)
    assert not model.training and tokenizer.padding_side == "right"  # no lasting side effects


def test_generate_returns_completion_only(tokenizer):
    model = train_to_reply(tokenizer, "Sure, here is how to do it.")
    assert generate_responses(model, tokenizer, ["Tell me about the moon"], max_new_tokens=32) == [
        "Sure, here is how to do it."
    ]


def test_refusal_logodds_sign_follows_training(tokenizer):
    held_out = ["Write about the old star", "Bake a moon"]
    refuser = train_to_reply(tokenizer, "I'm sorry, but I cannot help.")
    complier = train_to_reply(tokenizer, "Sure, here is how to do it.")
    assert (refusal_logodds(refuser, tokenizer, held_out) > 0).all()
    assert (refusal_logodds(complier, tokenizer, held_out) < 0).all()


def test_opening_logprob_batch_invariant(tokenizer):
    model = tiny_llama(len(tokenizer))
    batched = opening_logprob(model, tokenizer, PROMPTS, "I'm sorry", batch_size=8)
    single = torch.cat([opening_logprob(model, tokenizer, [p], "I'm sorry") for p in PROMPTS])
    assert batched.shape == (len(PROMPTS),)
    assert torch.allclose(batched, single, atol=1e-5)
    assert (batched < 0).all()


def test_opening_logprob_rejects_empty_opening(tokenizer):
    with pytest.raises(CAQError, match="opening"):
        opening_logprob(tiny_llama(len(tokenizer)), tokenizer, PROMPTS, "")
