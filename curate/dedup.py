"""Exact and near duplicates: normalised-text hash, and character n-gram MinHash with LSH banding (numpy).

Two halves, so that the expensive one can run in worker processes:
- `prepare(texts)` (pure, any process): normalised-text hash, MinHash signature and LSH band keys of a batch of
  texts, in one numpy pass over all their n-grams (a per-record numpy call costs more than the work itself).
- `DedupIndex.check_batch(ids, prepared, add)` (the main process, in input order): which earlier text each one
  duplicates, "the first occurrence stays". Lookups against earlier batches are vectorised; only records whose
  keys also occur earlier in the same batch go through a small sequential path, which keeps the result identical
  to checking the records one by one.

Memory at 1M records: the index keeps band keys and norm hashes in open-addressing numpy tables (12 bytes a key,
24 keys a record) and signatures in fixed-size uint32 blocks; no Python object per key.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import regex

_NOT_WORD = regex.compile(r"[^\p{L}\p{N}]+")
_MIN_GRAMS = 4  # fewer distinct n-grams than this: too short for a meaningful similarity (exact match still applies)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def normalise(text: str) -> str:
    """For duplicate detection: NFKC, then letters and digits only (no punctuation, whitespace or emoji)."""
    fast = _fast_path()
    if not fast.unsafe.search(text):
        return text.translate(fast.table)
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text))


# The fast path of normalise, for text made only of "simple" characters (Chinese, ASCII, CJK and full-width
# punctuation, emoji: nearly every greeting). It gives the same result as the slow path, because for such text
# NFKC works character by character: if no character of NFKD(text) is a non-starter (canonical combining class
# > 0) or a starter that composes with a preceding character, canonical reordering moves nothing and composition
# joins nothing, so NFKC(text) = NFKD(text) = the concatenation of NFKD(c); and dropping non-letters/digits is also
# per character. So normalise(text) = text.translate(c → normalise(c)). Checked against every corpus text and every
# simple character in tests/test_curate.py.
_FAST_RANGES = ((0x20, 0x7E), (0xA0, 0xFF), (0x2000, 0x206F), (0x2100, 0x2BFF), (0x3000, 0x303F), (0x4E00, 0x9FFF),
                (0xFE00, 0xFE0F), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF), (0x1F000, 0x1FAFF))
# Starters (combining class 0) that are the second character of a canonical composition (Indic length marks and
# vowel signs, conjoining Hangul vowels and trailing consonants); tests/test_curate.py re-derives this from the
# Unicode database.
COMPOSING_STARTERS = frozenset(
    [0x9BE, 0x9D7, 0xB3E, 0xB56, 0xB57, 0xBBE, 0xBD7, 0xCC2, 0xCD5, 0xCD6, 0xD3E, 0xD57, 0xDCF, 0xDDF, 0xFB5, 0xFB7,
     0x102E, 0x1B35, 0x11127, 0x1133E, 0x11357, 0x114B0, 0x114BA, 0x114BD, 0x115AF, 0x11930]
    + list(range(0x1161, 0x1176)) + list(range(0x11A8, 0x11C3)))


@dataclass(frozen=True)
class _Fast:
    table: dict     # code point → its normalise() where that differs from itself (None: dropped)
    unsafe: re.Pattern  # matches any character outside the simple set (stdlib re: ~20x faster on a big class)


def is_simple(ch: str) -> bool:
    """Every character of NFKD(ch) is a starter that composes with nothing before it."""
    return all(unicodedata.combining(x) == 0 and ord(x) not in COMPOSING_STARTERS
               for x in unicodedata.normalize("NFKD", ch))


_FAST: Optional[_Fast] = None


def _fast_path() -> _Fast:
    global _FAST
    if _FAST is None:  # built on first use (~30 ms), not at import
        table, spans = {}, []
        for lo, hi in _FAST_RANGES:
            for cp in range(lo, hi + 1):
                ch = chr(cp)
                if not is_simple(ch):
                    continue
                out = _NOT_WORD.sub("", unicodedata.normalize("NFKD", ch))
                if out != ch:
                    table[cp] = out or None
                if spans and spans[-1][1] == cp - 1:
                    spans[-1][1] = cp
                else:
                    spans.append([cp, cp])
        cls = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in spans)
        _FAST = _Fast(table, re.compile(f"[^{cls}]"))
    return _FAST


def _norm_hash(norm: str) -> int:
    # blake2b, not hash(): the same value in every worker process. 64 bits: a false exact match among 1M texts
    # has probability ~3e-8.
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class Prepared:
    """What check_batch needs of a batch of texts (numpy arrays pickle cheaply between processes)."""

    has_norm: np.ndarray   # bool[B]: the normalised text is not empty
    norm_hash: np.ndarray  # uint64[B]
    nlen: np.ndarray       # int32[B]: characters of the normalised text (letters and digits)
    row: np.ndarray        # int64[B]: row in sig/keys, −1 if too short for a signature
    sig: np.ndarray        # uint32[K, perms]
    keys: np.ndarray       # uint64[K, bands]: one LSH key per band, band number mixed in

    def __len__(self) -> int:
        return len(self.has_norm)


class MinHasher:
    """Character n-gram MinHash with fixed-seed permutations: the same signatures in every run and process."""

    def __init__(self, ngram: int = 2, perms: int = 64, bands: int = 16, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 63, perms, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 1 << 63, perms, dtype=np.uint64)
        self.n, self.perms, self.bands, self.rows = ngram, perms, bands, perms // bands
        # Mixes a band's rows into one 64-bit key; the band number is added so equal rows in other bands differ.
        self.mix = (np.arange(1, self.rows + 1, dtype=np.uint64) * _GOLDEN).reshape(1, 1, -1)
        self.band_salt = (np.arange(bands, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)).reshape(1, -1)

    def prepare(self, texts: Sequence[str]) -> Prepared:
        if len(texts) <= self.BATCH:
            return self._prepare(texts)
        parts = [self._prepare(texts[i: i + self.BATCH]) for i in range(0, len(texts), self.BATCH)]
        rows, k = [], 0
        for q in parts:  # rows are numbered across the parts
            rows.append(np.where(q.row >= 0, q.row + k, -1))
            k += len(q.sig)
        return Prepared(np.concatenate([q.has_norm for q in parts]), np.concatenate([q.norm_hash for q in parts]),
                        np.concatenate([q.nlen for q in parts]), np.concatenate(rows),
                        np.concatenate([q.sig for q in parts]),
                        np.concatenate([q.keys for q in parts]))

    BATCH = 1024  # texts hashed in one numpy pass: bounds the (perms × n-grams) temporary (~25 MB)

    def _prepare(self, texts: Sequence[str]) -> Prepared:
        n = self.n
        norms = [normalise(t) for t in texts]
        has_norm = np.fromiter((bool(s) for s in norms), dtype=bool, count=len(norms))
        norm_hash = np.fromiter((_norm_hash(s) if s else 0 for s in norms), dtype=np.uint64, count=len(norms))
        lens = np.fromiter((len(s) for s in norms), dtype=np.int64, count=len(norms))
        cnt = np.maximum(lens - n + 1, 0)
        ok = cnt >= _MIN_GRAMS
        row = np.full(len(norms), -1, dtype=np.int64)
        k = int(ok.sum())
        row[ok] = np.arange(k)
        if not k:
            return Prepared(has_norm, norm_hash, lens.astype(np.int32), row, np.zeros((0, self.perms), np.uint32),
                            np.zeros((0, self.bands), np.uint64))
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
        gv = g[valid]
        # (perms × grams), in place; wraps mod 2^64 by design. The grams of one text are contiguous along a row,
        # so the min per text is a reduceat along rows (much faster than down columns). The hash is the high 32
        # bits; x → x >> 32 is monotone, so the min is taken first and shifted after (no pass over the big array).
        h = np.multiply(self.a[:, None], gv[None, :])
        h += self.b[:, None]
        starts = np.cumsum(cnt[ok]) - cnt[ok]
        low = np.minimum.reduceat(h, starts, axis=1) >> np.uint64(32)
        sig = np.ascontiguousarray(low.astype(np.uint32).T)  # (texts, perms)
        b = sig.reshape(k, self.bands, self.rows).astype(np.uint64)
        keys = (b * self.mix).sum(axis=2) ^ self.band_salt
        return Prepared(has_norm, norm_hash, lens.astype(np.int32), row, sig, keys)


class U64Table:
    """Open-addressing hash table uint64 key → position (linear probing, numpy, vectorised over a batch).

    Only insert-if-absent and lookup: what first-occurrence dedup needs. One uint64 a slot, load kept ≤ MAX_LOAD: the key's
    high 36 bits and the position + 1 in the low 28 (0: empty). Keys come from 64-bit hashes, so two different keys
    agreeing on 36 bits within one probe run is a ~1e-11 event; positions are limited to 2^28 − 1.
    """

    VAL_BITS = 28
    VAL_MASK = np.uint64((1 << VAL_BITS) - 1)
    MAX_POS = (1 << VAL_BITS) - 2
    MAX_LOAD = 0.5  # grown (doubled) beyond this: short probe runs (0.7 costs ~25% more time in dedup)

    def __init__(self, capacity: int = 1 << 16):
        self._alloc(max(1 << 10, 1 << (capacity - 1).bit_length()))
        self.count = 0

    def _alloc(self, cap: int) -> None:
        self.slots = np.zeros(cap, dtype=np.uint64)
        self.shift = np.uint64(64 - (cap.bit_length() - 1))
        self.mask = cap - 1

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * _GOLDEN) >> self.shift).astype(np.int64)  # Fibonacci hashing: the high bits

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key, −1 where absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        hi = keys & ~self.VAL_MASK
        todo = np.arange(len(keys))
        slot = self._home(hi)
        while todo.size:
            s = slot[todo]
            v = self.slots[s]
            used = v != 0
            found = used & ((v & ~self.VAL_MASK) == hi[todo])
            out[todo[found]] = (v[found] & self.VAL_MASK).astype(np.int64) - 1
            more = used & ~found
            todo = todo[more]
            slot[todo] = (s[more] + 1) & self.mask
        return out

    def insert_new(self, keys: np.ndarray, pos: np.ndarray) -> None:
        """Insert keys known to be absent and distinct from each other, with their positions."""
        if len(pos) and int(pos.max()) > self.MAX_POS:
            raise OverflowError(f"dedup index holds at most {self.MAX_POS:,} texts")
        if self.count + len(keys) > self.MAX_LOAD * (self.mask + 1):
            old = self.slots[self.slots != 0]
            cap = self.mask + 1
            while self.count + len(keys) > self.MAX_LOAD * cap:
                cap *= 2
            self._alloc(cap)
            self.count = 0
            for i in range(0, len(old), 1 << 20):  # in slices: the probing temporaries stay small
                self._place(old[i: i + (1 << 20)])  # a stored word is its own key for _home: the same high bits
            del old
        self._place((keys & ~self.VAL_MASK) | (pos.astype(np.uint64) + np.uint64(1)))

    def _place(self, words: np.ndarray) -> None:
        self.count += len(words)
        todo = np.arange(len(words))
        slot = self._home(words & ~self.VAL_MASK)
        while todo.size:
            s = slot[todo]
            free = self.slots[s] == 0
            # Several words may reach the same free slot in one round: one takes it (which one does not change
            # what lookups answer), the others probe on.
            ft, fs = todo[free], s[free]
            self.slots[fs] = words[ft]
            won = self.slots[fs] == words[ft]
            lost = np.ones(len(todo), dtype=bool)
            lost[np.flatnonzero(free)[won]] = False
            todo = todo[lost]
            slot[todo] = (slot[todo] + 1) & self.mask


class _Blocks:
    """Signatures of indexed texts in fixed-size blocks: growing never copies what is stored."""

    BLOCK = 1 << 16

    def __init__(self, perms: int):
        self.perms, self.blocks, self.n = perms, [], 0

    def append(self, sig: np.ndarray) -> None:
        i = 0
        while i < len(sig):
            if self.n % self.BLOCK == 0:
                self.blocks.append(np.zeros((self.BLOCK, self.perms), dtype=np.uint32))
            at = self.n % self.BLOCK
            take = min(len(sig) - i, self.BLOCK - at)
            self.blocks[-1][at: at + take] = sig[i: i + take]
            self.n += take
            i += take

    def get(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.perms), dtype=np.uint32)
        blk = idx // self.BLOCK
        for b in np.unique(blk).tolist():
            m = blk == b
            out[m] = self.blocks[b][idx[m] % self.BLOCK]
        return out


class DedupIndex:
    """First occurrence wins: `check_batch` names, for each text, an earlier text it duplicates, else indexes it.

    Earlier texts come in sources (the recipe's examples, a reference corpus, the input, …), each with its own bar:
    the similarity from which a later text counts as its near duplicate, and a bar for short later texts (common short
    greetings overlap a large corpus by chance). `start_source` opens one; texts indexed from then on belong to it.
    A near duplicate below `reject` (doubtful) is indexed for exact matching only: a later exact copy of it is rejected
    as a copy of it, while near matches still point at the text it resembles.
    """

    def __init__(self, ngram: int = 2, perms: int = 64, bands: int = 16, threshold: float = 0.7, seed: int = 1,
                 reject: Optional[float] = None, short_chars: int = 0):
        self.hasher = MinHasher(ngram, perms, bands, seed)
        self.perms, self.bands = perms, bands
        self.reject = threshold if reject is None else reject
        self.short_chars = short_chars            # texts with fewer normalised characters use a source's short bar
        self.ids: list[str] = []                  # index position → id
        self.exact = U64Table()                   # norm hash → position
        self.buckets = U64Table(1 << 18)          # band key → first position with it
        self.sigs = _Blocks(perms)                # position → signature (zeros for texts without one)
        self._src_start = np.zeros(1, np.int64)   # first position of each source, in order
        self._bar = np.array([threshold])         # each source's bar, and its bar for short texts
        self._short_bar = np.array([threshold])

    def start_source(self, bar: float, short_bar: Optional[float] = None) -> None:
        """Texts indexed from now on form a new source: a later text is their near duplicate from similarity `bar`
        (`short_bar` if it has fewer than short_chars normalised characters)."""
        self._src_start = np.append(self._src_start, len(self.ids))
        self._bar = np.append(self._bar, bar)
        self._short_bar = np.append(self._short_bar, bar if short_bar is None else short_bar)

    def _bars(self, pos: np.ndarray, short: np.ndarray) -> np.ndarray:
        """The bar each earlier text at `pos` sets for a later text (short or not)."""
        k = np.searchsorted(self._src_start, pos, side="right") - 1
        return np.where(short, self._short_bar[k], self._bar[k])

    def prepare(self, texts: Sequence[str]) -> Prepared:
        return self.hasher.prepare(texts)

    def check_add(self, rid: str, text: str, add: bool = True) -> Optional[tuple[str, float]]:
        """One text: (id it duplicates, similarity) or None; indexed when new and `add`."""
        return self.check_batch([rid], self.prepare([text]), np.array([add]))[0]

    def add_many(self, items: Sequence[tuple[str, str]]) -> None:
        """Index (id, text) pairs, e.g. a reference corpus; duplicates among them are simply not re-indexed."""
        if items:
            self.check_batch([r for r, _ in items], self.prepare([t for _, t in items]), np.ones(len(items), bool))

    def _sims(self, cand: np.ndarray, sig: np.ndarray) -> np.ndarray:
        return np.count_nonzero(self.sigs.get(cand) == sig, axis=1) / self.perms

    def check_batch(self, ids: Sequence[str], p: Prepared, add: np.ndarray) -> list[Optional[tuple[str, float]]]:
        """For each record in order: (id it duplicates, similarity) or None. `add[i]`: index record i if it is new
        (the pipeline passes False for rejected records: a rejected first copy must not block a later good one)."""
        B = len(ids)
        hits: list = [None] * B
        ex = self.exact.lookup(p.norm_hash)
        ex[~p.has_norm] = -1
        g = self.buckets.lookup(p.keys.ravel()).reshape(p.keys.shape)       # (K, bands), earlier batches
        signed = p.row >= 0
        short = np.zeros(len(g), dtype=bool)                                 # per signature row
        short[p.row[signed]] = p.nlen[signed] < self.short_chars
        # Similarity to each earlier-batch candidate, kept where it reaches the candidate's source bar; best per
        # record = first band with the highest similarity.
        score = np.full(g.shape, -1.0)
        cand = g >= 0
        if cand.any():
            kk = np.nonzero(cand)[0]
            pos = g[cand].astype(np.int64)
            sim = self._sims(pos, p.sig[kk])
            score[cand] = np.where(sim >= self._bars(pos, short[kk]), sim, -1.0)
        best_band = score.argmax(axis=1) if len(score) else np.zeros(0, np.int64)
        best_sim = score[np.arange(len(score)), best_band] if len(score) else np.zeros(0)
        # Keys (band keys without an earlier-batch entry, norm hashes without one) that occur twice in this batch:
        # their records take the sequential path below.
        free = g < 0
        rep = np.zeros(g.shape, dtype=bool)
        rep[free] = _repeated(p.keys[free])
        local_rows = rep.any(axis=1)
        nh_free = p.has_norm & (ex < 0)
        local_ex = np.zeros(B, dtype=bool)
        local_ex[np.flatnonzero(nh_free)[_repeated(p.norm_hash[nh_free])]] = True
        slow = local_ex
        slow[signed] |= local_rows[p.row[signed]]
        seen_ex: dict[int, int] = {}                   # within-batch entries of the sequential path: norm hash → position
        seen_band: dict[int, tuple[int, int]] = {}     # band key → (position, signature row)
        at = np.full(B, -1, dtype=np.int64)            # index position given to record i (−1: not indexed)
        full = np.zeros(B, dtype=bool)                 # indexed with its band keys too (not only its norm hash)
        ex_l, row_l, add_l, slow_l, has_l = ex.tolist(), p.row.tolist(), add.tolist(), slow.tolist(), p.has_norm.tolist()
        for i in range(B):
            if not has_l[i]:
                continue
            r = row_l[i]
            if ex_l[i] >= 0:
                hits[i] = (self.ids[ex_l[i]], 1.0)
                continue
            if slow_l[i]:
                hit = self._sequential(i, r, p, g, score, short, seen_ex, seen_band)
            else:
                hit = None
                if r >= 0 and best_sim[r] >= 0:
                    hit = (self.ids[g[r, best_band[r]]], float(best_sim[r]))
            hits[i] = hit
            if not add_l[i] or (hit is not None and hit[1] >= self.reject):
                continue
            at[i] = len(self.ids)
            self.ids.append(ids[i])
            full[i] = hit is None
            if slow_l[i]:
                seen_ex.setdefault(int(p.norm_hash[i]), int(at[i]))
                if full[i] and r >= 0:
                    for k in p.keys[r][free[r]].tolist():
                        seen_band.setdefault(k, (int(at[i]), r))
        self._commit(p, at, full, g, rep)
        return hits

    def _sequential(self, i, r, p, g, score, short, seen_ex, seen_band):
        """One record against earlier batches and the earlier records of this batch, exactly as one by one."""
        j = seen_ex.get(int(p.norm_hash[i]))
        if j is not None:
            return self.ids[j], 1.0
        if r < 0:
            return None
        best = None
        keys = p.keys[r].tolist()
        for b in range(self.bands):
            if g[r, b] >= 0:
                s = score[r, b]  # −1 where below the bar
                j = int(g[r, b])
            else:
                seen = seen_band.get(keys[b])
                if seen is None:
                    continue
                j, rj = seen
                s = float(np.count_nonzero(p.sig[rj] == p.sig[r])) / self.perms
                if s < self._bars(np.array([j]), short[r:r + 1])[0]:
                    continue
            if s >= 0 and (best is None or s > best[1]):
                best = (self.ids[j], float(s))
        return best

    def _commit(self, p: Prepared, at: np.ndarray, full: np.ndarray, g: np.ndarray, rep: np.ndarray) -> None:
        """Index this batch's new records: norm hashes and signatures (zeros where none or not `full`), and the
        band keys not yet in the table of the `full` ones."""
        idx = np.flatnonzero(at >= 0)
        if not idx.size:
            return
        pos = at[idx]  # consecutive, in record order
        nh, first = np.unique(p.norm_hash[idx], return_index=True)
        self.exact.insert_new(nh, pos[first])
        rows = np.where(full[idx], p.row[idx], -1)
        sig = np.zeros((idx.size, self.perms), dtype=np.uint32)
        has = rows >= 0
        sig[has] = p.sig[rows[has]]
        self.sigs.append(sig)
        if has.any():
            r = rows[has]
            keys, free, reps = p.keys[r], g[r] < 0, rep[r]
            kpos = np.broadcast_to(pos[has][:, None], keys.shape)
            once = free & ~reps  # keys no other record of the batch has: insert as they are
            self.buckets.insert_new(keys[once], kpos[once])
            twice = free & reps
            if twice.any():  # row-major order: the earliest new record wins a key
                k, first = np.unique(keys[twice], return_index=True)
                self.buckets.insert_new(k, kpos[twice][first])


def _repeated(a: np.ndarray) -> np.ndarray:
    """Mask of the elements whose value occurs more than once in a."""
    if a.size < 2:
        return np.zeros(a.size, dtype=bool)
    _, inv, cnt = np.unique(a, return_inverse=True, return_counts=True)
    return cnt[inv] > 1
