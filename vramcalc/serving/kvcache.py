"""The key/value cache of ``generate``, as transformers 5.17's ``cache_utils.py`` allocates it.

Which layers are sliding comes from transformers' own ``get_layer_types_and_kwargs``: the
config's ``layer_types`` (gemma-2 alternates ``sliding_attention`` / ``full_attention``;
Qwen2 marks layers past ``max_window_layers`` when ``use_sliding_window``), else every layer
``sliding_attention`` when ``sliding_window`` is set (Mistral-7B-v0.1: 4,096), else
``full_attention``. Each layer holds a key and a value tensor of shape
``(batch, num_key_value_heads, tokens, head_dim)`` in the model's dtype (GQA: the KV heads,
not the query heads), and ``tokens`` is:

* ``DynamicLayer`` (full attention, ``generate``'s default cache): every token so far,
  grown by ``torch.cat`` at each step, so while a layer is updated its old and new tensors
  are both alive (one layer's K and V twice, for a moment);
* ``DynamicSlidingWindowLayer``: keeps ``full_key_states[:, :, -sliding_window + 1:]`` of the
  ``cat`` result; the slice is a view, so the storage that stays alive is the whole ``cat``
  result: ``min(tokens, sliding_window)`` tokens while decoding, and **the whole prompt**
  right after prefill (until that layer's first decoding step);
* ``StaticLayer``: ``max_cache_len`` tokens, allocated at the first update
  (``torch.zeros``), ``max_cache_len = max_length - 1`` in ``generate``; updates write in
  place;
* ``StaticSlidingWindowLayer``: ``min(sliding_window, max_cache_len)`` tokens; once full, each
  update builds the rolled window with ``torch.cat`` and copies it in (one layer's window,
  for a moment).

Every tensor is charged the caching allocator's 512-byte rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramcalc.memory import DTYPE_BYTES, alloc_bytes

FULL = "full_attention"
SLIDING_TYPES = ("sliding_attention", "chunked_attention")


@dataclass(frozen=True)
class CacheLayout:
    """What the cache of one model looks like: per layer its window (None: full attention)."""

    windows: tuple[int | None, ...]
    num_key_value_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.windows)

    @property
    def sliding_layers(self) -> int:
        return sum(w is not None for w in self.windows)

    def token_bytes(self, dtype: str) -> int:
        """Bytes of one token's K and V in one layer."""
        return 2 * self.num_key_value_heads * self.head_dim * DTYPE_BYTES[dtype]


def cache_layout(config: Any, num_key_value_heads: int, head_dim: int) -> CacheLayout:
    """The layout transformers' ``DynamicCache(config=...)`` / ``StaticCache`` build."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(text)
    window = kwargs.get("sliding_window")
    windows = tuple(int(window) if t in SLIDING_TYPES and window else None for t in layer_types)
    return CacheLayout(windows, num_key_value_heads, head_dim)


def layer_tokens(window: int | None, tokens: int) -> int:
    """Tokens of storage one layer holds once ``tokens`` have been cached (decoding; for a
    static cache ``tokens`` is ``max_cache_len``): sliding layers hold at most their window."""
    return tokens if window is None else min(window, tokens)


def _pair(batch: int, tokens: int, per_token: int) -> int:
    """One layer's K and V tensors."""
    return 2 * alloc_bytes(batch * tokens * per_token)


def kv_cache_bytes(layout: CacheLayout, batch: int, tokens: int, dtype: str) -> int:
    """Allocated bytes of the cache once ``tokens`` tokens of ``batch`` sequences are cached
    while decoding (dynamic), or of a static cache of ``max_cache_len = tokens``."""
    per_token = layout.token_bytes(dtype) // 2
    return sum(_pair(batch, layer_tokens(w, tokens), per_token) for w in layout.windows)


def kv_prefill_bytes(
    layout: CacheLayout, batch: int, prompt: int, cache: str, max_cache_len: int, dtype: str
) -> int:
    """The cache at the end of prefill: a dynamic cache holds the whole prompt in every layer
    (sliding layers' views keep the ``cat`` result); a static one is already full size."""
    if cache == "static":
        return kv_cache_bytes(layout, batch, max_cache_len, dtype)
    per_token = layout.token_bytes(dtype) // 2
    return layout.num_layers * _pair(batch, prompt, per_token)


def kv_update_transient_bytes(
    layout: CacheLayout, batch: int, tokens: int, cache: str, dtype: str
) -> int:
    """Bytes beyond ``kv_cache_bytes(tokens)`` while the largest layer takes the last token:
    a dynamic layer's old tensor (``tokens - 1``, capped at the window) next to the new one;
    a full static sliding layer's rolled window; nothing for a static full layer."""
    per_token = layout.token_bytes(dtype) // 2
    worst = 0
    for w in layout.windows:
        if cache == "dynamic":
            worst = max(worst, _pair(batch, layer_tokens(w, tokens - 1), per_token))
        elif w is not None and tokens > w:
            worst = max(worst, _pair(batch, w, per_token))
    return worst
