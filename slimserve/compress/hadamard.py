"""Hadamard matrices of the widths LLMs use, and randomized orthogonal rotations built from them.

A Hadamard matrix H (entries +-1, H H^T = n I) exists for n = 2^k (Sylvester) and for n = q + 1 with q a prime
of the form 4m + 3 (Paley I); Kronecker products of those cover most hidden and MLP widths (576 = 12*12*4,
896 = 224*4, 1536 = 12*128, 4864 = 152*32, 14336 = 224*64).
A width none of them covers falls back to H_{2^k} (x) a random orthogonal matrix of the odd remainder: still
orthogonal and still mixing every coordinate with every other."""

from __future__ import annotations

from functools import lru_cache

import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 (Paley construction I) for a prime q = 3 (mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in residues else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]  # Q[i, j] = chi(j - i), skew-symmetric
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@lru_cache(maxsize=32)
def _factors(n: int) -> tuple[int, ...] | None:
    """Orders of Sylvester/Paley matrices whose Kronecker product has order n, or None."""
    if _power_of_two(n):
        return (n,)
    for p in range(n, 3, -4):  # largest Paley factor first: fewer Kronecker levels
        if n % p == 0 and p % 4 == 0 and _is_prime(p - 1) and (p - 1) % 4 == 3:
            rest = _factors(n // p)
            if rest is not None:
                return (p, *rest)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """An n x n Hadamard matrix (float64, entries +-1), or None when no construction here covers n."""
    factors = _factors(n)
    if factors is None:
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        h = torch.kron(h, sylvester(f) if _power_of_two(f) else paley(f - 1))
    return h


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian matrix with the signs of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """Orthogonal n x n rotation D H / sqrt(n): a Hadamard matrix with rows of random sign (QuaRot's randomized
    Hadamard). Falls back to H_{2^k} (x) a random orthogonal block when no Hadamard matrix of order n is built."""
    h = hadamard(n)
    if h is None:
        two = n & -n  # largest power of two dividing n
        h = torch.kron(sylvester(two), random_orthogonal(n // two, generator) * (n // two) ** 0.5)
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs.unsqueeze(1) * h / n**0.5
