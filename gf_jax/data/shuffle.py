"""The orders of an epoch: which document comes k-th, which row is served j-th.

``feistel`` (new runs): a keyed Feistel network over the smallest power of two that holds n,
with cycle-walking (a value that lands outside [0, n) is encrypted again until it is inside),
which makes it a bijection of [0, n) computed for any index on demand. An epoch's order costs
no memory, whatever the corpus size, and any window of it is a vectorised numpy computation.

``permutation``: numpy's ``Generator.permutation``, materialised (8 bytes per element). It is the
order of every run started before ``data.shuffle_algorithm`` existed, kept so that those runs
resume with their own batches (see ``resolve_algorithm``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

ALGORITHMS = ("auto", "feistel", "permutation")
# A run's checkpoint without the key was saved before it existed, i.e. with ``permutation``.
LEGACY = "permutation"
ROUNDS = 6  # 4 make a strong pseudo-random permutation with random round functions; 2 more for margin
CHUNK = 1 << 16  # elements per vectorised step over an order or an index: temporaries stay in the cache


def _mix(x_U: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: every output bit depends on every input bit (wrapping
    uint64 maths)."""
    x_U ^= x_U >> np.uint64(30)
    x_U *= np.uint64(0xBF58476D1CE4E5B9)
    x_U ^= x_U >> np.uint64(27)
    x_U *= np.uint64(0x94D049BB133111EB)
    x_U ^= x_U >> np.uint64(31)
    return x_U


class FeistelPermutation:
    """A keyed bijection of ``[0, n)``, evaluated lazily: ``perm[i]``, ``perm[a:b]``, ``perm[index_U]``.

    The domain is ``2**bits`` with ``bits = bit_length(n - 1)``, so fewer than half of its values
    fall outside [0, n): the cycle-walk takes under two encryptions on average. The halves are
    ``ceil(bits / 2)`` and ``floor(bits / 2)`` bits (an unbalanced network; each round swaps the
    widths), so odd bit counts need no padding. ``key`` (any ints) picks the permutation.
    """

    def __init__(self, n: int, key: Sequence[int]):
        if n < 0 or n >= 1 << 62:
            raise ValueError(f"a Feistel permutation needs 0 <= n < 2**62, got {n}.")
        self.n = int(n)
        bits = max(1, (self.n - 1).bit_length())
        self.left_bits, self.right_bits = (bits + 1) // 2, bits // 2
        digest = hashlib.sha512(repr(("gf_jax.feistel", *map(int, key))).encode()).digest()
        self.keys = np.frombuffer(digest, "<u8")[:ROUNDS].astype(np.uint64)

    def __len__(self) -> int:
        return self.n

    def _encrypt(self, x_U: np.ndarray) -> np.ndarray:
        """One pass of the network over the 2**bits domain (uint64 in, uint64 out)."""
        wl, wr = self.left_bits, self.right_bits
        left_U, right_U = x_U >> np.uint64(wr), x_U & np.uint64((1 << wr) - 1)
        for key in self.keys:
            # (L, R) -> (R, L ^ F(R)): invertible whatever F is, so each round is a bijection.
            f_U = _mix(right_U ^ key)
            f_U &= np.uint64((1 << wl) - 1)
            f_U ^= left_U
            left_U, right_U = right_U, f_U
            wl, wr = wr, wl
        left_U <<= np.uint64(wr)
        left_U |= right_U
        return left_U

    def __call__(self, index_U) -> np.ndarray:
        """The images of ``index_U`` (int64, same shape); every index must be in [0, n)."""
        index_U = np.asarray(index_U, np.int64)
        if index_U.size and (index_U.min() < 0 or index_U.max() >= self.n):
            raise IndexError(f"index out of range [0, {self.n}).")
        out_U = self._encrypt(index_U.astype(np.uint64).ravel())
        walk_U = np.flatnonzero(out_U >= self.n)
        while len(walk_U):  # cycle-walking: re-encrypt until inside [0, n) (a bijection of [0, n))
            out_U[walk_U] = self._encrypt(out_U[walk_U])
            walk_U = walk_U[out_U[walk_U] >= self.n]
        return out_U.astype(np.int64).reshape(index_U.shape)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self(np.arange(*index.indices(self.n), dtype=np.int64))
        if np.ndim(index) == 0:
            return int(self(np.array([index], np.int64))[0])
        return self(index)


class IdentityOrder:
    """``order[i] == i`` without an array (``data.shuffle: false``)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return np.arange(*index.indices(self.n), dtype=np.int64)
        if np.ndim(index) == 0:
            return int(index)
        return np.asarray(index, np.int64)


def epoch_order(n: int, key: Sequence[int], algorithm: str, shuffle: bool = True):
    """The order of ``n`` elements for ``key`` (seed, process, epoch, tag): indexable like an array."""
    if not shuffle:
        return IdentityOrder(n)
    if algorithm == "feistel":
        return FeistelPermutation(n, key)
    if algorithm == LEGACY:
        return np.random.default_rng(list(key)).permutation(n)
    raise ValueError(f"unknown shuffle algorithm {algorithm!r}; use one of feistel, {LEGACY}.")


def resolve_algorithm(configured: str, saved: str | None) -> str:
    """The algorithm a resumed iterator uses: ``auto`` takes the checkpoint's (``saved``; a state
    without one predates the key: ``permutation``), an explicit setting must match it."""
    saved = saved or LEGACY
    if configured in ("auto", saved):
        return saved
    raise ValueError(f"the checkpoint's batches come from data.shuffle_algorithm={saved} but this run sets "
                     f"{configured}; resume with data.shuffle_algorithm={saved} (or auto), or start a new run "
                     "directory for the other order.")


def gather_chunks(order, values_U: np.ndarray, chunk: int = CHUNK):
    """``values_U[order[a:b]]`` for consecutive chunks of the order (bounded temporaries)."""
    for a in range(0, len(order), chunk):
        yield values_U[order[a:min(a + chunk, len(order))]]
