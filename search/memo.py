"""Memoised denoiser evaluations for the search's fitness: the same input (bytes of x, sigma, cond and a tag such as
the step's skip set) gives the same output, so candidates that share their first steps share those evaluations."""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def _bytes(v) -> bytes:
    if v is None:
        return b""
    if hasattr(v, "tensors"):  # a Conditioning: its fields, by name
        return b"".join(name.encode() + _bytes(t) for name, t in v.tensors().items())
    t = torch.as_tensor(v)
    return t.detach().contiguous().cpu().numpy().tobytes() + str(t.dtype).encode()


class EvalCache:
    """An LRU store of denoiser outputs, at most `max_bytes` of them; counts calls and hits."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes, self.store = max_bytes, OrderedDict()
        self.bytes = self.hits = self.calls = 0

    def get_or_compute(self, key: bytes, compute) -> torch.Tensor:
        self.calls += 1
        if key in self.store:
            self.hits += 1
            self.store.move_to_end(key)
            return self.store[key]
        out = compute()
        size = out.numel() * out.element_size()
        if size <= self.max_bytes:
            self.store[key] = out
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.store.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return out


def memoised(denoiser, cache: EvalCache, tag=lambda sigma: ""):
    """`denoiser` behind `cache`, keyed on a hash of (x, sigma, cond, tag(sigma)); `tag` names whatever else decides
    the output (stage two: the blocks skipped at that noise level)."""
    def D(x, sigma, cond=None):
        h = hashlib.blake2b(_bytes(x) + _bytes(sigma) + _bytes(cond) + str(tag(sigma)).encode(), digest_size=20)
        return cache.get_or_compute(h.digest(), lambda: denoiser(x, sigma, cond))
    return D
