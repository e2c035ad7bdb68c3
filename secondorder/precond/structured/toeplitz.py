"""Triangular Toeplitz factors (Lin, Dangel et al. 2024, SINGD §3.2; reference/singd.md §7).

A lower-triangular Toeplitz matrix is a polynomial in the down-shift ``Z``:
``L(t) = Σ_k t_k Z^k``, one value ``t_k`` per sub-diagonal (``t_0`` on the diagonal), so the
structure is a commutative algebra containing ``I``; the upper-triangular version is
``U(t) = L(t)ᵀ``. ``Π̂(X)`` for symmetric ``X``: ``t_0 = mean(diag X)`` and, for ``k ≥ 1``,
``t_k = (sum of the k-th sub- and super-diagonal of X) / (d − k)`` (tied entries averaged,
both triangles counted).

Unlike singd 0.0.5 (dense ``X Xᵀ`` extraction and a ``(2d−1)``-tap ``conv1d``: O(n d²)), every
product here is an FFT convolution along the matrix dimension: ``M X`` and ``Mᵀ X`` cost
O(n d log d), ``Π̂(S Sᵀ)`` is the summed autocorrelation of the columns of ``S``
(O(n d log d)), and ``Π̂(Mᵀ M)`` is O(d log d). bf16/fp16 run the FFTs in float32.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import StructuredMatrix, compute_dtype


def _fft_size(dim: int) -> int:
    """FFT length with no wrap-around for linear convolutions of two length-``dim`` signals."""
    return 2 * dim


def causal_convolution(coefficients: Tensor, X: Tensor) -> Tensor:
    """``L(t) X``: ``Y_i = Σ_{k ≤ i} t_k X_{i−k}`` along dim 0.

    ``coefficients`` (d,), ``X`` (d, n) -> (d, n), computed by FFT in ``X``'s compute dtype.
    """
    dim = coefficients.shape[0]
    work = compute_dtype(X.dtype)
    size = _fft_size(dim)
    spectrum = torch.fft.rfft(coefficients.to(work), n=size).unsqueeze(1) * torch.fft.rfft(
        X.to(work), n=size, dim=0
    )
    return torch.fft.irfft(spectrum, n=size, dim=0)[:dim].to(X.dtype)


def _correlation(first: Tensor, second: Tensor) -> Tensor:
    """``r_k = Σ_l first_l second_{l+k}`` for ``k = 0..d−1`` (vectors of length d)."""
    dim = first.shape[0]
    size = _fft_size(dim)
    spectrum = torch.fft.rfft(first, n=size).conj() * torch.fft.rfft(second, n=size)
    return torch.fft.irfft(spectrum, n=size)[:dim]


def _normalise_lags(raw: Tensor) -> Tensor:
    """Turn ``raw_k`` = sum of the k-th sub-diagonal of a symmetric matrix into ``Π̂``'s ``t_k``."""
    dim = raw.shape[0]
    count = torch.arange(dim, 0, -1, dtype=raw.dtype, device=raw.device)
    factor = torch.full_like(raw, 2.0)
    factor[0] = 1.0
    return raw * factor / count


class TrilToeplitzMatrix(StructuredMatrix):
    """Lower-triangular Toeplitz ``d × d`` matrix; ``data = (t_0, …, t_{d−1})`` (``d`` values)."""

    name = "triltoeplitz"
    LOWER: ClassVar[bool] = True

    @classmethod
    def numel(cls, dim: int) -> int:
        return dim

    @classmethod
    def from_dense(cls, sym: Tensor) -> StructuredMatrix:
        dim = cls._check_square(sym)
        raw = torch.stack([sym.diagonal(-k).sum() for k in range(dim)])
        return cls(_normalise_lags(raw), dim)

    @classmethod
    def from_gram(cls, S: Tensor) -> StructuredMatrix:
        """``Π̂(S Sᵀ)`` from the summed column autocorrelations of ``S`` (d, n)."""
        dim = S.shape[0]
        work = S.to(compute_dtype(S.dtype))
        size = _fft_size(dim)
        spectrum = torch.fft.rfft(work, n=size, dim=0)
        power = (spectrum.real.square() + spectrum.imag.square()).sum(1)
        raw = torch.fft.irfft(power, n=size)[:dim]
        return cls(_normalise_lags(raw).to(S.dtype), dim)

    def to_dense(self) -> Tensor:
        lags = torch.arange(self.dim, device=self.device)
        offsets = lags.unsqueeze(1) - lags.unsqueeze(0)
        dense = self.data[offsets.clamp(min=0)] * (offsets >= 0)
        return dense if self.LOWER else dense.T

    def _lower_matmul(self, X: Tensor) -> Tensor:
        return causal_convolution(self.data, X)

    def _lower_tmatmul(self, X: Tensor) -> Tensor:
        return causal_convolution(self.data, X.flip(0)).flip(0)

    def matmul(self, X: Tensor) -> Tensor:
        self._check_rows(X)
        return self._lower_matmul(X) if self.LOWER else self._lower_tmatmul(X)

    def tmatmul(self, X: Tensor) -> Tensor:
        self._check_rows(X)
        return self._lower_tmatmul(X) if self.LOWER else self._lower_matmul(X)

    def compose(self, other: StructuredMatrix) -> StructuredMatrix:
        """Product of two polynomials in the shift, truncated at degree ``d − 1`` (commutes)."""
        self._check_same(other)
        return self._like(causal_convolution(self.data, other.data.unsqueeze(1)).squeeze(1))

    def inner(self, X: Tensor | None = None) -> StructuredMatrix:
        """``Π̂(Mᵀ X Xᵀ M)``; for ``X = None`` in closed form: the k-th sub-diagonal of
        ``LᵀL`` (and of ``LLᵀ``) sums to ``Σ_l (d − k − l) t_l t_{l+k}``."""
        if X is not None:
            return self.from_gram(self.tmatmul(X))
        work = self.data.to(compute_dtype(self.dtype))
        dim = self.dim
        lags = torch.arange(dim, dtype=work.dtype, device=work.device)
        raw = _correlation((dim - lags) * work, work) - lags * _correlation(work, work)
        return self._like(_normalise_lags(raw).to(self.dtype))

    def average_trace(self) -> Tensor:
        return self.data[0].clone()

    def diag_add_(self, value: float) -> StructuredMatrix:
        self.data[0].add_(value)
        return self


class TriuToeplitzMatrix(TrilToeplitzMatrix):
    """Upper-triangular Toeplitz ``U(t) = L(t)ᵀ``; ``data = (t_0, …, t_{d−1})`` (``t_k`` on the
    k-th super-diagonal)."""

    name = "triutoeplitz"
    LOWER = False
