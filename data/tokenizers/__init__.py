"""The tokenizer back ends and their base class; use them through data.tokenizer (load_tokenizer, get_tokenizer)."""
