"""Text for next-token prediction: a token array per split (memory-mapped), cut into windows.

Training samples: window i of an epoch starts at i * context + r, r drawn in [0, context) from
the generator `SeededSamples` seeds by (seed, epoch, i), so each epoch cuts the text
differently and a resumed run sees exactly the windows it would have seen. The order of the
windows is `EpochSampler`'s.

Evaluation covers the whole split: windows of `context` tokens every `eval_stride` tokens
(default: `context`, i.e. non-overlapping), the last one ending at the split's end. Each window
scores only the targets no earlier window scored, so every token but the first is scored once;
with a stride below the context each scored token has at least context - stride tokens of
history (a slower, tighter estimate).

`TextFile` reads any UTF-8 file, split by fraction, with a byte or character vocabulary;
`corpora.py` holds enwik8, text8 and WikiText-103.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError, check_int
from ..tasks import IGNORE_INDEX
from .base import DataModule

VOCABS = ("byte", "char")


def _window(tokens: np.ndarray, start: int, length: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(tokens[start : start + length]).astype(np.int64))


class TrainWindows(Dataset):
    """Windows of `context` inputs and their next tokens, at a random offset each (drawn from
    torch's generator: wrap in `SeededSamples`)."""

    def __init__(self, tokens: np.ndarray, context: int):
        self.tokens, self.context = tokens, context
        # One window fewer than fits, so that every window can shift by up to a whole context.
        self.count = max(1, (len(tokens) - 1) // context - 1)
        self.shift = min(context, len(tokens) - 1 - self.count * context + 1)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        start = i * self.context + int(torch.randint(self.shift, ()))
        chunk = _window(self.tokens, start, self.context + 1)
        return chunk[:-1], chunk[1:]


class EvalWindows(Dataset):
    """Every target of a split scored once, in windows of `context` every `stride` tokens;
    targets an earlier window scored are IGNORE_INDEX."""

    def __init__(self, tokens: np.ndarray, context: int, stride: int):
        self.tokens, self.context = tokens, context
        last = len(tokens) - 1 - context  # start of the window that ends at the split's end
        self.starts = list(range(0, last + 1, stride))
        if self.starts[-1] != last:
            self.starts.append(last)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, j: int):
        start = self.starts[j]
        chunk = _window(self.tokens, start, self.context + 1)
        target = chunk[1:].clone()
        scored_before = self.starts[j - 1] + self.context if j else 0  # last target position scored so far
        target[: max(0, scored_before - start)] = IGNORE_INDEX
        return chunk[:-1], target


class TextData(DataModule):
    """Token splits (`train`, `val`, maybe `test`) of a text, and the windows over them.
    Subclasses set `vocab_kind` and implement `load()`; `check()` is theirs too."""

    task = "next_token"
    random_train_transform = True  # the random offset of each training window
    vocab_kind = "byte"  # byte | char | word: what one token (and so one `bpc` bit count) is

    def __init__(self, context: int = 128, eval_stride: int | None = None, **loader):
        super().__init__(**loader)
        self.context = check_int("dataset.context", context)
        self.eval_stride = self.context if eval_stride is None else check_int("dataset.eval_stride", eval_stride)
        if self.eval_stride > self.context:
            raise UserError(f"dataset.eval_stride={eval_stride} is above dataset.context={context}; "
                            "it must be between 1 and the context (null: the context)")
        self.tokens: dict[str, np.ndarray] | None = None
        self.vocab: list[str] | None = None  # symbols of a char/word vocabulary (bytes: None)

    # ------------------------------------------------------------ what the model needs
    @property
    def vocab_size(self) -> int | None:
        if self.vocab_kind == "byte":
            return 256
        return None if self.vocab is None else len(self.vocab)

    @property
    def model_kwargs(self) -> dict | None:
        if self.vocab_size is None:
            return None
        return {"vocab_size": self.vocab_size, "context": self.context}

    def describe(self) -> str:
        return f"windows of {self.context} tokens, a {self.vocab_kind} vocabulary of {self.vocab_size}"

    def example_batch(self, n: int = 2, device: torch.device | str = "meta") -> tuple[torch.Tensor, torch.Tensor]:
        shape = (n, self.context)
        return torch.zeros(shape, dtype=torch.long, device=device), torch.zeros(shape, dtype=torch.long, device=device)

    # ------------------------------------------------------------------- the vocabulary
    def state_dict(self) -> dict:
        if self.vocab_size is None:
            return {}
        digest = hashlib.sha1(json.dumps(self.vocab).encode()).hexdigest() if self.vocab is not None else None
        return {"vocab": self.vocab_kind, "vocab_size": self.vocab_size, "vocab_sha1": digest}

    def check_state(self, state: dict | None, where: str) -> None:
        mine = self.state_dict()
        if not state or not mine or state == mine:
            return
        raise UserError(
            f"{where} was trained on another vocabulary ({state.get('vocab_size')} {state.get('vocab')} symbols; "
            f"this data gives {mine['vocab_size']} {mine['vocab']} symbols{'' if state.get('vocab_size') != mine['vocab_size'] else ', other ones'}); "
            "use the same data and dataset.vocab (or start a new run)"
        )

    # ------------------------------------------------------------------------ loading
    def load(self) -> tuple[dict[str, np.ndarray], list[str] | None]:
        """The token array of each split (`train`, `val`, optionally `test`) and the vocabulary."""
        raise NotImplementedError

    def prepare(self) -> "TextData":
        """Load the tokens (memory-mapped) and check every split holds a window; idempotent."""
        if self.tokens is None:
            tokens, vocab = self.load()
            for split, array in tokens.items():
                if len(array) < self.context + 1:
                    raise UserError(
                        f"dataset.context={self.context} is longer than the {split} split ({len(array)} tokens); "
                        "lower dataset.context or use more text"
                    )
            self.tokens, self.vocab = tokens, vocab
        return self

    def setup(self) -> "TextData":
        if self.train_set is None:
            self.prepare()
            self.train_set = TrainWindows(self.tokens["train"], self.context)
            self.val_set = EvalWindows(self.tokens["val"], self.context, self.eval_stride)
        return self

    def eval_loader(self, split: str = "val"):
        if split not in self.tokens:
            raise UserError(f"split={split!r} is not known; allowed: {', '.join(self.tokens)}")
        dataset = self.val_set if split == "val" else EvalWindows(self.tokens[split], self.context, self.eval_stride)
        return self._eval_loader(dataset)


# ----------------------------------------------------------------------- tokenising
def decode_utf8(raw: bytes, where: str) -> str:
    if not raw:
        raise UserError(f"{where} is empty; give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text (invalid byte at offset {e.start}); give a UTF-8 file") from None


def char_codes(text: str) -> np.ndarray:
    """Unicode code points of `text` (fast: through UTF-32)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def smallest_int(n: int):
    return np.uint8 if n <= 2**8 else np.uint16 if n <= 2**16 else np.int32


def cached_tokens(cache: str | None, key: list, build) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """`build()` -> (splits, vocab), stored under `cache` in a folder named by `key` and
    memory-mapped from there afterwards (`cache` None: built in memory each time)."""
    if cache is None:
        return build()
    folder = Path(cache).expanduser() / f"tokens-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]}"
    index = folder / "index.json"
    if not index.is_file():
        splits, vocab = build()
        tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            for name, array in splits.items():
                np.save(tmp / f"{name}.npy", array)
            (tmp / "index.json").write_text(json.dumps({"key": key, "splits": list(splits), "vocab": vocab}))
            tmp.rename(folder)
        except OSError:  # another process won the race, or the cache is read-only: it is an optimisation only
            shutil.rmtree(tmp, ignore_errors=True)
            if not index.is_file():
                return splits, vocab
    meta = json.loads(index.read_text())
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["splits"]}, meta["vocab"]


class TextFile(TextData):
    """Any UTF-8 text file, split by fraction: the last `val_fraction` of it is `val`.

    `vocab`: `byte` (256 symbols; the file itself is memory-mapped) or `char` (every character
    that occurs in the file, so the val split has no unknown symbol; the token array is cached
    under `cache`). bpc is then bits per byte or per character.
    """

    def __init__(self, path: str, vocab: str = "char", val_fraction: float = 0.1, cache: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(path, str) or not path:
            raise UserError(f"dataset.path={path!r} must be the path of a UTF-8 text file")
        if vocab not in VOCABS:
            raise UserError(f"dataset.vocab={vocab!r} is not known; allowed: {', '.join(VOCABS)}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise UserError(f"dataset.val_fraction={val_fraction!r} must be a number in (0, 1)")
        if cache is not None and not isinstance(cache, str):
            raise UserError(f"dataset.cache={cache!r} must be a directory path or null")
        self.path, self.vocab_kind, self.val_fraction, self.cache = path, vocab, float(val_fraction), cache

    def check(self) -> None:
        """The file exists, is UTF-8 and every split holds a window (reads the file once; the
        character vocabulary is built here, since the model's size depends on it)."""
        self.prepare()

    def _file(self) -> Path:
        p = Path(self.path).expanduser()
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "does not exist"
            raise UserError(f"dataset.path={self.path} {what}; give a UTF-8 text file")
        return p

    def _split(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        cut = len(tokens) - max(1, round(len(tokens) * self.val_fraction))
        return {"train": tokens[:cut], "val": tokens[cut:]}

    def load(self):
        p = self._file()
        where = f"dataset.path={self.path}"
        if self.vocab_kind == "byte":
            decode_utf8(p.read_bytes(), where)
            return self._split(np.memmap(p, dtype=np.uint8, mode="r")), None

        def build():
            codes = char_codes(decode_utf8(p.read_bytes(), where))
            symbols, tokens = np.unique(codes, return_inverse=True)
            return self._split(tokens.astype(smallest_int(len(symbols)))), [chr(c) for c in symbols]

        st = p.stat()
        return cached_tokens(self.cache, [str(p.resolve()), st.st_size, st.st_mtime_ns, "char", self.val_fraction], build)
