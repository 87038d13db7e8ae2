"""Exact and near duplicates: normalised-text hash, and character n-gram MinHash with LSH banding (numpy).

Signatures are computed for a batch of texts at once (one numpy pass over all their n-grams), because a
per-record numpy call costs more than the work itself on short greetings; lookups stay sequential so that
"first occurrence wins" holds in input order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import regex

_NOT_WORD = regex.compile(r"[^\p{L}\p{N}]+")
_MIN_GRAMS = 4  # fewer distinct n-grams than this: too short for a meaningful similarity (exact match still applies)


def normalise(text: str) -> str:
    """For duplicate detection: NFKC, then letters and digits only (no punctuation, whitespace or emoji)."""
    import unicodedata
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text))


class DedupIndex:
    """First occurrence wins: `check_add(id, text)` names an earlier text this one duplicates, else indexes it."""

    def __init__(self, ngram: int = 2, perms: int = 64, bands: int = 16, threshold: float = 0.7, seed: int = 1):
        rng = np.random.default_rng(seed)  # fixed seed: the same permutations in every run → deterministic
        self.a = (rng.integers(0, 1 << 63, perms, dtype=np.uint64) | np.uint64(1))[:, None]  # odd multipliers
        self.b = rng.integers(0, 1 << 63, perms, dtype=np.uint64)[:, None]
        self.n, self.perms, self.bands, self.rows = ngram, perms, bands, perms // bands
        self.threshold = threshold
        self.exact: dict[str, str] = {}
        self.buckets: dict[int, int] = {}
        self.sigs: list[np.ndarray] = []
        self.ids: list[str] = []
        # Mixes a band's rows into one 64-bit key; the band number is added so equal rows in other bands differ.
        self.mix = (np.arange(1, self.rows + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)).reshape(1, 1, -1)
        self.band_salt = (np.arange(bands, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)).reshape(1, -1)

    def prepare(self, texts: Sequence[str]) -> list[tuple[str, Optional[np.ndarray], Optional[list]]]:
        """Normalised text, signature and band keys of each text, in one vectorised pass over all n-grams."""
        n = self.n
        norms = [normalise(t) for t in texts]
        lens = np.fromiter((len(s) for s in norms), dtype=np.int64, count=len(norms))
        cnt = np.maximum(lens - n + 1, 0)
        ok = cnt >= _MIN_GRAMS
        out: list = [(s, None, None) for s in norms]
        if not ok.any():
            return out
        # An n-gram of code points packed into one integer (21 bits per char), then multiply-shift hashed.
        codes = np.frombuffer("".join(norms).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        total = len(codes)
        g = codes[: total - n + 1].copy()
        for i in range(1, n):
            g = (g << np.uint64(21)) | codes[i: total - n + 1 + i]
        offs = np.cumsum(lens) - lens
        owner = np.repeat(np.arange(len(norms)), lens)
        pos = np.arange(total) - offs[owner]
        valid = ((pos <= (lens - n)[owner]) & ok[owner])[: total - n + 1]  # drop grams that cross two texts
        gv = g[valid][None, :]
        h = (self.a * gv + self.b) >> np.uint64(32)   # wraps mod 2^64 by design (multiply-shift hashing)
        starts = (np.cumsum(cnt[ok]) - cnt[ok])
        sig = np.minimum.reduceat(h, starts, axis=1).T.astype(np.uint32)  # (texts, perms)
        b = sig.reshape(len(starts), self.bands, self.rows).astype(np.uint64)
        keys = ((b * self.mix).sum(axis=2) ^ self.band_salt).tolist()
        for k, i in enumerate(np.flatnonzero(ok).tolist()):
            out[i] = (norms[i], sig[k], keys[k])
        return out

    def check_add(self, rid: str, text: str, add: bool = True, prepared=None) -> Optional[tuple[str, float]]:
        norm, sig, keys = prepared if prepared is not None else self.prepare([text])[0]
        if not norm:
            return None
        hit = self.exact.get(norm)
        if hit is not None:
            return hit, 1.0
        best = None
        if keys:
            seen = set()
            for k in keys:
                j = self.buckets.get(k)
                if j is not None and j not in seen:
                    seen.add(j)
                    sim = float(np.count_nonzero(self.sigs[j] == sig)) / self.perms
                    if sim >= self.threshold and (best is None or sim > best[1]):
                        best = (self.ids[j], sim)
        if best:
            return best
        if add:
            self.exact[norm] = rid
            if keys:
                j = len(self.sigs)
                self.sigs.append(sig)
                self.ids.append(rid)
                for k in keys:
                    self.buckets.setdefault(k, j)
        return None

    def add_many(self, items: Sequence[tuple[str, str]]) -> None:
        """Index (id, text) pairs, e.g. a reference corpus; duplicates among them are simply not re-indexed."""
        for (rid, text), prep in zip(items, self.prepare([t for _, t in items])):
            self.check_add(rid, text, prepared=prep)
