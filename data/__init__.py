"""Data: tokenizers, corpora, token shards and the loaders that read them."""
