"""The Llama 2 decoder and its parts."""

from llama2.model.kv_cache import KVCache
from llama2.model.transformer import Transformer, TransformerBlock

__all__ = ["KVCache", "Transformer", "TransformerBlock"]
