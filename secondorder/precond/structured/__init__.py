"""Structured matrices for SINGD's Kronecker factors ``K`` and ``C`` (Lin, Dangel et al. 2024).

Each structure is a class (see :mod:`.base` for the protocol) that wraps one flat tensor, so the
optimizer state holds only plain tensors. :mod:`.ingd` holds the inverse-free factor update
(INGD and IKFAC) and the natural gradient built on them. Select a structure by name with
:func:`get_structure`; names follow singd 0.0.5 where it has one:

================== ====================================== ======================
name               pattern                                stored values (d = dim)
================== ====================================== ======================
dense              any d × d                              d²
diagonal           diagonal                               d
block{b}diagonal   b × b blocks + remainder (default 30)  ≤ b·d
tril / triu        full lower / upper triangle            d(d+1)/2
hierarchical{k1}_{k2}  see :mod:`.hierarchical` (15_15)   ≈ (k1 + k2 + 1)·d
triltoeplitz       lower-triangular Toeplitz              d
triutoeplitz       upper-triangular Toeplitz              d
================== ====================================== ======================
"""

from __future__ import annotations

import re

from .base import StructuredMatrix
from .block_diagonal import BlockDiagonalMatrix, block_diagonal_class
from .dense import DenseMatrix
from .diagonal import DiagonalMatrix
from .hierarchical import HierarchicalMatrix, hierarchical_class
from .toeplitz import TrilToeplitzMatrix, TriuToeplitzMatrix
from .triangular import LowerTriangularMatrix, UpperTriangularMatrix

STRUCTURES: dict[str, type[StructuredMatrix]] = {
    cls.name: cls
    for cls in (
        DenseMatrix,
        DiagonalMatrix,
        BlockDiagonalMatrix,
        LowerTriangularMatrix,
        UpperTriangularMatrix,
        HierarchicalMatrix,
        TrilToeplitzMatrix,
        TriuToeplitzMatrix,
    )
}
"""Fixed-name structures; ``block{b}diagonal`` and ``hierarchical{k1}_{k2}`` take any sizes."""

_BLOCK = re.compile(r"block(\d+)diagonal")
_HIERARCHICAL = re.compile(r"hierarchical(\d+)_(\d+)")


def get_structure(name: str) -> type[StructuredMatrix]:
    """The structured-matrix class called ``name`` (see the module table).

    Raises ``ValueError`` naming ``structures`` for an unknown name, ``TypeError`` for a non-string.
    """
    if not isinstance(name, str):
        raise TypeError(f"Invalid structures: {name!r} (expected a structure name, a str)")
    if name in STRUCTURES:
        return STRUCTURES[name]
    if match := _BLOCK.fullmatch(name):
        if int(match.group(1)) >= 1:
            return block_diagonal_class(int(match.group(1)))
    if match := _HIERARCHICAL.fullmatch(name):
        k1, k2 = int(match.group(1)), int(match.group(2))
        if k1 >= 1 and k2 >= 1:
            return hierarchical_class(k1, k2)
    raise ValueError(
        f"Invalid structures: {name!r} (expected one of {sorted(STRUCTURES)}, 'block<b>diagonal' "
        "or 'hierarchical<k1>_<k2>')"
    )


__all__ = [
    "STRUCTURES",
    "BlockDiagonalMatrix",
    "DenseMatrix",
    "DiagonalMatrix",
    "HierarchicalMatrix",
    "LowerTriangularMatrix",
    "StructuredMatrix",
    "TrilToeplitzMatrix",
    "TriuToeplitzMatrix",
    "UpperTriangularMatrix",
    "block_diagonal_class",
    "get_structure",
    "hierarchical_class",
]
