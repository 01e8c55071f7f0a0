"""Language models: the Transformer, the text datasets (on files written here), the next-token
task's bpc against a hand computation, the tied embedding computing with α, exact resume of an
LM run, and bad input through the console script."""

from __future__ import annotations

import hashlib
import json
import math
import random
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_config, run_topkast, split_run_matches
from test_interrupt import read_jsonl
from topkast_cli.commands.train import train
from topkast_cli.data.corpora import ByteCorpus, Enwik8, WikiText103
from topkast_cli.data.text import EvalWindows, TextFile, TrainWindows
from topkast_cli.errors import UserError
from topkast_cli.models.transformer import Transformer
from topkast_cli.run import check_run
from topkast_cli.sparsity import TopKAST
from topkast_cli.sparsity.selection import select_sparse_layers
from topkast_cli.tasks import IGNORE_INDEX, NextToken

WORDS = "the king shall speak to his lords and ladies of war peace night day".split()


def write_text(path: Path, chars: int = 6000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS) + rng.choice(["", "", ",", ".\n"]))
    path.write_text(" ".join(words)[:chars], encoding="utf-8")
    return path


def lm_overrides(path: Path) -> list[str]:
    """A run of seconds: a tiny Transformer on a small text file."""
    return [
        "model=transformer", "model.layers=2", "model.width=32", "model.heads=2",
        "dataset=textfile", f"dataset.path={path}", "dataset.context=32", "dataset.batch_size=8",
        "trainer.max_steps=16", "trainer.eval_every=8", "trainer.log_every=4", "trainer.checkpoint_every=8",
        "trainer.progress=false", "trainer.tensorboard=false", "sparsity.refresh_interval=3",
    ]


# --------------------------------------------------------------------------- model
def test_transformer_shapes_and_causality():
    torch.manual_seed(0)
    model = Transformer(vocab_size=11, context=16, layers=2, heads=2, width=16).eval()
    x = torch.randint(0, 11, (3, 16))
    out = model(x)
    assert out.shape == (3, 16, 11)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 11  # change the future: the past's logits stay
    assert torch.allclose(model(y)[:, :10], out[:, :10], atol=1e-6)
    assert not torch.allclose(model(y)[:, 10:], out[:, 10:])
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tied_by_default_untied_has_its_own_head():
    tied = Transformer(vocab_size=11, context=8, layers=1, heads=2, width=16)
    untied = Transformer(vocab_size=11, context=8, layers=1, heads=2, width=16, tie_embeddings=False)
    assert tied.head is None and untied.head.weight.shape == (11, 16)
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 11 * 16


def test_sparse_by_default_attention_and_mlp_weights_only():
    model = Transformer(vocab_size=11, context=8, layers=2, heads=2, width=16)
    names = [n for n, _ in select_sparse_layers(model)]
    assert names == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "fc", "out")]
    # The embedding is the input layer: dense_first keeps it (not the first projection) dense.
    assert "embed" not in [n for n, _ in select_sparse_layers(model, include_embeddings=True)]
    assert [n for n, _ in select_sparse_layers(model, dense_first=False, include_embeddings=True)][0] == "embed"


def test_tied_output_and_lookup_both_compute_with_alpha():
    torch.manual_seed(0)
    model = Transformer(vocab_size=23, context=8, layers=1, heads=2, width=16)
    method = TopKAST(forward=0.8, backward=0.6, dense_first=False, include_embeddings=True).attach(model, total_steps=10)
    layer = next(l for l in method.layers if l.name == "embed.weight")
    theta, A, B = layer.theta, layer.forward, layer.backward
    alpha = torch.where(A, theta, 0).detach()
    x = torch.randint(0, 23, (2, 8))
    final = {}
    model.norm.register_forward_hook(lambda m, i, o: final.setdefault("h", o))
    out = model(x)
    # The lookup reads α ...
    assert torch.equal(model.embed(x), F.embedding(x, alpha))
    # ... and so does the tied output layer.
    assert torch.allclose(out, F.linear(final["h"], alpha), atol=1e-6)
    # Zero-out check: θ outside A may be anything, the network does not see it.
    with torch.no_grad():
        theta[~A] = 100.0
    assert torch.allclose(model(x), out, atol=1e-6)
    with torch.no_grad():
        theta[A] += 0.1
    assert not torch.allclose(model(x), out, atol=1e-3)
    # Gradients from both uses reach exactly B: none outside, some on B \ A.
    model.zero_grad()
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    assert theta.grad[~B].abs().sum() == 0
    assert theta.grad[B & ~A].abs().sum() > 0


