"""The standard language-modelling corpora: enwik8, text8 (bytes, 90M/5M/5M) and WikiText-103
(raw; byte, character or word vocabulary).

Nothing is downloaded unless `dataset.download=true`; a download is checked against a
published digest before it is used (a mismatch deletes it and stops with exit 2).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import UserError, check_int
from .text import TextData, cached_tokens, char_codes, decode_utf8, smallest_int

log = logging.getLogger("topkast")


def digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fetch(urls: tuple[str, ...], dest: Path) -> None:
    """Download the first of `urls` that answers to `dest` (through a temporary file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as f:
                shutil.copyfileobj(response, f, 1 << 22)
            tmp.replace(dest)
            return
        except OSError as e:
            tmp.unlink(missing_ok=True)
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
    raise UserError(f"could not download {dest.name} ({'; '.join(errors)}); put the file at {dest} yourself")


def check_digest(path: Path, algorithm: str, expected: str) -> None:
    if digest(path, algorithm) != expected:
        path.unlink()
        raise UserError(f"{path} does not have the published {algorithm} {expected} (a broken download?); "
                        "it was deleted: download again")


class ByteCorpus(TextData):
    """A 100M-byte corpus distributed as one file in a zip: train is the first 90M bytes, val
    the next 5M, test the last 5M (the standard split). Bytes are the tokens (bpc = bits per
    byte), and the extracted file is memory-mapped."""

    name: str
    urls: tuple[str, ...]
    # Digest of the extracted file (not of the zip): (algorithm, hex).
    member_digest: tuple[str, str]
    size = 100_000_000
    cuts = (90_000_000, 95_000_000)

    def __init__(self, root: str, download: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(root, str) or not root:
            raise UserError(f"dataset.root={root!r} must be a directory path")
        if not isinstance(download, bool):
            raise UserError(f"dataset.download={download!r} must be true or false")
        self.root, self.download = root, download

    @property
    def file(self) -> Path:
        return Path(self.root).expanduser() / self.name

    def check(self) -> None:
        f = self.file
        if f.is_file():
            if f.stat().st_size != self.size:
                raise UserError(f"{f} has {f.stat().st_size} bytes, not {self.size}; delete it and set dataset.download=true")
        elif not self.download and not f.with_suffix(".zip").is_file():
            raise UserError(f"{f} does not exist; set dataset.download=true to fetch {self.name} "
                            f"(or put {self.name} or {self.name}.zip in dataset.root={self.root})")

    def _extract(self) -> None:
        archive = self.file.with_suffix(".zip")
        if not archive.is_file():
            fetch(self.urls, archive)
        tmp = self.file.with_name(self.name + ".part")
        try:
            with zipfile.ZipFile(archive) as z, z.open(self.name) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"{archive} is not the {self.name} archive ({e}); delete it and download again") from None
        check_digest(tmp, *self.member_digest)
        tmp.replace(self.file)
        archive.unlink()

    def load(self):
        self.check()
        if not self.file.is_file():
            self._extract()
        data = np.memmap(self.file, dtype=np.uint8, mode="r")
        a, b = self.cuts
        return {"train": data[:a], "val": data[a:b], "test": data[b:]}, None


class Enwik8(ByteCorpus):
    """The first 100M bytes of an English Wikipedia XML dump (Hutter Prize)."""

    name = "enwik8"
    urls = ("https://mattmahoney.net/dc/enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip")
    # md5 of the extracted enwik8, as published on mattmahoney.net/dc/textdata.html.
    member_digest = ("md5", "a1fa5ffddb56f4953e226637dabbb36a")


class Text8(ByteCorpus):
    """enwik8's successor cleaned to lower-case letters and spaces (27 symbols), 100M bytes."""

    name = "text8"
    urls = ("https://mattmahoney.net/dc/text8.zip", "http://mattmahoney.net/dc/text8.zip")
    # sha256 of the extracted text8 (the publisher lists no digest; this value is the one
    # several independent projects pin).
    member_digest = ("sha256", "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7")


class WikiText103(TextData):
    """WikiText-103, raw version (untokenised Wikipedia articles; train 540M bytes, valid and
    test 1.1M each), as wiki.{train,valid,test}.raw under root/wikitext-103-raw.

    `vocab`: `byte` (bpc per byte), `char` (the characters of train; others map to a symbol for
    unknowns), or `word` (whitespace-separated words of train seen at least `min_count` times,
    plus <unk> and an <eos> token at each line end, as the word-level benchmark counts; the
    metric is then perplexity per word). Char and word token arrays are cached under root.
    """

    task = "next_token"
    urls = ("https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
            "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip")
    # sha256 of wikitext-103-raw-v1.zip (191,984,949 bytes), as several projects pin it.
    archive_digest = ("sha256", "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794")
    files = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}

    def __init__(self, root: str, vocab: str = "byte", min_count: int = 3, download: bool = False, **kwargs):
        super().__init__(**kwargs)
        if vocab not in ("byte", "char", "word"):
            raise UserError(f"dataset.vocab={vocab!r} is not known; allowed: byte, char, word")
        if not isinstance(root, str) or not root:
            raise UserError(f"dataset.root={root!r} must be a directory path")
        if not isinstance(download, bool):
            raise UserError(f"dataset.download={download!r} must be true or false")
        self.root, self.vocab_kind, self.download = root, vocab, download
        self.min_count = check_int("dataset.min_count", min_count)
        if vocab == "word":
            self.task = "next_word"

    @property
    def folder(self) -> Path:
        return Path(self.root).expanduser() / "wikitext-103-raw"

    def check(self) -> None:
        missing = [n for n in self.files.values() if not (self.folder / n).is_file()]
        if missing and not self.download:
            raise UserError(f"{self.folder / missing[0]} does not exist; set dataset.download=true to fetch "
                            f"WikiText-103 (raw) into dataset.root={self.root}")

    def _download(self) -> None:
        archive = Path(self.root).expanduser() / "wikitext-103-raw-v1.zip"
        if not archive.is_file():
            fetch(self.urls, archive)
        check_digest(archive, *self.archive_digest)
        with zipfile.ZipFile(archive) as z:
            z.extractall(Path(self.root).expanduser())
        archive.unlink()

    def load(self):
        self.check()
        if any(not (self.folder / n).is_file() for n in self.files.values()):
            self._download()
        paths = {split: self.folder / name for split, name in self.files.items()}
        if self.vocab_kind == "byte":
            return {split: np.memmap(p, dtype=np.uint8, mode="r") for split, p in paths.items()}, None
        build = self._words if self.vocab_kind == "word" else self._chars
        key = [str(self.folder.resolve()), self.vocab_kind, self.min_count, [os.path.getsize(p) for p in paths.values()]]
        return cached_tokens(str(self.folder), key, lambda: build(paths))

    @staticmethod
    def _chars(paths):
        codes = {split: char_codes(decode_utf8(p.read_bytes(), str(p))) for split, p in paths.items()}
        symbols = np.unique(codes["train"])
        vocab = [chr(c) for c in symbols] + ["<unk>"]
        dtype = smallest_int(len(vocab))
        out = {}
        for split, c in codes.items():
            index = np.searchsorted(symbols, c).clip(max=len(symbols) - 1)
            out[split] = np.where(symbols[index] == c, index, len(symbols)).astype(dtype)
        return out, vocab

    def _words(self, paths):
        def words(p: Path):
            for line in decode_utf8(p.read_bytes(), str(p)).splitlines():
                yield from line.split()
                yield "<eos>"

        counts = Counter(words(paths["train"]))
        vocab = ["<unk>"] + sorted(w for w, n in counts.items() if n >= self.min_count and w != "<unk>")
        ids = {w: i for i, w in enumerate(vocab)}
        dtype = smallest_int(len(vocab))
        return {split: np.fromiter((ids.get(w, 0) for w in words(p)), dtype=dtype) for split, p in paths.items()}, vocab
