"""Calibration data as a LightningDataModule: seeded token windows of plain text, or rendered chat samples.

Every rank tokenizes the same source with the same seed, so all ranks hold the same tensors and Lightning's
DistributedSampler splits them without overlap.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import datasets
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from caq_lightning.env import fail_fast_hub, is_offline
from caq_lightning.errors import CAQError
from caq_lightning.loading import BUILTIN_PREFIX, load_tokenizer

LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
CHAT_FIELDS = ("messages", "instruction", "prompt")
FORMATS = ("auto", "text", "chat")
OFFLINE_HINT = (
    "connect once so datasets caches it, or pass a local text file, e.g. "
    "--data.source=$CAQ_DATA_DIR/wikitext-2/valid.txt (docs/data.md)"
)


class TokenDataset(Dataset):
    """Precomputed rows: ``input_ids`` and ``attention_mask``, both (N, T) long tensors.

    Each sample also carries its row ``index`` (a long scalar), the key that joins it to cached teacher/base targets.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "index": torch.tensor(i)}


def _looks_like_path(source: str) -> bool:
    # "org/name" and "name:config" are hub datasets; anything with a data suffix or a path prefix is a file.
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in LOADERS or source.count("/") > 1


def _is_blank(path: Path) -> bool:
    size = path.stat().st_size
    return size == 0 or (size < 1 << 16 and not path.read_bytes().strip())


def _data_files(path: Path, source: str) -> tuple[str, list[str]]:
    """The datasets loader name and the files of a local file or directory source."""
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS)
    if not files:
        raise CAQError(f"calibration directory '{source}' has no {'/'.join(LOADERS)} files: point it at text data")
    loaders = {LOADERS.get(p.suffix.lower()) for p in files}
    if None in loaders:
        raise CAQError(f"calibration file '{source}' has an unknown suffix: use one of {', '.join(LOADERS)}")
    if len(loaders) > 1:
        raise CAQError(f"calibration directory '{source}' mixes {sorted(loaders)} files: keep one kind per directory")
    return loaders.pop(), [str(p) for p in files]