# ------------------------------------------------------------------------- task
def test_bpc_and_ppl_against_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    target = torch.tensor([[0, 2, IGNORE_INDEX]])
    # -ln p(target) per scored position, written out: softmax of (2, 0, 0) at 0, of (0, 1, 0) at 2.
    nats = [-math.log(math.exp(2) / (math.exp(2) + 2)), -math.log(1 / (2 + math.e))]
    task = NextToken()
    m = task.finalize(task.batch_sums(logits, target))
    assert m["loss"] == pytest.approx(sum(nats) / 2)
    assert m["bpc"] == pytest.approx(sum(nats) / 2 / math.log(2))
    assert m["ppl"] == pytest.approx(math.exp(sum(nats) / 2))
    assert float(task.loss(logits, target)) == pytest.approx(sum(nats) / 2)
    assert task.metric == "bpc" and task.higher_is_better is False


# ----------------------------------------------------------------------- datasets
def test_textfile_char_vocab_split_and_windows(tmp_path):
    path = write_text(tmp_path / "t.txt", 3000)
    text = path.read_text()
    data = TextFile(str(path), vocab="char", val_fraction=0.1, cache=str(tmp_path / "cache"), context=20).setup()
    assert data.vocab == sorted(set(text)) and data.model_kwargs == {"vocab_size": len(set(text)), "context": 20}
    assert len(data.tokens["train"]) == 2700 and len(data.tokens["val"]) == 300
    decoded = "".join(data.vocab[i] for i in np.asarray(data.tokens["val"]))
    assert decoded == text[2700:]
    x, y = data.train_set[3]
    assert x.dtype == torch.long and x.shape == (20,) and torch.equal(x[1:], y[:-1])
    again = TextFile(str(path), vocab="char", cache=str(tmp_path / "cache"), context=20).setup()
    assert isinstance(again.tokens["train"], np.memmap)  # from the cache, memory-mapped


def test_textfile_byte_vocab_maps_the_file(tmp_path):
    path = tmp_path / "u.txt"
    path.write_text("héllo wörld " * 50, encoding="utf-8")
    data = TextFile(str(path), vocab="byte", context=8).setup()
    assert data.vocab_size == 256 and isinstance(data.tokens["train"], np.memmap)
    assert bytes(np.asarray(data.tokens["train"])) + bytes(np.asarray(data.tokens["val"])) == path.read_bytes()


def test_training_windows_are_seeded_per_epoch_and_cover_the_text(tmp_path):
    data = TextFile(str(write_text(tmp_path / "t.txt", 4000)), cache=None, context=16, batch_size=4).setup()
    first = [x for x, _ in data.train_loader(0, seed=1)]
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in data.train_loader(0, seed=1)]))
    assert not all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in data.train_loader(1, seed=1)]))
    later = [x for x, _ in data.train_loader(0, seed=1, start_batch=3)]
    assert all(torch.equal(a, b) for a, b in zip(first[3:], later)), "a resumed epoch sees the same windows"


@pytest.mark.parametrize("stride", [10, 4])
def test_evaluation_scores_every_token_once(stride):
    tokens = np.arange(57, dtype=np.int64)  # token value = its position
    windows = EvalWindows(tokens, context=10, stride=stride)
    scored = []
    for j in range(len(windows)):
        x, y = windows[j]
        assert torch.equal(x[1:], torch.as_tensor(tokens[windows.starts[j] + 1 : windows.starts[j] + 10]))
        scored += y[y != IGNORE_INDEX].tolist()
    assert sorted(scored) == list(range(1, 57))
    if stride < 10:  # every scored token after the first window has context - stride of history
        assert all((y == IGNORE_INDEX).sum() >= 10 - stride for _, y in (windows[j] for j in range(1, len(windows))))


