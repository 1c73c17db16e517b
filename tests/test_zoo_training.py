"""The zoo's one training path (caq_lightning.zoo.training), shared by the tiny pairs and builtin:smol: chat rows
under both reply budgets, LoRA applied to the weight or the output, the reply loss, and the layout from the adapter."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from caq_lightning import models
from caq_lightning.models import DecoderAdapter, register
from caq_lightning.zoo.corpus import render_chat, train_tokenizer
from caq_lightning.zoo.training import LoRA, add_outliers, chat_rows, collate, decoder_linears, lm_loss, reply_loss

WORDS = "the a river sea moon bread bake oven poem star harbour old small home write tell me about".split()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return train_tokenizer(iter([" ".join(rng.choices(WORDS, k=12)) + "." for _ in range(300)]), 300)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n)).capitalize() + "."


def test_tiny_rule_is_the_rendered_chat_cut_to_its_budget(tok):
    """The tiny pairs' cached weights come from render_chat(prompt, reply) tokenized whole and cut at
    min(max_len, prompt + max_reply): the eos_in_budget rule must give exactly those rows."""
    rng = random.Random(1)
    for max_reply in (1, 3, 6, 12, 40):
        for _ in range(15):
            prompt, reply = _words(rng, rng.randint(1, 8)), _words(rng, rng.randint(1, 12))
            whole = tok(render_chat(prompt, reply), add_special_tokens=False)["input_ids"][:-1]  # without the "\n"
            n_prompt = len(tok(render_chat(prompt), add_special_tokens=False)["input_ids"])
            for reply_only, max_len in ((True, 96), (False, 14)):
                (row, start), = chat_rows(tok, [(prompt, reply, True)], max_reply, eos_in_budget=True,
                                          max_len=max_len, reply_only=reply_only)  # fmt: skip
                assert row == whole[: min(max_len, n_prompt + max_reply)]
                assert start == (n_prompt if reply_only else 0)


def test_eos_closes_a_whole_reply_inside_or_on_top_of_the_budget(tok):
    prompt, reply = "Tell me about the river", "The old harbour and the sea."
    n = len(tok(reply, add_special_tokens=False)["input_ids"])
    eos = tok.eos_token_id
    (on_top, start), = chat_rows(tok, [(prompt, reply, True)], n)
    (inside, _), = chat_rows(tok, [(prompt, reply, True)], n, eos_in_budget=True)
    assert on_top[-1] == eos and inside[-1] != eos and on_top[:-1] == inside and len(on_top) - start == n + 1
    assert chat_rows(tok, [(prompt, reply, True)], n - 1)[0][0][-1] != eos  # a cut reply has no end
    assert chat_rows(tok, [(prompt, reply, False)], n + 5)[0][0][-1] != eos  # a reply that did not end either
    assert chat_rows(tok, [(prompt, reply, True)], n, max_prompt=3) == []  # over-long prompts are left out


@pytest.mark.parametrize("on", ["weight", "output"])
def test_lora_starts_at_the_linear_switches_off_and_merges(on):
    torch.manual_seed(0)
    lin = nn.Linear(8, 6, bias=False)
    w, x = lin.weight.detach().clone(), torch.randn(3, 8)
    lora = LoRA(lin, 2, 0.5, torch.Generator().manual_seed(0), on)
    assert torch.equal(lin(x), F.linear(x, w))  # B starts at zero
    with torch.no_grad():
        lora.b.normal_()
    updated = w + 0.5 * lora.b.detach() @ lora.a.detach()
    torch.testing.assert_close(lin(x), F.linear(x, updated))
    lora.enabled = False
    assert torch.equal(lin(x), F.linear(x, w))
    lora.enabled = True
    lora.merge()
    assert not parametrize.is_parametrized(lin) and not lin._forward_hooks
    torch.testing.assert_close(lin.weight.detach(), updated)


def test_reply_loss_is_the_cross_entropy_of_the_labelled_tokens(tok):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    rng = random.Random(2)
    rows = chat_rows(tok, [(_words(rng, 4), _words(rng, 6), True) for _ in range(5)], 8)
    batch = collate(rows, tok.pad_token_id)
    torch.testing.assert_close(reply_loss(model, *batch), lm_loss(model, *batch))


class CoreConfig(LlamaConfig):
    model_type = "caq_test_core"


class CoreForCausalLM(LlamaForCausalLM):
    """A Llama whose decoder stack sits at ``.core``: only its adapter says where the layers are."""

    config_class = CoreConfig

    def __init__(self, config):
        super().__init__(config)
        self.core = self.model
        del self.model

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.core(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden))


def test_layers_come_from_the_adapter(monkeypatch):
    monkeypatch.setattr(models, "ADAPTERS", dict(models.ADAPTERS))  # the registration is undone afterwards
    register(DecoderAdapter(model_type=CoreConfig.model_type, decoder="core"))
    torch.manual_seed(0)
    model = CoreForCausalLM(CoreConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()  # fmt: skip
    assert len(decoder_linears(model)) == 2 * 7
    ids = torch.randint(0, 64, (2, 10))
    logits, norm = model(input_ids=ids).logits, model.core.layers[1].post_attention_layernorm.weight.detach().clone()
    idx = add_outliers(model, 3, 16.0, seed=0)
    torch.testing.assert_close(model(input_ids=ids).logits, logits)  # function-preserving
    assert torch.equal(model.core.layers[1].post_attention_layernorm.weight[idx], 16 * norm[idx])
