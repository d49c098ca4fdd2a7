"""SentencePiece `.model` files (Llama-2, Mistral, Gemma): `SentencePieceTokenizer`, run by the sentencepiece
library. (Named spm.py so that it does not shadow the `sentencepiece` package.)"""

from pathlib import Path

import sentencepiece

from data.tokenizers.base import AddedToken, Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (protobuf `.model`: pieces with scores and types, a normalizer spec, the BPE or unigram
    algorithm), run by the sentencepiece library.

    Its control pieces (<s>, </s>) and unknown piece (<unk>) are the special tokens, plus any tokenizer_config.json
    adds (ids past the model's pieces included). Text between special tokens is encoded chunk by chunk, each with
    SentencePiece's dummy-prefix space, which is what HF's conversion of the same file does (transformers'
    "legacy" behaviour); decode writes each chunk back the same way, so decode(encode(text)) == text. User-defined
    pieces are matched by SentencePiece itself, also in corpora.
    """

    def __init__(self, name: str, model_file: Path, extra: list[AddedToken] = ()):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.model_file = model_file
        n = self.sp.get_piece_size()
        added = {i: AddedToken(self.sp.id_to_piece(i), i) for i in range(n)
                 if self.sp.is_control(i) or self.sp.is_unknown(i)}
        for t in extra:
            if t.id not in added and (t.id >= n or t.special):
                added[t.id] = t
        super().__init__(name, list(added.values()))
        self.vocab_size = max([n, *(i + 1 for i in added)])
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id(),
                                                                                  self.sp.pad_id()))
        self.add_bos = self.bos_id is not None  # Llama, Mistral and Gemma all start a sequence with BOS

    def _encode_chunk(self, text: str, first: bool) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        if allow_special or self._always_match:
            return super().encode_batch(texts, allow_special)
        return self.sp.encode(texts)

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        out, run = [], []
        n = self.sp.get_piece_size()
        for i in ids:
            t = self._added_by_id.get(i)
            if t is None:
                if not 0 <= i < n:
                    raise ValueError(f"token id {i} is not in tokenizer {self.name!r} (vocab_size {self.vocab_size})")
                run.append(i)
                continue
            out.append(self.sp.decode(run))
            run = []
            if not (skip_special and t.special):
                out.append(t.content)
        out.append(self.sp.decode(run))
        return "".join(out)

    def _vocab_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def _vocab_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    def _hf_files(self) -> dict[str, Path | dict | str]:
        """tokenizer.model and a tokenizer_config.json naming PreTrainedTokenizerFast, for which transformers converts
        the model following its own settings (merges by piece score, dummy prefix per chunk)."""
        config = self._tokenizer_config()
        config["unk_token"] = self.sp.id_to_piece(self.sp.unk_id())
        config["added_tokens_decoder"] = {str(t.id): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                                                      "normalized": False, "single_word": t.single_word,
                                                      "special": t.special} for t in self.added_tokens}
        return {"tokenizer.model": self.model_file, "tokenizer_config.json": config}
