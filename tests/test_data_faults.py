"""data/ under faults: unreadable corpus files, a corpus that changed, damaged shard dirs and tokenizer files, and
ranks waiting for another process to prepare the shards."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data import prepare as prep
from data.loader import ShardError, TokenLoader
from data.prepare import BadInputFile, ensure_prepared, failure_note, prepare, wait_for_prepared
from data.tokenizer import load_tokenizer
from model.files import MARKER, OutputError

SETTINGS = dict(val_fraction=0.5, workers=1)  # what ensure_prepared / wait_for_prepared get in these tests


def jsonl(n: int, tag: str, width: int = 1) -> bytes:
    """n JSON lines of `width` random numbers each: text that compresses only about 2x."""
    rng = np.random.default_rng(n)
    return "".join(json.dumps({"text": f"{tag} document {i} " + " ".join(map(str, rng.random(width).round(6)))}) + "\n"
                   for i in range(n)).encode()


def corpus_with_good_file(root: Path) -> Path:
    root.mkdir()
    (root / "b_good.jsonl").write_bytes(jsonl(20, "good"))
    return root


def all_tokens(shard_dir: Path) -> list[int]:
    meta = json.loads((shard_dir / "meta.json").read_text())
    return [int(t) for split in ("train", "val") for s in meta["splits"][split]["shards"]
            for t in np.fromfile(shard_dir / s["file"], dtype=meta["dtype"])]


# ---------------------------------------------------------------- 3: unreadable input files

def test_truncated_zst_is_an_error_naming_the_file_and_offset(tmp_path):
    root = corpus_with_good_file(tmp_path / "c")
    whole = zstandard.ZstdCompressor().compress(jsonl(1000, "zst", width=40))  # several zstd blocks
    (root / "a_half.jsonl.zst").write_bytes(whole[:len(whole) // 2])  # half of it: some lines decode, then it stops
    for workers in (1, 2):  # the error also comes back whole from a worker process
        with pytest.raises(BadInputFile, match=rf"a_half\.jsonl\.zst: cut short: the file ends at byte "
                                               rf"{len(whole) // 2:,}, inside the zstd frame that starts at byte 0, "
                                               rf"after [1-9][\d,]* complete line.*fetch it again"):
            prepare(str(root), str(tmp_path / "out"), val_fraction=0.5, workers=workers)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, data, match", [
    ("random.jsonl.zst", np.random.default_rng(0).bytes(5000),
     r"random\.jsonl\.zst: not valid zstd data in bytes 0\.\.5,000 .*Unknown frame descriptor"),
    ("empty.jsonl.zst", b"", r"empty\.jsonl\.zst: the file is empty, not a zstd file"),
    ("junk_after.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl(3, "x")) + b"not zstd",
     r"junk_after\.jsonl\.zst: not valid zstd data in bytes \d+\.\.\d+ \(the frame that starts at byte \d+\).*"
     r"after 3 complete line"),
    ("cut_checksum.jsonl.zst", zstandard.ZstdCompressor(write_checksum=True).compress(jsonl(3, "x"))[:-2],
     r"cut_checksum\.jsonl\.zst: cut short"),  # every line decodes, but the frame never ends
], ids=["random", "empty", "junk_after_frame", "cut_checksum"])
def test_corrupt_zst_is_an_error_naming_the_file(tmp_path, name, data, match):
    root = corpus_with_good_file(tmp_path / "c")
    (root / name).write_bytes(data)
    with pytest.raises(BadInputFile, match=match):
        prepare(str(root), str(tmp_path / "out"), val_fraction=0.5, workers=1)


def test_multi_frame_zst_reads_every_frame(tmp_path):  # guards the frame-by-frame reader the checks above need
    data = jsonl(300, "frames", width=20)
    cuts = ((0, 1000), (1000, 7000), (7000, None))  # frame boundaries inside lines
    frames = b"".join(zstandard.ZstdCompressor().compress(data[a:b]) for a, b in cuts)
    (tmp_path / "multi.jsonl.zst").write_bytes(frames)
    meta = prepare(str(tmp_path / "multi.jsonl.zst"), str(tmp_path / "out"), val_fraction=0.5, workers=1)
    assert meta["stats"]["n_docs"] == 300


def test_truncated_last_line_of_jsonl_says_the_file_looks_cut_short(tmp_path):
    data = jsonl(10, "plain")
    (tmp_path / "cut.jsonl").write_bytes(data[:-15])
    with pytest.raises(BadInputFile, match=r"cut\.jsonl:10: not valid JSON .*no newline: the file looks cut short"):
        prepare(str(tmp_path / "cut.jsonl"), str(tmp_path / "out"), val_fraction=0.5, workers=1)


def test_skip_bad_files_leaves_them_out_and_records_them(tmp_path, capsys):
    root = corpus_with_good_file(tmp_path / "c")
    whole = zstandard.ZstdCompressor().compress(jsonl(1000, "zst", width=40))
    (root / "a_half.jsonl.zst").write_bytes(whole[:len(whole) // 2])
    (root / "c_bad.jsonl").write_bytes(b'{"text": "fine"}\n{oops}\n')
    good = prepare(str(root / "b_good.jsonl"), str(tmp_path / "good"), val_fraction=0.5, workers=1)
    with pytest.warns(UserWarning, match="skipped unreadable file") as warned:
        meta = prepare(str(root), str(tmp_path / "out"), val_fraction=0.5, workers=2, skip_bad_files=True)
    assert len(warned) == 2
    assert meta["stats"]["n_bad_files_skipped"] == 2 and meta["stats"]["n_files"] == 3
    skipped = {Path(s["file"]).name: s["error"] for s in meta["skipped_files"]}
    assert sorted(skipped) == ["a_half.jsonl.zst", "c_bad.jsonl"]
    assert "cut short" in skipped["a_half.jsonl.zst"] and "c_bad.jsonl:2: not valid JSON" in skipped["c_bad.jsonl"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["skipped_files"] == meta["skipped_files"]
    # none of a bad file's documents is kept, not even the lines before the damage
    assert all_tokens(tmp_path / "out") == all_tokens(tmp_path / "good") and meta["splits"] == good["splits"]
    assert "SKIPPED 2 of 3 input file(s) as unreadable" in capsys.readouterr().err


def test_cli_stops_on_a_bad_file_or_skips_it_with_the_flag(tmp_path, capsys):
    root = corpus_with_good_file(tmp_path / "c")
    (root / "x.jsonl.zst").write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(SystemExit, match=r"data\.prepare: .*x\.jsonl\.zst: not valid zstd data"):
        prep.main([str(root), "--out", str(tmp_path / "out"), "--val_fraction", "0.5", "--workers", "1"])
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="x.jsonl.zst"):
        meta = prep.main([str(root), "--out", str(tmp_path / "out"), "--val_fraction", "0.5", "--workers", "1",
                          "--skip_bad_files"])
    assert [Path(s["file"]).name for s in meta["skipped_files"]] == ["x.jsonl.zst"]
    out = capsys.readouterr()
    assert '"n_bad_files_skipped": 1' in out.out and "SKIPPED 1 of 2" in out.err


# ---------------------------------------------------------------- 4: a corpus that changed

def test_ensure_prepared_reprepares_when_the_corpus_changes(tmp_path, capsys):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.txt").write_text(f"document {i}")
    shards = str(tmp_path / "shards")
    meta = ensure_prepared(str(root), shards, **SETTINGS)
    assert [Path(f["file"]).name for f in meta["inputs"]] == ["0.txt", "1.txt", "2.txt", "3.txt"]
    assert all(f["file"] == os.path.abspath(root / Path(f["file"]).name) for f in meta["inputs"])
    assert ensure_prepared(str(root), shards, **SETTINGS) == meta  # unchanged: reused
    capsys.readouterr()

    def changed(edit, message: str) -> dict:
        edit()
        new = ensure_prepared(str(root), shards, **SETTINGS)
        err = capsys.readouterr().err
        assert message in err and "preparing it again" in err, err
        return new

    meta = changed(lambda: (root / "4.txt").write_text("document 4"), "1 file(s) added (4.txt)")
    assert meta["stats"]["n_docs"] == 5
    meta = changed(lambda: (root / "0.txt").unlink(), "1 file(s) removed (0.txt)")
    assert meta["stats"]["n_docs"] == 4
    meta = changed(lambda: (root / "1.txt").write_text("document one, longer"), "1 file(s) resized (1.txt)")
    st = (root / "2.txt").stat()
    changed(lambda: os.utime(root / "2.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9)),
            "1 file(s) modified (new mtime) (2.txt)")
    assert ensure_prepared(str(root), shards, **SETTINGS)["inputs"] == json.loads(
        (tmp_path / "shards" / "meta.json").read_text())["inputs"] and capsys.readouterr().err == ""


def test_corpus_gone_keeps_the_shards_with_a_note(tmp_path, capsys):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(2):
        (root / f"{i}.txt").write_text(f"document {i}")
    meta = ensure_prepared(str(root), str(tmp_path / "shards"), **SETTINGS)
    for p in root.iterdir():
        p.unlink()
    root.rmdir()
    capsys.readouterr()
    assert ensure_prepared(str(root), str(tmp_path / "shards"), **SETTINGS) == meta
    assert "is not there now" in capsys.readouterr().err


def test_shards_made_with_skipped_files_are_remade_without_skip_bad_files(tmp_path, capsys):
    root = corpus_with_good_file(tmp_path / "c")
    (root / "bad.jsonl").write_bytes(b"{oops\n")
    with pytest.warns(UserWarning):
        meta = ensure_prepared(str(root), str(tmp_path / "shards"), skip_bad_files=True, **SETTINGS)
    capsys.readouterr()
    assert ensure_prepared(str(root), str(tmp_path / "shards"), skip_bad_files=True, **SETTINGS) == meta
    assert "1 unreadable input file(s) were left out" in capsys.readouterr().err
    with pytest.raises(BadInputFile, match=r"bad\.jsonl:1"):
        ensure_prepared(str(root), str(tmp_path / "shards"), **SETTINGS)
    assert "skip_bad_files is off now" in capsys.readouterr().err


def test_older_shard_dir_without_marker_or_inputs_is_replaced(tmp_path, capsys):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(2):
        (root / f"{i}.txt").write_text(f"document {i}")
    shards = tmp_path / "shards"
    ensure_prepared(str(root), str(shards), **SETTINGS)
    meta = json.loads((shards / "meta.json").read_text())
    del meta["inputs"], meta["skipped_files"], meta["source"]["skip_bad_files"]  # as an older version wrote it
    (shards / "meta.json").write_text(json.dumps(meta))
    (shards / MARKER).unlink()
    capsys.readouterr()
    again = ensure_prepared(str(root), str(shards), **SETTINGS)
    assert "did not record its input files" in capsys.readouterr().err and len(again["inputs"]) == 2
    assert json.loads((shards / MARKER).read_text())["kind"] == "token-shards"
    # a meta.json beside files that are not shards is someone else's directory: refused, left as it was
    (shards / MARKER).unlink()
    (shards / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and holds files nanoforge did not write"):
        prepare(str(root), str(shards), val_fraction=0.5, workers=1)
    assert (shards / "notes.txt").read_text() == "mine" and not (shards / MARKER).exists()


# ---------------------------------------------------------------- 9: damaged shard dirs and tokenizer files

@pytest.fixture
def shards(tmp_path) -> Path:
    (tmp_path / "c.jsonl").write_bytes(jsonl(40, "doc", width=30))
    prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "shards"), val_fraction=0.25, workers=1)
    return tmp_path / "shards"


def edit_meta(shard_dir: Path, **changes) -> None:
    meta = json.loads((shard_dir / "meta.json").read_text())
    meta.update(changes)
    (shard_dir / "meta.json").write_text(json.dumps(meta))


def test_invalid_meta_json_names_the_file(shards, tmp_path, capsys):
    (shards / "meta.json").write_text('{"version": 1, "splits": ')
    with pytest.raises(ShardError, match=r"shards/meta\.json: not valid JSON .*line 1, column 26.*prepare the shards "
                                         r"again"):
        TokenLoader(str(shards), "train", 2, 8)
    meta = ensure_prepared(str(tmp_path / "c.jsonl"), str(shards), val_fraction=0.25, workers=1)  # ours: remade
    assert "meta.json: not valid JSON" in capsys.readouterr().err and meta["stats"]["n_docs"] == 40
    for changes, match in [({"dtype": "float32"}, r"dtype is 'float32'"), ({"vocab_size": "big"}, "vocab_size"),
                           ({"vocab_size": 200_019}, r"dtype uint16 cannot hold the ids of a vocabulary of 200019"),
                           ({"version": 0}, "format version 0"), ({"splits": {"train": [1]}}, "'splits'")]:
        prepare(str(tmp_path / "c.jsonl"), str(shards), val_fraction=0.25, workers=1)
        edit_meta(shards, **changes)
        with pytest.raises(ShardError, match=r"meta\.json: " + match):
            TokenLoader(str(shards), "train", 2, 8)


def test_edited_dtype_is_caught_before_the_embedding(shards):
    meta = json.loads((shards / "meta.json").read_text())
    for info in meta["splits"].values():  # uint16 -> uint32, and token counts that match the file sizes again
        for s in info["shards"]:
            s["n_tokens"] = (shards / s["file"]).stat().st_size // 4
            (shards / s["file"]).write_bytes((shards / s["file"]).read_bytes()[:s["n_tokens"] * 4])
    edit_meta(shards, dtype="uint32", splits=meta["splits"])
    loader = TokenLoader(str(shards), "train", 4, 8)
    with pytest.raises(ShardError, match=r"train_000000\.bin: token [\d,]+ has id \d+, past the vocabulary of 50257 "
                                         r"ids .*prepare the shards again"):
        loader.next_batch()


def test_out_of_range_ids_name_the_shard(shards):
    bin_file = shards / "val_000000.bin"
    ids = np.fromfile(bin_file, dtype="<u2")
    ids[37] = 60000  # a uint16 the GPT-2 vocabulary (50257 ids) does not have
    ids.tofile(bin_file)
    loader = TokenLoader(str(shards), "val", 2, 8, shuffle=False)
    with pytest.raises(ShardError, match=r"val_000000\.bin: token 37 has id 60000, past the vocabulary"):
        for _ in range(loader.n_windows):
            loader.next_batch()
    assert loader.position == 4  # batches 0 and 1 (tokens 0..32) were fine; the one holding token 37 was refused


def test_bin_size_not_a_whole_number_of_tokens(shards):
    with open(shards / "train_000000.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ShardError, match=r"train_000000\.bin: is [\d,]+ bytes, not a whole number of uint16 tokens"):
        TokenLoader(str(shards), "train", 2, 8)


@pytest.mark.parametrize("bad_file", ["tokenizer.json", "tokenizer_config.json"])
def test_invalid_tokenizer_json_names_the_file(tmp_path, bad_file):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tmp_path / "tok" / bad_file).write_text('{"model": {"type": "BPE", ')
    with pytest.raises(ValueError, match=rf"tok/{bad_file}: not valid JSON \(.* at line 1, column 27\); the file is "
                                         rf"damaged or cut short: download or copy"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / bad_file).write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=rf"{bad_file}: not UTF-8 text \(bad byte at offset 7\)"):
        load_tokenizer(tmp_path / "tok")


# ---------------------------------------------------------------- 11: waiting for rank 0's preparation

def _later(seconds: float, fn, *args, **kwargs) -> threading.Thread:
    def run():
        time.sleep(seconds)
        try:
            fn(*args, **kwargs)
        except Exception:
            pass  # the waiting side is what the test checks

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_wait_for_prepared_outlasts_a_short_timeout(tmp_path, capsys):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.txt").write_text(f"document {i}")
    shards = str(tmp_path / "shards")
    # another process (rank 0) prepares the shards after 0.5 s: far past the 0.2 s timeout a collective would have
    t = _later(0.5, ensure_prepared, str(root), shards, **SETTINGS)
    with pytest.raises(TimeoutError, match="no complete token shards"):
        wait_for_prepared(str(root), shards, val_fraction=0.5, poll_s=0.02, timeout_s=0.2)
    meta = wait_for_prepared(str(root), shards, val_fraction=0.5, poll_s=0.02, report_s=0.1)
    t.join()
    assert meta == json.loads((tmp_path / "shards" / "meta.json").read_text()) and meta["stats"]["n_docs"] == 4
    assert "waiting for the token shards in" in capsys.readouterr().err
    # stale shards (a file was added) are not taken: the wait lasts until rank 0 has made them again
    (root / "4.txt").write_text("document 4")
    t = _later(0.3, ensure_prepared, str(root), shards, **SETTINGS)
    assert wait_for_prepared(str(root), shards, val_fraction=0.5, poll_s=0.02)["stats"]["n_docs"] == 5
    t.join()


def test_wait_for_prepared_fails_when_rank0_fails(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "bad.jsonl").write_text("{oops\n")
    shards = str(tmp_path / "shards")
    failure_note(shards).parent.mkdir(parents=True, exist_ok=True)
    failure_note(shards).write_text("an earlier run's failure\n")  # not this run's: ignored
    t = _later(0.3, ensure_prepared, str(root), shards, **SETTINGS)
    with pytest.raises(RuntimeError, match=r"preparing the token shards in .*shards failed: .*BadInputFile: "
                                           r".*bad\.jsonl:1: not valid JSON"):
        wait_for_prepared(str(root), shards, val_fraction=0.5, poll_s=0.02, timeout_s=30)
    t.join()
    (root / "bad.jsonl").write_text('{"text": "fixed"}\n{"text": "again"}\n')
    ensure_prepared(str(root), shards, **SETTINGS)
    assert not failure_note(shards).exists()  # a successful preparation clears the note


def test_temp_dir_of_a_killed_preparation_is_removed_next_time(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".shards.tmp-{socket.gethostname()}-{int(dead.stdout)}"  # left by a killed preparation
    stale.mkdir()
    (stale / "train_000000.bin").write_bytes(b"\0" * 10)
    prepare(str(tmp_path / "*.txt"), str(tmp_path / "shards"), val_fraction=0.5, workers=1)
    assert not stale.exists() and (tmp_path / "shards" / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