def test_train_windows_stay_inside_the_split():
    tokens = np.arange(50)
    windows = TrainWindows(tokens, context=16)
    for i in range(len(windows)):
        for _ in range(20):
            x, y = windows[i]
            assert x[0] >= i * 16 and y[-1] <= 49


class Tiny(ByteCorpus):
    name, size, cuts = "tiny", 1000, (900, 950)
    urls = ()
    member_digest = ("md5", "")


def test_byte_corpus_extracts_checks_and_splits(tmp_path):
    payload = bytes(random.Random(0).randrange(256) for _ in range(1000))
    with zipfile.ZipFile(tmp_path / "tiny.zip", "w") as z:
        z.writestr("tiny", payload)
    Tiny.member_digest = ("md5", hashlib.md5(payload).hexdigest())
    data = Tiny(str(tmp_path), context=16).setup()
    assert [len(data.tokens[s]) for s in ("train", "val", "test")] == [900, 50, 50]
    assert bytes(np.asarray(data.tokens["test"])) == payload[950:]
    assert not (tmp_path / "tiny.zip").exists()


def test_byte_corpus_rejects_a_wrong_digest_and_missing_data(tmp_path):
    with zipfile.ZipFile(tmp_path / "tiny.zip", "w") as z:
        z.writestr("tiny", b"x" * 1000)
    Tiny.member_digest = ("md5", "0" * 32)
    with pytest.raises(UserError, match="published md5"):
        Tiny(str(tmp_path), context=16).setup()
    assert not (tmp_path / "tiny").exists()
    with pytest.raises(UserError, match=r"enwik8 does not exist; set dataset.download=true"):
        Enwik8(str(tmp_path / "none"), context=16).check()


def test_wikitext_word_vocabulary_comes_from_train(tmp_path):
    folder = tmp_path / "wikitext-103-raw"
    folder.mkdir()
    (folder / "wiki.train.raw").write_text(" the cat sat \n the cat ran \n the dog \n" * 3)
    (folder / "wiki.valid.raw").write_text(" the bird sat \n" * 5)
    (folder / "wiki.test.raw").write_text(" a cat \n" * 5)
    data = WikiText103(str(tmp_path), vocab="word", min_count=3, context=4).setup()
    assert data.vocab[0] == "<unk>" and {"the", "cat", "sat", "ran", "dog", "<eos>"} <= set(data.vocab)
    val = [data.vocab[i] for i in np.asarray(data.tokens["val"])[:4]]
    assert val == ["the", "<unk>", "sat", "<eos>"] and data.task == "next_word"


@pytest.mark.parametrize("name", ["enwik8", "text8", "textfile", "wikitext103"])
def test_text_configs_instantiate_without_touching_the_disk(name, tmp_path):
    from topkast_cli.config import instantiate

    absent = tmp_path / "absent"
    where = f"dataset.path={absent / 'x.txt'}" if name == "textfile" else f"dataset.root={absent}"
    data = instantiate(make_config(["model=transformer", f"dataset={name}", where]).dataset, "dataset")
    assert data.task in ("next_token", "next_word") and data.train_set is None and not absent.exists()
    with pytest.raises(UserError, match="does not exist"):
        data.check()


# --------------------------------------------------------------------- through the trainer
def test_resume_of_an_lm_run_is_exact(tmp_path):
    # Masks lock at step 12 of either run (a fraction would resolve against the shorter first
    # segment); likewise a constant lr (cosine_lm's warm-up and decay follow max_steps).
    common = [*lm_overrides(write_text(tmp_path / "t.txt")), "trainer.deterministic=true", "sparsity.exploration_steps=12",
              "scheduler=constant"]
    a, _, metrics = split_run_matches(tmp_path, common, 8)
    assert {"bpc", "ppl", "loss"} <= set(metrics[-1])
    assert a["data"]["vocab"] == "char" and a["data"]["vocab_size"] == len(set((tmp_path / "t.txt").read_text()))
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["metric"] == "bpc" and summary["best"]["bpc"] <= summary["final"]["bpc"]


