"""The structured-matrix protocol shared by every SINGD factor structure.

A structure is a set 𝓛 of ``d × d`` matrices that is closed under addition and multiplication
and contains ``I`` (a matrix Lie-algebra/group pair, Lin et al. 2023 §3), together with a
projection ``Π̂: Sym(d) → 𝓛`` that maps a symmetric matrix onto the structure's free
parameters (Lin, Dangel et al. 2024, "SINGD", §3.2 and Table 1; reference/singd.md §7).

Every structured matrix holds **one flat tensor** ``data`` (1-D, length ``numel(dim)``) plus its
dimension; the blocks of the structure are views into ``data``. The optimizer keeps only that
flat tensor in ``optimizer.state`` (so ``state_dict`` holds plain tensors, loads with
``torch.load(weights_only=True)`` and reshards through DCP) and wraps it in the class on the
fly: wrapping is free and in-place operations on the wrapper write through to the state.

Conventions (``d = dim``):

* ``to_dense()`` — the represented ``(d, d)`` matrix ``M``;
* ``from_dense(X)`` — ``Π̂(X)`` for a symmetric ``(d, d)`` ``X`` (symmetric blocks copied,
  off-diagonal rectangles standing for both triangles doubled, tied parameters averaged);
* ``from_gram(S)`` — ``Π̂(S Sᵀ)`` for ``S`` of shape ``(d, n)``, without forming ``S Sᵀ``
  where the structure allows;
* ``matmul(X)`` — ``M X`` and ``tmatmul(X)`` — ``Mᵀ X`` for ``X`` of shape ``(d, n)``;
* ``compose(other)`` / ``@`` — the structured product ``M O`` (stays in 𝓛);
* ``inner(X)`` — ``Π̂(Mᵀ X Xᵀ M)`` (``X`` of shape ``(d, n)``; ``None`` means ``X = I``,
  i.e. ``Π̂(Mᵀ M)``): singd's ``from_inner``;
* ``average_trace()`` — ``tr̄(M) = tr(M)/d`` (0-d tensor), ``diag_add_(v)`` — ``M += v I``;
* ``add_``, ``mul_``, ``+``, ``-``, scalar ``*`` — linear-space operations on ``data``.

All operations keep ``data``'s dtype (float64, float32, bfloat16 and float16 all work; the few
kernels CPU lacks in low precision are run in float32 and cast back).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor


class StructuredMatrix:
    """A square matrix with structure, stored as one flat tensor (see the module docstring).

    Args:
        data: 1-D tensor of length ``numel(dim)`` holding the free parameters. Not copied:
            in-place operations write into it.
        dim: the matrix size ``d``.

    Subclasses define ``numel``, ``from_dense``, ``to_dense``, ``matmul``, ``tmatmul``,
    ``compose``, ``average_trace`` and ``diag_add_``; the rest has generic versions that
    subclasses override when structure makes them cheaper.
    """

    name: ClassVar[str] = "structured"
    """The key that selects this structure in ``SINGD(structures=...)``."""

    def __init__(self, data: Tensor, dim: int) -> None:
        if not isinstance(data, Tensor):
            raise TypeError(f"Invalid data: expected a tensor, got {type(data).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Invalid dim: {dim!r} (expected an int >= 1)")
        expected = self.numel(dim)
        if data.ndim != 1 or data.numel() != expected:
            raise ValueError(
                f"Invalid data: {type(self).__name__} of dim {dim} needs a 1-D tensor of "
                f"{expected} values, got shape {tuple(data.shape)}"
            )
        self.data = data
        self.dim = dim

    # ------------------------------------------------------------------ construction
    @classmethod
    def numel(cls, dim: int) -> int:
        """Number of stored values for a ``dim × dim`` matrix (memory per factor)."""
        raise NotImplementedError

    @classmethod
    def zeros(
        cls, dim: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> StructuredMatrix:
        """The zero matrix of size ``dim``."""
        return cls(torch.zeros(cls.numel(dim), dtype=dtype, device=device), dim)

    @classmethod
    def eye(
        cls,
        dim: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        scale: float = 1.0,
    ) -> StructuredMatrix:
        """``scale · I`` of size ``dim`` (SINGD's initial ``K``, ``C``: ``init_scale · I``)."""
        out = cls.zeros(dim, dtype=dtype, device=device)
        out.diag_add_(scale)
        return out

    @classmethod
    def from_dense(cls, sym: Tensor) -> StructuredMatrix:
        """``Π̂(sym)``: project a symmetric ``(d, d)`` matrix onto the structure."""
        raise NotImplementedError

    @classmethod
    def from_gram(cls, S: Tensor) -> StructuredMatrix:
        """``Π̂(S Sᵀ)`` for ``S`` of shape ``(d, n)``."""
        return cls.from_dense(S @ S.T)

    @staticmethod
    def _check_square(matrix: Tensor, name: str = "sym") -> int:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"Invalid {name}: expected a square matrix, got shape {tuple(matrix.shape)}"
            )
        return matrix.shape[0]

    def _check_rows(self, X: Tensor, name: str = "X") -> None:
        if X.ndim != 2 or X.shape[0] != self.dim:
            raise ValueError(
                f"Invalid {name}: expected shape ({self.dim}, n), got {tuple(X.shape)}"
            )

    def _like(self, data: Tensor) -> StructuredMatrix:
        """A matrix of the same class and dim around ``data``."""
        return type(self)(data, self.dim)

    def _check_same(self, other: StructuredMatrix) -> None:
        if type(other) is not type(self) or other.dim != self.dim:
            raise TypeError(
                f"Invalid other: expected a {type(self).__name__} of dim {self.dim}, got "
                f"{type(other).__name__} of dim {getattr(other, 'dim', '?')}"
            )

    def clone(self) -> StructuredMatrix:
        """A copy with its own storage."""
        return self._like(self.data.clone())

    # ------------------------------------------------------------------ dense views
    def to_dense(self) -> Tensor:
        """The represented ``(d, d)`` matrix."""
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        """``(d, d)``."""
        return torch.Size((self.dim, self.dim))

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the stored values."""
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        """device of the stored values."""
        return self.data.device

    # ------------------------------------------------------------------ products
    def matmul(self, X: Tensor) -> Tensor:
        """``M X`` for ``X`` of shape ``(d, n)``; returns ``(d, n)``."""
        raise NotImplementedError

    def tmatmul(self, X: Tensor) -> Tensor:
        """``Mᵀ X`` for ``X`` of shape ``(d, n)``; returns ``(d, n)``."""
        raise NotImplementedError

    def compose(self, other: StructuredMatrix) -> StructuredMatrix:
        """The structured product ``M O`` (same structure and dim)."""
        raise NotImplementedError

    def gram_matmul(self, X: Tensor) -> Tensor:
        """``M Mᵀ X`` for ``X`` of shape ``(d, n)`` (SINGD's preconditioner ``K Kᵀ`` applied)."""
        return self.matmul(self.tmatmul(X))

    def __matmul__(self, other: StructuredMatrix | Tensor) -> StructuredMatrix | Tensor:
        if isinstance(other, StructuredMatrix):
            return self.compose(other)
        return self.matmul(other)

    def inner(self, X: Tensor | None = None) -> StructuredMatrix:
        """``Π̂(Mᵀ X Xᵀ M)`` for ``X`` of shape ``(d, n)``; ``X=None`` gives ``Π̂(Mᵀ M)``.

        With ``X = Aᵀ`` (``A`` the ``(N, d)`` scaled layer inputs) this is SINGD's
        ``H_K = Π̂(Kᵀ U K)`` without forming ``U`` (reference/singd.md §7).
        """
        if X is None:
            return self.from_gram(self.to_dense().T)
        self._check_rows(X)
        return self.from_gram(self.tmatmul(X))

    # ------------------------------------------------------------------ scalars
    def average_trace(self) -> Tensor:
        """``tr̄(M) = tr(M) / d`` as a 0-d tensor."""
        raise NotImplementedError

    def diag_add_(self, value: float) -> StructuredMatrix:
        """``M ← M + value · I`` in place; returns ``self``."""
        raise NotImplementedError

    def max_abs(self) -> Tensor:
        """Largest absolute stored value (singd's ``infinity_vector_norm``), a 0-d tensor."""
        return self.data.abs().max()

    # ------------------------------------------------------------------ linear space
    def add_(self, other: StructuredMatrix, alpha: float = 1.0) -> StructuredMatrix:
        """``M ← M + alpha · O`` in place; returns ``self``."""
        self._check_same(other)
        self.data.add_(other.data, alpha=alpha)
        return self

    def mul_(self, value: float) -> StructuredMatrix:
        """``M ← value · M`` in place; returns ``self``."""
        self.data.mul_(value)
        return self

    def __add__(self, other: StructuredMatrix) -> StructuredMatrix:
        self._check_same(other)
        return self._like(self.data + other.data)

    def __sub__(self, other: StructuredMatrix) -> StructuredMatrix:
        self._check_same(other)
        return self._like(self.data - other.data)

    def __mul__(self, value: float) -> StructuredMatrix:
        if isinstance(value, StructuredMatrix):
            raise TypeError("Invalid value: use @ for the product of two structured matrices")
        return self._like(self.data * value)

    __rmul__ = __mul__

    def __neg__(self) -> StructuredMatrix:
        return self._like(-self.data)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype}, numel={self.data.numel()})"
        )


LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to run kernels CPU lacks in half precision in (float32 for bf16/fp16)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype
