import json
import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from caq_lightning.data import CalibrationData, load_rows, text_windows
from caq_lightning.errors import CAQError
from caq_lightning.loading import load_tokenizer

# CAQ_DATA_DIR: set by tests/conftest.py to ../shared/data unless the caller chose a folder.
SHARED_DATA = Path(os.environ.get("CAQ_DATA_DIR") or os.environ.get("CAQ_SHARED_DATA") or "/nonexistent")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = " ".join(
    f"The {w} of sample {i} was measured at {i * 7 % 13} units, while the river kept flowing north."
    for i, w in enumerate(["weight", "height", "length", "colour", "taste", "sound"] * 20)
)


def _tokenizer(path: Path, chat_template: str | None) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return _tokenizer(tmp_path_factory.mktemp("tok"), CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tokenizer_dir(tmp_path_factory) -> str:
    return _tokenizer(tmp_path_factory.mktemp("plain_tok"), None)


@pytest.fixture(scope="module")
def corpus_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS.replace(". ", ".\n"))
    return path


def _setup(**kwargs) -> CalibrationData:
    data = CalibrationData(**kwargs)
    data.setup("fit")
    return data


def test_text_windows_shape_and_mask(tokenizer_dir, corpus_txt):
    data = _setup(source=str(corpus_txt), tokenizer=tokenizer_dir, num_samples=5, seq_len=32, batch_size=2)
    batch = next(iter(data.train_dataloader()))
    assert len(data.dataset) == 5
    assert batch["input_ids"].shape == (2, 32) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and bool(batch["attention_mask"].eq(1).all())


def test_text_windows_are_contiguous_slices_of_the_corpus(tokenizer_dir, corpus_txt):
    data = _setup(source=str(corpus_txt), tokenizer=tokenizer_dir, num_samples=4, seq_len=16)
    stream = data.tokenizer(corpus_txt.read_text(), add_special_tokens=False)["input_ids"]
    text = f" {' '.join(map(str, stream))} "
    for window in data.dataset.input_ids:
        assert f" {' '.join(map(str, window.tolist()))} " in text


def test_text_windows_deterministic_per_seed(tokenizer_dir, corpus_txt):
    kwargs = dict(source=str(corpus_txt), tokenizer=tokenizer_dir, num_samples=8, seq_len=16)
    a, b, c = _setup(seed=1, **kwargs), _setup(seed=1, **kwargs), _setup(seed=2, **kwargs)
    assert torch.equal(a.dataset.input_ids, b.dataset.input_ids)
    assert not torch.equal(a.dataset.input_ids, c.dataset.input_ids)


def test_jsonl_and_csv_sources_give_the_same_windows(tokenizer_dir, tmp_path):
    docs = [CORPUS[:600], CORPUS[600:1400], CORPUS[1400:2000]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "c.csv").write_text("id,body\n" + "".join(f'{i},"{d}"\n' for i, d in enumerate(docs)))
    kwargs = dict(tokenizer=tokenizer_dir, text_field="body", num_samples=6, seq_len=24)
    from_jsonl = _setup(source=str(tmp_path / "c.jsonl"), **kwargs)
    from_csv = _setup(source=str(tmp_path / "c.csv"), **kwargs)
    assert from_jsonl.dataset.input_ids.shape == (6, 24)
    assert torch.equal(from_jsonl.dataset.input_ids, from_csv.dataset.input_ids)


def test_documents_are_joined_with_eos(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    doc = tok("river flowing", add_special_tokens=False)["input_ids"]
    stream = doc + [tok.eos_token_id] + doc + [tok.eos_token_id] + doc
    # A window as long as the whole stream can only start at 0.
    windows = text_windows(["river flowing", "", "river flowing", "river flowing"], tok, 2, len(stream), 0, "docs")
    assert windows.tolist() == [stream, stream]


def test_directory_of_text_files(tokenizer_dir, tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS[:1000])
    (tmp_path / "b.txt").write_text(CORPUS[1000:2000])
    data = _setup(source=str(tmp_path), tokenizer=tokenizer_dir, num_samples=3, seq_len=16)
    assert data.dataset.input_ids.shape == (3, 16)
    assert len(load_rows(str(tmp_path))) == 2  # one document per .txt file


def test_text_field_missing_names_columns(tokenizer_dir, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": CORPUS}) + "\n")
    with pytest.raises(CAQError, match="no 'text' column.*body"):
        _setup(source=str(tmp_path / "c.jsonl"), tokenizer=tokenizer_dir, format="text", num_samples=2, seq_len=8)


def test_chat_rendering_uses_template_and_masks_padding(tokenizer_dir, tmp_path):
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        {"prompt": "What is the river doing?"},
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = _setup(source=str(tmp_path / "chat.jsonl"), tokenizer=tokenizer_dir, num_samples=3, seq_len=64)
    tok = data.tokenizer
    texts = [tok.decode(ids[mask.bool()]) for ids, mask in zip(data.dataset.input_ids, data.dataset.attention_mask)]
    assert all(t.startswith("<|im_start|>user\n") for t in texts)
    assert any("Name a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>" in t for t in texts)
    # A prompt without a response ends on the generation prompt.
    assert any(t.endswith("What is the river doing?<|im_end|>\n<|im_start|>assistant\n") for t in texts)
    mask = data.dataset.attention_mask
    assert bool((mask[:, :-1] >= mask[:, 1:]).all()), "padding must be on the right"
    assert bool(mask.sum(1).lt(64).all())
    assert bool(data.dataset.input_ids[mask == 0].eq(tok.pad_token_id).all())


def test_chat_truncates_to_seq_len(tokenizer_dir, tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"instruction": CORPUS[:500], "output": "ok"}) + "\n")
    data = _setup(source=str(tmp_path / "chat.jsonl"), tokenizer=tokenizer_dir, num_samples=2, seq_len=12)
    assert data.dataset.input_ids.shape == (2, 12)
    assert bool(data.dataset.attention_mask.eq(1).all())


