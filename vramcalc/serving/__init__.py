"""Serving adapters: KV cache, inference memory, prefill/decode speed, the serve planner."""