def _load_local(path: Path, source: str) -> datasets.Dataset:
    loader, files = _data_files(path, source)
    if all(_is_blank(Path(f)) for f in files):
        raise CAQError(f"calibration data '{source}' is empty: pass a file with text in it")
    # A .txt file is one document, so windows run across its lines as written.
    kwargs = {"sample_by": "document"} if loader == "text" else {}
    try:
        with _no_datasets_bars():  # a local file is read in a moment: its "Generating train split" bar is noise
            return datasets.load_dataset(loader, data_files=files, split="train", **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as err:
        cause = err.__cause__ or err
        raise CAQError(f"cannot parse calibration data '{source}' as {loader}: {str(cause).splitlines()[0]}") from None


@contextmanager
def _no_datasets_bars():
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _load_hub(source: str, split: str) -> datasets.Dataset:
    name, _, config = source.partition(":")
    try:
        with fail_fast_hub():
            return datasets.load_dataset(name, config or None, split=split)
    except ConnectionError:
        if is_offline() or datasets.config.HF_HUB_OFFLINE:
            offline = f"calibration source '{source}' is a hub dataset but the hub is offline"
            raise CAQError(f"{offline}: {OFFLINE_HINT}") from None
        raise CAQError(f"cannot reach the hub for calibration source '{source}': {OFFLINE_HINT}") from None
    except (OSError, ValueError) as err:
        raise CAQError(f"cannot load hub dataset '{source}': {str(err).splitlines()[0]}") from None


def load_rows(source: str, split: str = "train") -> datasets.Dataset:
    """Load the records of a hub dataset (``name`` or ``name:config``), a local file or directory or ``builtin:<pair>``.

    ``split`` only applies to hub datasets; local files are a single split.
    """
    if source.startswith(BUILTIN_PREFIX):
        from caq_lightning import zoo

        path = Path(zoo.calibration_corpus(source[len(BUILTIN_PREFIX) :]))
    else:
        path = Path(source).expanduser()
    if path.exists():
        rows = _load_local(path, source)
    elif source.startswith(BUILTIN_PREFIX) or _looks_like_path(source):
        raise CAQError(f"calibration path '{source}' does not exist: pass an existing file or directory")
    else:
        rows = _load_hub(source, split)
    if len(rows) == 0:
        raise CAQError(f"calibration data '{source}' is empty: pass a source with records in it")
    return rows


def resolve_format(format: str, columns: list[str]) -> str:
    """``auto`` means chat when the records carry instruction/messages/prompt fields, else text."""
    if format not in FORMATS:
        raise CAQError(f"unknown calibration format '{format}': use one of {', '.join(FORMATS)}")
    if format != "auto":
        return format
    return "chat" if any(f in columns for f in CHAT_FIELDS) else "text"


def text_windows(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int, seed: int, source: str
) -> torch.Tensor:
    """Join the tokenized documents with eos and draw ``num_samples`` seeded windows: (num_samples, seq_len) long."""
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    if not docs:
        raise CAQError(f"calibration data '{source}' is empty: every record is blank")
    if tokenizer.eos_token_id is None:
        raise CAQError("the tokenizer has no eos token to join documents: set eos_token in its tokenizer_config.json")
    eos = torch.tensor([tokenizer.eos_token_id])
    pieces = []
    for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        pieces += [torch.tensor(ids, dtype=torch.long), eos]
    stream = torch.cat(pieces[:-1])
    if stream.numel() < seq_len:
        raise CAQError(
            f"calibration data '{source}' has {stream.numel()} tokens, fewer than one window of seq_len={seq_len}: "
            "pass more text or lower --data.seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=generator)
    return stream[starts[:, None] + torch.arange(seq_len)]


def _chat(user: str | None, input: str | None = None, output: str | None = None) -> list[dict[str, str]]:
    if not isinstance(user, str) or not user.strip():
        return []
    content = f"{user}\n\n{input}" if isinstance(input, str) and input.strip() else user
    messages = [{"role": "user", "content": content}]
    if isinstance(output, str) and output.strip():
        messages.append({"role": "assistant", "content": output})
    return messages


def to_conversations(record: dict) -> list[list[dict[str, str]]]:
    """Turn one record into chat message lists (alpaca seed tasks give one conversation per instance).

    Accepts {"messages": [...]}, {"instruction", "input"?, "output"?}, {"instruction", "instances": [{input, output}]}
    and {"prompt", "response"?}; blank records give [].
    """
    if record.get("messages"):
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"] if m.get("content")]
        return [messages] if messages else []
    if record.get("instruction") is not None:
        instances = record.get("instances") or [record]
        chats = [_chat(record["instruction"], i.get("input"), i.get("output")) for i in instances]
    else:
        chats = [_chat(record.get("prompt"), None, record.get("response"))]
    return [c for c in chats if c]


def chat_samples(
    conversations: list[list[dict[str, str]]],
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    seq_len: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render seeded conversations with the chat template, truncate and right-pad: two (num_samples, seq_len) longs.

    Draws without replacement and cycles through fresh permutations when there are fewer records than samples.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise CAQError(
            "the tokenizer has no chat_template, so chat calibration data cannot be rendered: "
            "use --data.format=text or the tokenizer of a chat model"
        )
    generator = torch.Generator().manual_seed(seed)
    rounds = -(-num_samples // len(conversations))
    order = torch.cat([torch.randperm(len(conversations), generator=generator) for _ in range(rounds)])[:num_samples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((num_samples, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((num_samples, seq_len), dtype=torch.long)
    for row, i in enumerate(order.tolist()):
        messages = conversations[i]
        # Prompt-only records end on the user turn; the generation prompt makes them look like real model inputs.
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=messages[-1]["role"] != "assistant"
        )
        # The template already writes bos and the turn markers itself.
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:seq_len]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


class CalibrationData(LightningDataModule):
    """Calibration batches {"input_ids": (B, T) long, "attention_mask": (B, T) long, "index": (B,) long} for CAQ.

    Args:
        source: Hub dataset ``name`` or ``name:config`` (e.g. ``wikitext:wikitext-2-raw-v1``), a local
            .txt/.json/.jsonl/.csv file or a directory of them, or ``builtin:<pair>`` for the text corpus of an
            embedded model pair.
        tokenizer: Tokenizer path, hub id or ``builtin:<pair>``; the CLI fills it from ``model.teacher`` when not given.
        format: ``text`` (random token windows), ``chat`` (records rendered with the chat template) or ``auto``
            (chat when the records have instruction/messages/prompt fields, else text).
        split: Split of a hub dataset; local files are a single split.
        text_field: Column holding the text in ``text`` format (the column of a .txt file is ``text``).
        num_samples: Number of calibration sequences.
        seq_len: Tokens per sequence (windows in text format; truncation and padding length in chat format).
        batch_size: Sequences per batch per device.
        seed: Seed for drawing windows or records; the same seed gives the same data on every rank and run.
        trust_remote_code: Allow custom tokenizer code from the tokenizer's repository.
        num_workers: DataLoader worker processes (0 loads in the main process; the data are precomputed tensors).
    """

    def __init__(
        self,
        source: str = "wikitext:wikitext-2-raw-v1",
        tokenizer: str | None = None,
        format: str = "auto",
        split: str = "train",
        text_field: str = "text",
        num_samples: int = 128,
        seq_len: int = 2048,
        batch_size: int = 1,
        seed: int = 0,
        trust_remote_code: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise CAQError(f"data.{name} must be positive, got {value}")
        if format not in FORMATS:
            raise CAQError(f"unknown calibration format '{format}': use one of {', '.join(FORMATS)}")
        self.save_hyperparameters()
        self.source = source
        self.tokenizer_name = tokenizer
        self.format = format
        self.split = split
        self.text_field = text_field
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.num_workers = num_workers
        # The model's position limit; whoever knows it (the CLI or the LightningModule) sets it before training.
        self.max_seq_len: int | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.dataset: TokenDataset | None = None

    def _check_seq_len(self) -> None:
        if self.max_seq_len is not None and self.seq_len > self.max_seq_len:
            raise CAQError(
                f"seq_len {self.seq_len} exceeds the model's maximum {self.max_seq_len}: "
                f"pass --data.seq_len={self.max_seq_len} or less"
            )

    def prepare_data(self) -> None:
        # Runs on one process per node: download a hub dataset once before every rank reads it from the cache.
        load_rows(self.source, self.split)

    def setup(self, stage: str | None = None) -> None:
        self._check_seq_len()
        if self.dataset is not None:
            return
        if self.tokenizer_name is None:
            raise CAQError("no tokenizer for the calibration data: pass --data.tokenizer or --model.teacher")
        self.tokenizer = load_tokenizer(self.tokenizer_name, trust_remote_code=self.trust_remote_code)
        rows = load_rows(self.source, self.split)
        if resolve_format(self.format, rows.column_names) == "text":
            if self.text_field not in rows.column_names:
                raise CAQError(
                    f"calibration data '{self.source}' has no '{self.text_field}' column (it has "
                    f"{', '.join(rows.column_names)}): pass --data.text_field or --data.format=chat"
                )
            input_ids = text_windows(
                rows[self.text_field], self.tokenizer, self.num_samples, self.seq_len, self.seed, self.source
            )
            attention_mask = torch.ones_like(input_ids)
        else:
            if not any(f in rows.column_names for f in CHAT_FIELDS):
                raise CAQError(
                    f"calibration data '{self.source}' has none of the chat fields {', '.join(CHAT_FIELDS)} "
                    f"(it has {', '.join(rows.column_names)}): use --data.format=text"
                )
            conversations = [c for record in rows for c in to_conversations(record)]
            if not conversations:
                raise CAQError(f"calibration data '{self.source}' is empty: every record is blank")
            input_ids, attention_mask = chat_samples(
                conversations, self.tokenizer, self.num_samples, self.seq_len, self.seed
            )
        self.dataset = TokenDataset(input_ids, attention_mask)

    def train_dataloader(self) -> DataLoader:
        self._check_seq_len()  # the model may set max_seq_len after this module's setup ran
        if self.dataset is None:
            self.setup("fit")
        # Windows are already drawn at random; under DDP Lightning swaps in a DistributedSampler.
        # ResumableLoader: a run resumed mid-epoch skips the batches it already trained on.
        return ResumableLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, trainer=self.trainer
        )


# ---- position in the data (checkpointed mid-epoch) --------------------------------------------------------------


def batches_trained(trainer) -> int:
    """Batches of the current epoch already trained on (what a resumed epoch must skip)."""
    if trainer is None:
        return 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return 0 if done >= trainer.num_training_batches else done


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can checkpoint mid-epoch: on resume its first epoch skips the batches already trained on.

    Lightning restarts a plain DataLoader at batch 0 of the epoch; the batches here are deterministic for a seed, so
    skipping reproduces the uninterrupted run exactly.
    """

    def __init__(self, *args, trainer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainer = trainer
        self.skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_trained": batches_trained(self.trainer)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state.get("batches_trained", 0)

    def __iter__(self):
        iterator = super().__iter__()
        skip, self.skip = self.skip, 0
        if skip >= len(self):
            raise CAQError(
                f"the checkpoint stopped {skip} batches into an epoch, but the calibration data now has {len(self)} "
                "batches per epoch: resume with the same --data settings (source, num_samples, batch_size, seed)"
            )
        for _ in range(skip):
            next(iterator)
        return iterator