def test_chat_sampling_cycles_without_replacement(tokenizer_dir, tmp_path):
    records = [{"prompt": f"question number {i}"} for i in range(3)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = _setup(source=str(tmp_path / "chat.jsonl"), tokenizer=tokenizer_dir, num_samples=7, seq_len=32, seed=3)
    rows = [tuple(r.tolist()) for r in data.dataset.input_ids]
    # 7 samples of 3 records: each permutation of 3 is complete before the next begins.
    assert len(set(rows[:3])) == 3 and len(set(rows[3:6])) == 3 and set(rows[:3]) == set(rows[3:6])


def test_chat_without_template_fails(plain_tokenizer_dir, tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(CAQError, match="no chat_template"):
        _setup(source=str(tmp_path / "chat.jsonl"), tokenizer=plain_tokenizer_dir, num_samples=1, seq_len=8)


def test_empty_file_fails(tokenizer_dir, tmp_path):
    for name, content in [("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.jsonl", "")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(CAQError, match=f"calibration data '.*{name}' is empty"):
            _setup(source=str(tmp_path / name), tokenizer=tokenizer_dir, num_samples=1, seq_len=8)


def test_blank_records_fail_as_empty(tokenizer_dir, tmp_path):
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": " "}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(CAQError, match="is empty"):
        _setup(source=str(tmp_path / "blank.jsonl"), tokenizer=tokenizer_dir, num_samples=1, seq_len=8)


def test_hub_name_offline_fails_fast(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(CAQError, match=r"'wikitext:wikitext-2-raw-v1' is a hub dataset but the hub is offline.*\.txt"):
        _setup(source="wikitext:wikitext-2-raw-v1", tokenizer=tokenizer_dir, num_samples=1, seq_len=8)
    assert time.perf_counter() - start < 2.0


def test_missing_path_fails(tokenizer_dir, tmp_path):
    with pytest.raises(CAQError, match="does not exist"):
        _setup(source=str(tmp_path / "nope.txt"), tokenizer=tokenizer_dir, num_samples=1, seq_len=8)


def test_too_short_corpus_names_token_count(tokenizer_dir, tmp_path):
    (tmp_path / "short.txt").write_text("river flowing north")
    with pytest.raises(CAQError, match=r"has \d+ tokens, fewer than one window of seq_len=512"):
        _setup(source=str(tmp_path / "short.txt"), tokenizer=tokenizer_dir, num_samples=1, seq_len=512)


def test_seq_len_above_model_maximum_fails(tokenizer_dir, corpus_txt):
    data = CalibrationData(source=str(corpus_txt), tokenizer=tokenizer_dir, num_samples=2, seq_len=64)
    data.max_seq_len = 32
    with pytest.raises(CAQError, match="seq_len 64 exceeds the model's maximum 32"):
        data.setup("fit")


def test_seq_len_limit_set_after_setup_is_checked_by_the_dataloader(tokenizer_dir, corpus_txt):
    data = _setup(source=str(corpus_txt), tokenizer=tokenizer_dir, num_samples=2, seq_len=64)
    data.max_seq_len = 32
    with pytest.raises(CAQError, match="seq_len 64 exceeds the model's maximum 32"):
        data.train_dataloader()


@pytest.mark.parametrize("field, value", [("num_samples", 0), ("seq_len", -1), ("batch_size", 0)])
def test_non_positive_sizes_fail(field, value):
    with pytest.raises(CAQError, match=f"data.{field} must be positive"):
        CalibrationData(source="x.txt", tokenizer="t", **{field: value})


def test_missing_tokenizer_fails(corpus_txt):
    with pytest.raises(CAQError, match="no tokenizer"):
        _setup(source=str(corpus_txt), num_samples=1, seq_len=8)


def test_wikitext_valid_windows(tokenizer_dir):
    path = SHARED_DATA / "wikitext-2" / "valid.txt"
    if not path.exists():
        pytest.skip(f"shared WikiText-2 not found at {path}")
    data = _setup(source=str(path), tokenizer=tokenizer_dir, num_samples=4, seq_len=128, seed=0)
    assert data.dataset.input_ids.shape == (4, 128)
    # Windows of a 1 MB corpus drawn at random should not collide.
    assert len({tuple(r.tolist()) for r in data.dataset.input_ids}) == 4
    text = path.read_text(encoding="utf-8")
    assert all(data.tokenizer.decode(r) in text for r in data.dataset.input_ids)


def test_alpaca_seed_tasks_chat(tokenizer_dir):
    path = SHARED_DATA / "alpaca_seed_tasks.jsonl"
    if not path.exists():
        pytest.skip(f"shared alpaca seed tasks not found at {path}")
    data = _setup(source=str(path), tokenizer=tokenizer_dir, num_samples=8, seq_len=96, seed=0)
    texts = [data.tokenizer.decode(r[m.bool()]) for r, m in zip(data.dataset.input_ids, data.dataset.attention_mask)]
    assert all(t.startswith("<|im_start|>user\n") for t in texts)
    assert any("<|im_start|>assistant\n" in t for t in texts)
    assert len(set(texts)) == 8  # 8 distinct seed tasks out of 175, drawn without replacement


class _TinyLM(L.LightningModule):
    """A bigram LM: enough to check that Trainer.fit drives the data module and consumes its batches."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)
        self.shapes: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        self.shapes.append(tuple(batch["input_ids"].shape))
        logits = self.emb(batch["input_ids"][:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_consumes_batches(tokenizer_dir, corpus_txt, tmp_path):
    data = CalibrationData(source=str(corpus_txt), tokenizer=tokenizer_dir, num_samples=6, seq_len=16, batch_size=4)
    model = _TinyLM(vocab=len(load_tokenizer(tokenizer_dir)))
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    assert model.shapes == [(4, 16), (2, 16)]


def test_malformed_json_fails(tokenizer_dir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(CAQError, match="cannot parse calibration data '.*bad.jsonl' as json"):
        _setup(source=str(tmp_path / "bad.jsonl"), tokenizer=tokenizer_dir, num_samples=1, seq_len=2)


def test_unknown_file_suffix_fails(tokenizer_dir, tmp_path):
    (tmp_path / "notes.md").write_text(CORPUS)
    with pytest.raises(CAQError, match="unknown suffix: use one of .txt"):
        _setup(source=str(tmp_path / "notes.md"), tokenizer=tokenizer_dir, num_samples=1, seq_len=2)


def test_chat_format_on_plain_text_fails(tokenizer_dir, corpus_txt):
    with pytest.raises(CAQError, match="none of the chat fields.*--data.format=text"):
        _setup(source=str(corpus_txt), tokenizer=tokenizer_dir, format="chat", num_samples=1, seq_len=2)
