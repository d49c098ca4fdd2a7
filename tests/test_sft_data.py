"""data/sft.py: every row format normalised to messages, file:row errors and skip_bad_rows counts, assistant-only
labels that decode to exactly the replies and their end tokens, the shard layout, the cache key, atomic preparation,
damaged shards, missing special tokens, and the held-out split."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from data import sft
from data.prepare import failure_note
from data.loader import ShardError
from data.sft import SFTDataError, SFTShards, detect_format, prepare_sft, sft_shard_dir, to_messages, wait_for_sft
from data.tokenizer import load_tokenizer
from model.files import OutputError

ARGS = dict(tokenizer="gpt2", template="chatml", format="auto", val_files="", val_fraction=0.25, seed=0,
            system_prompt=None, train_on="assistant", special_tokens_in_content=False, add_missing_tokens=True,
            skip_bad_rows=False)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}."} for i in range(start, n)]


def prep(tmp_path: Path, corpus, name: str = "shards", **overrides) -> tuple[Path, dict]:
    out = tmp_path / name
    meta = prepare_sft(str(corpus), out, **(ARGS | overrides))
    return out, meta


def learned_text(tok, shards: SFTShards, i: int) -> str:
    _, labels = shards.sample(i)
    return tok.decode(labels[labels != -100].tolist())


# ---------------------------------------------------------------------------------- formats


USER, REPLY = "Name a colour.", "Blue."
FORMAT_ROWS = {
    "messages": {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}]},
    "sharegpt": {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": REPLY}]},
    "prompt_completion": {"prompt": USER, "completion": REPLY},
    "alpaca": {"instruction": USER, "input": "", "output": REPLY},
    "qa": {"question": USER, "answer": REPLY},
}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_each_format_is_detected_and_normalised(fmt):
    row = FORMAT_ROWS[fmt]
    assert detect_format(row) == fmt
    assert to_messages(row, fmt) == [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}]


def test_format_details():
    assert to_messages({"instruction": "Translate.", "input": "chat", "output": "cat"}, "alpaca")[0] == \
        {"role": "user", "content": "Translate.\n\nchat"}
    turns = [{"from": "system", "value": "S"}, {"from": "user", "value": "U"}, {"from": "model", "value": "A"}]
    assert [m["role"] for m in to_messages({"conversations": turns}, "sharegpt")] == ["system", "user", "assistant"]
    conversational = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                      "completion": [{"role": "assistant", "content": "A", "thinking": "T"}]}
    assert to_messages(conversational, "prompt_completion") == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A", "thinking": "T"}]
    assert detect_format({"text": "x"}) is None


def test_system_prompt_is_prepended_only_when_there_is_none():
    assert to_messages(FORMAT_ROWS["qa"], "qa", "Be brief.")[0] == {"role": "system", "content": "Be brief."}
    own = {"messages": [{"role": "system", "content": "Mine."}, *FORMAT_ROWS["messages"]["messages"]]}
    assert to_messages(own, "messages", "Be brief.") == own["messages"]


def test_every_format_prepares_from_its_own_file_with_the_format_recorded(tmp_path):
    files = [write_jsonl(tmp_path / f"{fmt}.jsonl", [row, row]) for fmt, row in FORMAT_ROWS.items()]
    _, meta = prep(tmp_path, ",".join(map(str, files)))
    assert meta["formats"] == {str(f.resolve()): f.stem for f in files}
    assert sum(meta["splits"][s]["n_samples"] for s in ("train", "val")) == 10


def test_system_prompt_reaches_the_tokens(tmp_path):
    out, _ = prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", qa_rows(4)), system_prompt="Be brief.")
    tok = load_tokenizer(out / "tokenizer")
    x, _ = SFTShards(out, "train").sample(0)
    assert tok.decode(x.tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


# ---------------------------------------------------------------------------------- bad rows


def _messages(*roles_contents) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in roles_contents]}


BAD_ROWS = [
    ("not_an_object", ["just a string"], "JSON object"),
    ("unknown_role", _messages(("user", "hi"), ("robot", "beep")), "messages[1].role is 'robot', an unknown role"),
    ("wrong_type", _messages(("user", "hi"), ("assistant", 42)), "messages[1].content' must be a string, not int"),
    ("missing_field", {"messages": [{"role": "user"}]}, "no field 'messages[0].content'"),
]


@pytest.mark.parametrize("name,row,problem", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_a_bad_row_names_file_row_and_field_and_how_to_skip(tmp_path, name, row, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [FORMAT_ROWS["messages"], row])
    with pytest.raises(SFTDataError) as e:
        prep(tmp_path, path, format="messages")
    assert f"{path}:2:" in str(e.value) and problem in str(e.value)
    assert "--data.skip_bad_rows=true" in str(e.value)
    assert not (tmp_path / "shards").exists()


def test_invalid_json_line_is_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(FORMAT_ROWS["qa"]) + "\n\n{not json\n")
    with pytest.raises(SFTDataError, match=f"{path}:3: not valid JSON"):
        prep(tmp_path, path)


def test_alternation_the_template_refuses_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [FORMAT_ROWS["messages"],
                                              _messages(("user", "a"), ("user", "b"), ("assistant", "c"))])
    with pytest.raises(SFTDataError) as e:
        prep(tmp_path, path, template="gemma")  # gemma: user and model must alternate
    assert f"{path}:2:" in str(e.value) and "alternate" in str(e.value) and "skip_bad_rows" in str(e.value)


def test_skip_bad_rows_skips_and_counts_and_no_assistant_is_always_skipped(tmp_path):
    rows = ["a string", _messages(("user", "hi"), ("assistant", 3)),
            _messages(("user", "only a question")), _messages(("user", "a"), ("user", "b"), ("assistant", "c"))]
    path = write_jsonl(tmp_path / "m.jsonl", [FORMAT_ROWS["messages"]] * 6 + rows)
    out, meta = prep(tmp_path, path, template="gemma", skip_bad_rows=True)
    assert meta["skipped"] == {"bad_row": 2, "no_assistant": 1, "template": 1}
    assert meta["splits"]["train"]["n_samples"] + meta["splits"]["val"]["n_samples"] == 6
    assert len(meta["skipped_examples"]) == 3 and meta["skipped_examples"][0].startswith(f"{path}:7:")
    # a row with no assistant turn is never an error, even without skip_bad_rows
    path = write_jsonl(tmp_path / "n.jsonl", [FORMAT_ROWS["messages"]] * 4 + [_messages(("user", "no reply"))])
    _, meta = prep(tmp_path, path, name="n")
    assert meta["skipped"] == {"no_assistant": 1}


def test_a_row_with_nothing_to_learn_is_counted(tmp_path, monkeypatch):
    real = sft.encode_chat

    def nothing_learned_for_x(tok, messages, *a, **k):  # as a template whose reply tokens all fall in the prompt
        enc = real(tok, messages, *a, **k)
        if messages[-1]["content"] == "x":
            enc.assistant_mask = [False] * len(enc.ids)
        return enc

    monkeypatch.setattr(sft, "encode_chat", nothing_learned_for_x)
    rows = [FORMAT_ROWS["messages"]] * 4 + [_messages(("user", "hi"), ("assistant", "x"))]
    _, meta = prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows))
    assert meta["skipped"] == {"no_learnable": 1}
    assert sum(meta["splits"][s]["n_samples"] for s in ("train", "val")) == 4


def test_empty_file_and_no_files_are_errors_naming_them(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    good = write_jsonl(tmp_path / "good.jsonl", qa_rows(4))
    with pytest.raises(SFTDataError, match=f"{empty}: the file holds no rows"):
        prep(tmp_path, f"{good},{empty}")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(SFTDataError, match="empty.json: the file holds no rows"):
        prep(tmp_path, tmp_path / "empty.json")
    with pytest.raises(SFTDataError, match="no such file or directory"):
        prep(tmp_path, tmp_path / "nothing*.jsonl")
    (tmp_path / "obj.json").write_text('{"question": "q", "answer": "a"}')
    with pytest.raises(SFTDataError, match="must hold a list of rows"):
        prep(tmp_path, tmp_path / "obj.json")


def test_json_list_file(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(qa_rows(5)))
    _, meta = prep(tmp_path, tmp_path / "d.json")
    assert meta["formats"] == {str((tmp_path / "d.json").resolve()): "qa"}
    assert sum(meta["splits"][s]["n_samples"] for s in ("train", "val")) == 5


def test_parquet_is_read_and_one_without_the_columns_names_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    out, meta = prep(tmp_path, tmp_path / "d.parquet")
    assert meta["formats"] == {str((tmp_path / "d.parquet").resolve()): "messages"}
    tok = load_tokenizer(out / "tokenizer")
    both = [SFTShards(out, s) for s in ("train", "val")]
    learned = sorted(learned_text(tok, s, i) for s in both for i in range(s.n_samples))
    assert learned == sorted(f"A{i}<|im_end|>" for i in range(6))

    pq.write_table(pa.Table.from_pylist([{"text": "x", "id": 1}]), tmp_path / "bad.parquet")
    with pytest.raises(SFTDataError) as e:
        prep(tmp_path, tmp_path / "bad.parquet", name="bad")
    assert "its columns are text, id" in str(e.value) and "qa: question, answer" in str(e.value)
    with pytest.raises(SFTDataError, match="format 'alpaca' expects instruction, output"):
        prep(tmp_path, tmp_path / "bad.parquet", name="bad", format="alpaca")


# ---------------------------------------------------------------------------------- labels and layout


CONVERSATIONS = [
    _messages(("system", "You count."), ("user", "One?"), ("assistant", "1"), ("user", "Two?"), ("assistant", "1 2")),
    _messages(("user", "Say hi"), ("assistant", "Hi there!")),
    _messages(("user", "And a longer reply, please."), ("assistant", "Here it is:\n- first line\n- second line")),
]


def _replies(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]


def test_gpt2_chatml_labels_are_exactly_the_replies_and_their_end_tokens(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS)
    val = write_jsonl(tmp_path / "v.jsonl", CONVERSATIONS[1:2])
    out, meta = prep(tmp_path, path, val_files=str(val))
    assert meta["added_tokens"] == [{"content": "<|im_start|>", "id": 50257}, {"content": "<|im_end|>", "id": 50258}]
    assert meta["base_vocab_size"] == 50257 and meta["vocab_size"] == 50259 and meta["dtype"] == "uint16"
    assert meta["template"] == "chatml"
    tok = load_tokenizer(out / "tokenizer")  # the saved tokenizer: added tokens and the template with it
    assert tok.vocab_size == 50259 and tok.special_tokens["<|im_end|>"] == 50258
    assert "<|im_start|>" in (tok.chat_template_jinja or "")
    train = SFTShards(out, "train")
    assert train.n_samples == 3
    for i, row in enumerate(CONVERSATIONS):
        x, y = train.sample(i)
        assert x.dtype == y.dtype == np.int64 and len(x) == len(y) == train.lengths[i]
        runs = np.split(y, np.flatnonzero(np.diff((y != -100).astype(int))) + 1)
        learned = [tok.decode(r.tolist()) for r in runs if r[0] != -100]
        assert learned == [r + "<|im_end|>" for r in _replies(row)]
    assert train.n_learnable == sum(int((train.sample(i)[1] != -100).sum()) for i in range(3))
    assert learned_text(tok, SFTShards(out, "val"), 0) == "Hi there!<|im_end|>"


def test_qwen2_own_template_labels(tmp_path, shared_assets):
    qwen = shared_assets / "tokenizers" / "qwen2"
    path = write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS)
    out, meta = prep(tmp_path, path, tokenizer=str(qwen), template="auto", val_files=str(path))
    assert meta["template"] == "qwen3" and meta["added_tokens"] == [] and meta["dtype"] == "uint32"
    assert meta["vocab_size"] == meta["base_vocab_size"] == 151669
    tok = load_tokenizer(out / "tokenizer")
    train = SFTShards(out, "train")
    for i, row in enumerate(CONVERSATIONS):
        replies = _replies(row)
        # Qwen3's template writes an empty think block into the last turn (after the last user message)
        expected = "".join(r + "<|im_end|>" for r in replies[:-1]) + "<think>\n\n</think>\n\n" + replies[-1] + \
            "<|im_end|>"
        assert learned_text(tok, train, i) == expected


def test_shard_files_dtype_offsets_and_lengths(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS * 2)
    out, meta = prep(tmp_path, path, val_fraction=0.4)
    tok = load_tokenizer(out / "tokenizer")
    seen = 0
    for split in ("train", "val"):
        info, shards = meta["splits"][split], SFTShards(out, split)
        offsets = np.fromfile(out / f"{split}.idx", "<i8")
        tokens = np.fromfile(out / f"{split}.bin", "<u2")
        mask = np.fromfile(out / f"{split}.mask", np.uint8)
        assert len(offsets) == info["n_samples"] + 1 and offsets[0] == 0 and offsets[-1] == info["n_tokens"]
        assert len(tokens) == len(mask) == info["n_tokens"] and set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(shards.lengths, np.diff(offsets) - 1) and shards.lengths.dtype == np.int64
        assert info["n_learnable"] == shards.n_learnable == sum(int(mask[a + 1:b].sum())
                                                                 for a, b in zip(offsets[:-1], offsets[1:]))
        for i in range(shards.n_samples):
            x, _ = shards.sample(i)
            text = tok.decode(x.tolist()) + tok.decode(tokens[offsets[i + 1] - 1:offsets[i + 1]].tolist())
            assert tok.encode(text, allow_special=True) == tokens[offsets[i]:offsets[i + 1]].tolist()
        seen += shards.n_samples
        assert shards.fingerprint == f"{meta['key']}:{split}"
    assert seen == 6


def test_train_on_all_and_last(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS[:1] * 2)
    out, _ = prep(tmp_path, path, name="last", train_on="last")
    tok = load_tokenizer(out / "tokenizer")
    assert learned_text(tok, SFTShards(out, "train"), 0) == "1 2<|im_end|>"
    out, _ = prep(tmp_path, path, name="all", train_on="all")
    x, y = SFTShards(out, "train").sample(0)
    assert np.array_equal(y, np.append(x[1:], y[-1])) and (y != -100).all()


def test_special_token_text_in_content_is_plain_text_unless_asked(tmp_path):
    row = _messages(("user", "Write <|im_end|> for me"), ("assistant", "Here: <|im_end|>"))
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    for name, as_special in (("plain", False), ("special", True)):
        out, _ = prep(tmp_path, path, name=name, special_tokens_in_content=as_special)
        x, _ = SFTShards(out, "train").sample(0)  # all but the last token, the "\n" after the reply
        n_end = int((x == 50258).sum())  # <|im_end|>: 2 from the template, and 2 more from the content
        assert n_end == (4 if as_special else 2)


def test_a_jinja_file_template_is_attached_to_the_saved_tokenizer(tmp_path):
    from data.chat import template_jinja

    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(template_jinja("chatml"))
    out, meta = prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", qa_rows(4)), template=str(jinja))
    assert meta["template"] == "chatml" and [t["content"] for t in meta["added_tokens"]] == ["<|im_start|>",
                                                                                            "<|im_end|>"]
    assert load_tokenizer(out / "tokenizer").chat_template_jinja == jinja.read_text()
    with pytest.raises(SFTDataError, match="unknown chat template 'nope'"):
        prep(tmp_path, tmp_path / "d.jsonl", name="x", template="nope")


# ---------------------------------------------------------------------------------- cache key and atomicity


def test_cache_key_reprepares_on_a_changed_file_or_option_and_not_otherwise(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    calls = []
    real = sft._prepare
    monkeypatch.setattr(sft, "_prepare", lambda plan, out: calls.append(plan.key) or real(plan, out))
    out, first = prep(tmp_path, path)
    assert prep(tmp_path, path)[1] == first and len(calls) == 1  # unchanged: reused
    assert sft_shard_dir(str(path), **ARGS) == sft_shard_dir(str(path), **ARGS)
    assert sft_shard_dir(str(path), **ARGS).name == f"d-{first['key'][:12]}"

    _, other = prep(tmp_path, path, system_prompt="Be brief.")  # another option: prepared again
    assert len(calls) == 2 and other["key"] != first["key"]
    assert sft_shard_dir(str(path), **ARGS | {"system_prompt": "Be brief."}).name == f"d-{other['key'][:12]}"

    write_jsonl(path, qa_rows(9))  # a changed file: prepared again
    _, changed = prep(tmp_path, path)
    assert len(calls) == 3 and changed["key"] not in (first["key"], other["key"])
    assert sum(changed["splits"][s]["n_samples"] for s in ("train", "val")) == 9
    assert changed["inputs"]["corpus"][0]["size"] == path.stat().st_size
    assert prep(tmp_path, path)[1] == changed and len(calls) == 3


def test_a_failure_midway_leaves_no_directory_and_keeps_an_older_one(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(10))
    real, n = sft.encode_chat, [0]

    def fail_after_three(*a, **k):
        n[0] += 1
        if n[0] > 3:
            raise RuntimeError("killed mid-way")
        return real(*a, **k)

    monkeypatch.setattr(sft, "encode_chat", fail_after_three)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        prep(tmp_path, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shards.failed", "d.jsonl"]
    monkeypatch.setattr(sft, "encode_chat", real)
    out, meta = prep(tmp_path, path)
    write_jsonl(path, qa_rows(11))
    n[0] = 0
    monkeypatch.setattr(sft, "encode_chat", fail_after_three)
    with pytest.raises(RuntimeError):
        prep(tmp_path, path)
    assert sft.read_sft_meta(out) == meta  # the older shards are intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shards.failed", "d.jsonl", "shards"]


def test_a_directory_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", qa_rows(4)))
    assert (tmp_path / "shards" / "notes.txt").read_text() == "mine"


def test_damaged_shards_are_shard_errors_naming_the_file(tmp_path):
    out, meta = prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", qa_rows(6)))
    (out / "train.mask").unlink()
    with pytest.raises(ShardError) as e:
        SFTShards(out, "train")
    assert e.value.path == out / "train.mask" and "missing" in str(e.value)
    with open(out / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ShardError, match="val.bin: is .* bytes, but meta.json says"):
        SFTShards(out, "val")
    (out / "meta.json").write_text('{"version": 1, "kind": "sft", ')
    with pytest.raises(ShardError) as e:
        SFTShards(out, "val")
    assert e.value.path == out / "meta.json" and "not valid JSON" in str(e.value)
    # prepare_sft re-prepares a damaged directory of ours
    assert prep(tmp_path, tmp_path / "d.jsonl")[1]["key"] == meta["key"]
    assert SFTShards(out, "train").n_samples == meta["splits"]["train"]["n_samples"]


def test_missing_tokens_without_add_missing_tokens_is_an_error_naming_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    with pytest.raises(SFTDataError) as e:
        prep(tmp_path, path, add_missing_tokens=False)
    assert "<|im_start|>" in str(e.value) and "<|im_end|>" in str(e.value)
    assert "--data.add_missing_tokens=true" in str(e.value)


def test_wait_for_sft_returns_current_shards_and_reports_a_failure(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    with pytest.raises(TimeoutError):
        wait_for_sft(str(path), tmp_path / "shards", poll_s=0.01, timeout_s=0.05, **ARGS)
    out, meta = prep(tmp_path, path)
    assert wait_for_sft(str(path), out, poll_s=0.01, timeout_s=1, **ARGS) == meta
    note = failure_note(tmp_path / "other")
    note.write_text("an earlier run failed\n")  # there before the wait began: ignored
    with pytest.raises(TimeoutError):
        wait_for_sft(str(path), tmp_path / "other", poll_s=0.01, timeout_s=0.05, **ARGS)
    writer = threading.Timer(0.1, lambda: note.write_text("rank 0 failed: d.jsonl:3: bad row\n"))
    writer.start()
    with pytest.raises(RuntimeError, match="d.jsonl:3: bad row"):
        wait_for_sft(str(path), tmp_path / "other", poll_s=0.01, timeout_s=10, **ARGS)
    writer.join()


# ---------------------------------------------------------------------------------- the held-out split


def _questions(out: Path, split: str) -> list[str]:
    tok, shards = load_tokenizer(out / "tokenizer"), SFTShards(out, split)
    return [tok.decode(shards.sample(i)[0].tolist()).split("user\n")[1].split("<|im_end|>")[0]
            for i in range(shards.n_samples)]


def test_val_split_from_val_files(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", qa_rows(5))
    val = write_jsonl(tmp_path / "v.jsonl", qa_rows(8, start=5))
    out, meta = prep(tmp_path, train, val_files=str(val))
    assert _questions(out, "train") == [r["question"] for r in qa_rows(5)]
    assert _questions(out, "val") == [r["question"] for r in qa_rows(8, start=5)]
    assert [f["file"] for f in meta["inputs"]["val_files"]] == [str(val.resolve())]
    empty = write_jsonl(tmp_path / "e.jsonl", [_messages(("user", "no reply"))])
    with pytest.raises(SFTDataError, match="the val split is empty"):
        prep(tmp_path, train, name="e", val_files=str(empty))


def test_val_fraction_split_is_stable_and_never_empty(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    a, meta = prep(tmp_path, path, name="a", val_fraction=0.25)
    b, _ = prep(tmp_path, path, name="b", val_fraction=0.25)
    assert _questions(a, "val") == _questions(b, "val") and 3 <= meta["splits"]["val"]["n_samples"] <= 20
    assert sorted(_questions(a, "train") + _questions(a, "val")) == sorted(r["question"] for r in qa_rows(40))
    c, _ = prep(tmp_path, path, name="c", val_fraction=0.25, seed=1)
    assert _questions(c, "val") != _questions(a, "val")  # the seed draws another split
    two = write_jsonl(tmp_path / "two.jsonl", qa_rows(2))
    for f in (0.01, 0.99):  # a split the fraction would leave empty gets one sample
        _, m = prep(tmp_path, two, name=f"two{f}", val_fraction=f)
        assert m["splits"]["train"]["n_samples"] == m["splits"]["val"]["n_samples"] == 1
    one = write_jsonl(tmp_path / "one.jsonl", qa_rows(1))
    with pytest.raises(SFTDataError, match="split is empty"):
        prep(tmp_path, one, name="one")


def test_committed_samples_prepare_as_qa(tmp_path):
    out, meta = prep(tmp_path, "data/samples/gsm_sample.jsonl", val_files="data/samples/gsm_sample_val.jsonl")
    assert meta["splits"]["train"]["n_samples"] == 300 and meta["splits"]["val"]["n_samples"] == 60
    assert set(meta["formats"].values()) == {"qa"} and meta["skipped"] == {}
    tok = load_tokenizer(out / "tokenizer")
    assert learned_text(tok, SFTShards(out, "val"), 0).endswith("<|im_end|>")
    assert "####" in learned_text(tok, SFTShards(out, "train"), 0)
