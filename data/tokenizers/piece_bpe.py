"""SentencePiece-style BPE written as an HF tokenizer.json (Llama-2's: spaces as "▁", byte fallback):
`PieceBPETokenizer`, in pure Python, following the `tokenizers` library step by step."""

import heapq
from pathlib import Path

from data.tokenizers.base import AddedToken, Tokenizer
from data.tokenizers.hf_json import check_bpe_options, describe_steps, make_normalizer, merge_pairs, steps_of


class PieceBPETokenizer(Tokenizer):
    """BPE over characters with "▁" for spaces and byte fallback, from a tokenizer.json (Llama-2's), in pure Python.

    The steps, as the `tokenizers` library takes them for each chunk between added tokens:
    1. normalizer: e.g. Prepend("▁") then Replace(" ", "▁") (SentencePiece's dummy prefix and space escaping);
       or a Metaspace pre-tokenizer doing the same (prepend_scheme "always", or "first": only at the text's start).
    2. the chunk's characters become symbols: a character's vocabulary id, else (byte_fallback) one <0xXX> token per
       UTF-8 byte, else the unknown token (consecutive unknowns fused into one with fuse_unk).
    3. merges: repeatedly join the adjacent pair that comes first in the merge list (the leftmost on a tie), until
       no adjacent pair is listed. A heap of candidate pairs keeps this O(n log n) on long chunks.
    Decoding runs the decoder steps (Replace, ByteFallback, Fuse, Strip, Metaspace) over the token strings.
    It is slow next to tiktoken (pure Python): use it for chat and evaluation, not for large corpora.
    """

    def __init__(self, name: str, tj: dict, added: list[AddedToken]):
        model = tj["model"]
        check_bpe_options(model, name)
        super().__init__(name, added, make_normalizer(tj.get("normalizer"), name))
        self.vocab: dict[str, int] = model["vocab"]
        self._tokens = {i: t for t, i in self.vocab.items()}
        self._merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(merge_pairs(model)):
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise ValueError(f"{name}: merge #{rank} ({a!r}, {b!r}) joins or makes a token not in the vocabulary")
            self._merges[self.vocab[a], self.vocab[b]] = (rank, self.vocab[a + b])
        self._byte_fallback, self._fuse_unk = model.get("byte_fallback", False), model.get("fuse_unk", False)
        self._ignore_merges = model.get("ignore_merges", False)
        self._unk = self.vocab.get(model["unk_token"]) if model.get("unk_token") else None
        self._bytes = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self._metaspace = None
        steps = steps_of(tj.get("pre_tokenizer"), "pretokenizers")
        if steps:
            if len(steps) > 1 or steps[0]["type"] != "Metaspace" or steps[0].get("split", True):
                raise ValueError(f"{name}: cannot reproduce the pre-tokenizer {describe_steps(steps)}; supported: "
                                 f"none, or Metaspace(split=False)")
            self._metaspace = (steps[0]["replacement"], steps[0].get("prepend_scheme", "always"))
        self.hf_files: dict = {}
        self._decoder = steps_of(tj.get("decoder"), "decoders")
        for s in self._decoder:
            if s["type"] not in ("Replace", "ByteFallback", "Fuse", "Strip", "Metaspace") or (
                    s["type"] == "Replace" and "String" not in s["pattern"]):
                raise ValueError(f"{name}: cannot reproduce the decoder {describe_steps(self._decoder)}; supported: "
                                 f"Replace(String), ByteFallback, Fuse, Strip, Metaspace")
        self.vocab_size = max([*self.vocab.values(), *(t.id for t in added)]) + 1

    def _encode_chunk(self, text: str, first: bool) -> list[int]:
        if self._metaspace is not None:
            replacement, scheme = self._metaspace
            text = text.replace(" ", replacement)
            if (scheme == "always" or (scheme == "first" and first)) and not text.startswith(replacement):
                text = replacement + text
        if self._ignore_merges and text in self.vocab:
            return [self.vocab[text]]
        return self._merge(self._symbols(text))

    def _symbols(self, text: str) -> list[int]:
        symbols, unk = [], None  # an unknown character's token waits until a known one follows, as in HF
        for ch in text:
            if ch in self.vocab:
                if unk is not None:
                    symbols.append(unk)
                    unk = None
                symbols.append(self.vocab[ch])
                continue
            byte_ids = [self._bytes[b] for b in ch.encode()] if self._byte_fallback else [None]
            if None not in byte_ids:
                symbols += byte_ids
            elif self._unk is not None:
                if unk is not None and not self._fuse_unk:
                    symbols.append(unk)
                unk = self._unk
        return symbols if unk is None else symbols + [unk]

    def _merge(self, ids: list[int]) -> list[int]:
        n = len(ids)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap = []  # (merge rank, position of the left symbol, id it makes): the lowest rank, then leftmost, first
        for i in range(n - 1):
            if m := self._merges.get((ids[i], ids[i + 1])):
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            rank, i, new = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or self._merges.get((ids[i], ids[j]), (0, None))[1] != new:
                continue  # a stale entry: one side has been merged since
            ids[i], alive[j], nxt[i] = new, False, nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right < n and (m := self._merges.get((ids[left], ids[right]))):
                    heapq.heappush(heap, (m[0], left, m[1]))
        return [ids[i] for i in range(n) if alive[i]]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        tokens = []
        for i in ids:
            t = self._added_by_id.get(i)
            if t is not None:
                if not (skip_special and t.special):
                    tokens.append(t.content)
            elif i in self._tokens:
                tokens.append(self._tokens[i])
            else:
                raise ValueError(f"token id {i} is not in tokenizer {self.name!r} (vocab_size {self.vocab_size})")
        if not self._decoder:
            return " ".join(tokens)
        for step in self._decoder:
            tokens = _decode_step(step, tokens)
        return "".join(tokens)

    def _vocab_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def _vocab_token(self, token_id: int) -> str | None:
        return self._tokens.get(token_id)

    def _hf_files(self) -> dict[str, Path | dict | str]:
        files = dict(self.hf_files)
        files.setdefault("tokenizer_config.json", self._tokenizer_config())
        return files


def _decode_step(step: dict, tokens: list[str]) -> list[str]:
    """One HF decoder step over the token strings."""
    kind = step["type"]
    if kind == "Replace":
        return [t.replace(step["pattern"]["String"], step["content"]) for t in tokens]
    if kind == "Fuse":
        return ["".join(tokens)]
    if kind == "Strip":
        c, start, stop = step["content"], step.get("start", 0), step.get("stop", 0)
        out = []
        for t in tokens:  # up to `start` leading and `stop` trailing copies of `content` come off each token
            a, b = 0, len(t)
            while a < min(start, len(t)) and t[a] == c:
                a += 1
            while len(t) - b < stop and b > a and t[b - 1] == c:
                b -= 1
            out.append(t[a:b])
        return out
    if kind == "Metaspace":  # as `tokenizers`: with a prefix scheme, every "▁" of the first token is dropped
        replacement, drop_first = step["replacement"], step.get("prepend_scheme", "always") != "never"
        return [t.replace(replacement, "" if i == 0 and drop_first else " ") for i, t in enumerate(tokens)]
    # ByteFallback: runs of <0xXX> tokens become their bytes as UTF-8, or one U+FFFD per byte if not valid UTF-8.
    out, run = [], bytearray()
    for t in tokens + [None]:
        if t is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            try:
                run.append(int(t[3:5], 16))
                continue
            except ValueError:
                pass
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = bytearray()
        if t is not None:
            out.append(t)
    return out