def test_eval_reports_bpc_of_an_lm_checkpoint(tmp_path):
    from topkast_cli.evaluate import evaluate_checkpoint

    train(make_config(lm_overrides(write_text(tmp_path / "t.txt"))), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    report = evaluate_checkpoint(make_config([f"ckpt={ckpt}"], config_name="eval"))
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    best = min(logged, key=lambda r: r["bpc"])
    assert report["metric"] == "bpc" and report["metrics"]["bpc"] == pytest.approx(best["bpc"], rel=1e-5)
    assert report["flops"]["ratio"] < 0.5  # the sparse projections and MLPs


# ------------------------------------------------------------------------ bad input
# Through the console script: exit 2, one line, no run directory.
BAD = {
    "empty-file": ("empty.txt", [], ["empty.txt is empty"]),
    "not-utf8": ("latin1.txt", [], ["latin1.txt is not UTF-8", "offset 9"]),
    "vocabulary-changed-on-resume": ("other.txt", ["resume={earlier}/checkpoints/last.ckpt"], ["another vocabulary", "char symbols"]),
}
# The same pre-flight check, in-process (each console start costs seconds of imports).
BAD_IN_PROCESS = {
    "missing-file": ("nope.txt", [], ["dataset.path=", "nope.txt does not exist"]),
    "context-longer-than-split": ("good.txt", ["dataset.context=1000"], ["dataset.context=1000", "val split (600 tokens)"]),
    "classifier-on-text": ("good.txt", ["model=mlp"], ["model (MLP) does not fit dataset TextFile", "vocab_size, context"]),
    "stride-above-context": ("good.txt", ["dataset.eval_stride=64"], ["dataset.eval_stride=64", "dataset.context=32"]),
}


def _bad_files(tmp_path: Path) -> None:
    write_text(tmp_path / "good.txt", 6000)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("hello caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "other.txt").write_text("ABCDEFGHIJ0123456789 " * 200)


def _bad_args(tmp_path: Path, name: str, extra: list[str]) -> list[str]:
    base = lm_overrides(tmp_path / name)
    if "model=mlp" in extra:
        base = [o for o in base if not o.startswith("model")]
    return [*base, *(a.format(earlier=tmp_path / "earlier") for a in extra)]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    _bad_files(tmp_path)
    train(make_config(lm_overrides(tmp_path / "good.txt")), tmp_path / "earlier")

    def one(case):
        name, extra, _ = BAD[case]
        args = [*_bad_args(tmp_path, name, extra), f"hydra.run.dir={tmp_path / case}"]
        return run_topkast(["train", *args], cwd=tmp_path, timeout=300)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(BAD, pool.map(one, BAD)))
    for case, proc in results.items():
        assert proc.returncode == 2, (case, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (case, proc.stderr)
        for text in BAD[case][2]:
            assert text in lines[0], (case, text, lines[0])
        assert not (tmp_path / case).exists(), f"{case}: a run directory was made"


@pytest.mark.parametrize("case", list(BAD_IN_PROCESS))
def test_bad_input_fails_the_pre_flight_check(tmp_path, case):
    _bad_files(tmp_path)
    name, extra, expected = BAD_IN_PROCESS[case]
    with pytest.raises(UserError) as e:
        check_run(make_config(_bad_args(tmp_path, name, extra)))
    for text in expected:
        assert text in str(e.value), (text, str(e.value))
    assert "\n" not in str(e.value)


SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (../shared/data from the repository)")
def test_tinyshakespeare_char_vocabulary(tmp_path):
    data = TextFile(str(SHAKESPEARE), vocab="char", cache=str(tmp_path), context=128)
    data.check()
    assert data.vocab_size == 65 and len(data.tokens["train"]) + len(data.tokens["val"]) == len(SHAKESPEARE.read_text())
