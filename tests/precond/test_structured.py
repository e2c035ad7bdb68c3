"""Structured matrices of SINGD: every operation against its dense equivalent, per dtype.

References are written here from the definitions (reference/singd.md §7), independently of the
implementation: a dense mask and weight per structure for ``Π̂``, plain dense algebra for
products. Low-precision results are compared with a float64 computation on the same
(rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch

from secondorder.precond.structured import (
    STRUCTURES,
    DenseMatrix,
    DiagonalMatrix,
    StructuredMatrix,
    get_structure,
)
from secondorder.precond.structured.ingd import (
    FactorUpdate,
    natural_gradient,
    scaled_rows,
    update_factors,
)

NAMES = [
    "dense",
    "diagonal",
    "block3diagonal",
    "block30diagonal",
    "tril",
    "triu",
    "hierarchical2_3",
    "hierarchical15_15",
    "triltoeplitz",
    "triutoeplitz",
]
DIMS = (1, 2, 10, 31, 64)
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}


# ---------------------------------------------------------------- independent dense references
def _block_sizes(name: str, dim: int) -> tuple[int, int, int]:
    """Hierarchical (k1, m, k2) by the fill rule A first, then E, then the diagonal."""
    k1, k2 = (int(v) for v in name.removeprefix("hierarchical").split("_"))
    if dim <= k1:
        return dim, 0, 0
    if dim <= k1 + k2:
        return k1, 0, dim - k1
    return k1, dim - k1 - k2, k2


def pattern_and_weight(name: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the free entries, factor Π̂ multiplies each kept entry of a symmetric X by)."""
    ones = torch.ones(dim, dim, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    if name == "dense":
        return ones, ones
    if name == "diagonal":
        return eye, ones
    if name.startswith("block"):
        b = int(name.removeprefix("block").removesuffix("diagonal"))
        ids = torch.arange(dim) // b
        ids[(dim // b) * b :] = dim  # remainder block
        return (ids[:, None] == ids[None, :]).double(), ones
    if name in ("tril", "triu"):
        mask = torch.tril(ones) if name == "tril" else torch.triu(ones)
        return mask, 2 * ones - eye
    if name.startswith("hierarchical"):
        k1, m, _ = _block_sizes(name, dim)
        s = k1 + m
        mask = torch.zeros(dim, dim, dtype=torch.float64)
        weight = torch.ones(dim, dim, dtype=torch.float64)
        mask[:k1, :] = 1
        weight[:k1, k1:] = 2
        mask[k1:s, k1:s] = torch.eye(m, dtype=torch.float64)
        mask[s:, k1:] = 1
        weight[s:, k1:s] = 2
        return mask, weight
    raise AssertionError(name)


def reference_projection(name: str, X: torch.Tensor) -> torch.Tensor:
    """Dense Π̂(X) for symmetric X, from the written-out rules."""
    X = X.double()
    dim = X.shape[0]
    if name.endswith("toeplitz"):
        coeffs = []
        for k in range(dim):
            total = torch.diagonal(X, -k).sum() + (torch.diagonal(X, k).sum() if k else 0.0)
            coeffs.append(total / (dim - k))
        out = torch.zeros(dim, dim, dtype=torch.float64)
        for i in range(dim):
            for j in range(i + 1):
                out[i, j] = coeffs[i - j]
        return out if name == "triltoeplitz" else out.T
    mask, weight = pattern_and_weight(name, dim)
    return X * mask * weight


def random_element(name: str, dim: int, dtype: torch.dtype, seed: int = 0) -> StructuredMatrix:
    """A generic member of the structure (random free parameters, not only symmetric ones)."""
    cls = get_structure(name)
    generator = torch.Generator().manual_seed(seed)
    data = (
        torch.randn(cls.numel(dim), generator=generator, dtype=torch.float64) / max(dim, 1) ** 0.5
    )
    return cls(data.to(dtype), dim)


def random_symmetric(dim: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return X + X.T


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """``actual`` (any dtype) equals a float64 ``expected`` up to the dtype's precision."""
    assert actual.dtype == dtype
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert error <= RTOL[dtype] * scale, f"error {error:.3e} > {RTOL[dtype]:.0e} * {scale:.3e}"


params = pytest.mark.parametrize("name", NAMES)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)


# ---------------------------------------------------------------- projection
@params
@dtypes
def test_from_dense_is_the_written_projection(name, dtype):
    cls = get_structure(name)
    for dim in DIMS:
        X = random_symmetric(dim).to(dtype)
        projected = cls.from_dense(X)
        assert projected.data.shape == (cls.numel(dim),)
        assert_matches(projected.to_dense(), reference_projection(name, X), dtype)


@params
@dtypes
def test_projection_is_idempotent_on_its_symmetric_image(name, dtype):
    """Π̂(sym(Π̂(X))) = Π̂(X): the image of Π̂ is fixed once rectangles are split back in halves."""
    cls = get_structure(name)
    for dim in DIMS:
        first = cls.from_dense(random_symmetric(dim).to(dtype))
        dense = first.to_dense()
        again = cls.from_dense((dense + dense.T) / 2)
        assert_matches(again.to_dense(), first.to_dense().double(), dtype)


@params
@dtypes
def test_to_dense_has_the_structure_pattern(name, dtype):
    for dim in DIMS:
        dense = random_element(name, dim, dtype).to_dense().double()
        if name.endswith("toeplitz"):
            lower = dense if name == "triltoeplitz" else dense.T
            assert torch.equal(lower, torch.tril(lower))
            for k in range(dim):
                assert torch.all(torch.diagonal(lower, -k) == torch.diagonal(lower, -k)[0])
        else:
            mask, _ = pattern_and_weight(name, dim)
            assert torch.all(dense[mask == 0] == 0)


# ---------------------------------------------------------------- products
@params
@dtypes
def test_matmul_and_transpose_matmul(name, dtype):
    for dim in DIMS:
        M = random_element(name, dim, dtype)
        X = torch.randn(dim, 5, dtype=torch.float64).to(dtype)
        dense = M.to_dense().double()
        assert_matches(M.matmul(X), dense @ X.double(), dtype)
        assert_matches(M.tmatmul(X), dense.T @ X.double(), dtype)
        assert_matches(M @ X, dense @ X.double(), dtype)
        assert_matches(M.gram_matmul(X), dense @ dense.T @ X.double(), dtype)


@params
@dtypes
def test_structured_product_stays_in_the_structure(name, dtype):
    for dim in DIMS:
        M, O = random_element(name, dim, dtype, seed=2), random_element(name, dim, dtype, seed=3)
        product = M @ O
        assert type(product) is type(M) and product.dtype == dtype
        expected = M.to_dense().double() @ O.to_dense().double()
        assert_matches(product.to_dense(), expected, dtype)  # the dense product is representable


@params
@dtypes
def test_inner_and_gram(name, dtype):
    """inner(X) = Π̂(Mᵀ X Xᵀ M), inner() = Π̂(Mᵀ M), from_gram(S) = Π̂(S Sᵀ) (singd's from_inner)."""
    cls = get_structure(name)
    for dim in DIMS:
        M = random_element(name, dim, dtype)
        X = (torch.randn(dim, 7, dtype=torch.float64) / 3).to(dtype)
        dense, Xd = M.to_dense().double(), X.double()
        assert_matches(
            M.inner(X).to_dense(), reference_projection(name, dense.T @ Xd @ Xd.T @ dense), dtype
        )
        assert_matches(M.inner().to_dense(), reference_projection(name, dense.T @ dense), dtype)
        assert_matches(cls.from_gram(X).to_dense(), reference_projection(name, Xd @ Xd.T), dtype)


# ---------------------------------------------------------------- scalars and linear space
@params
@dtypes
def test_trace_diagonal_and_linear_space(name, dtype):
    cls = get_structure(name)
    for dim in DIMS:
        M, O = random_element(name, dim, dtype, seed=4), random_element(name, dim, dtype, seed=5)
        Md, Od = M.to_dense().double(), O.to_dense().double()
        assert_matches(M.average_trace(), torch.diagonal(Md).mean(), dtype)
        assert_matches((M + O).to_dense(), Md + Od, dtype)
        assert_matches((M - O).to_dense(), Md - Od, dtype)
        assert_matches((M * 0.5).to_dense(), 0.5 * Md, dtype)
        assert_matches((2.0 * M).to_dense(), 2 * Md, dtype)
        assert_matches((-M).to_dense(), -Md, dtype)
        assert_matches(M.max_abs(), Md.abs().max(), dtype)
        clone = M.clone()
        clone.add_(O, alpha=-2.0).mul_(3.0).diag_add_(1.5)
        assert_matches(
            clone.to_dense(), 3 * (Md - 2 * Od) + 1.5 * torch.eye(dim, dtype=torch.float64), dtype
        )
        assert torch.equal(M.to_dense().double(), Md)  # clone has its own storage
        assert_matches(
            cls.eye(dim, dtype=dtype).to_dense(), torch.eye(dim, dtype=torch.float64), dtype
        )
        assert_matches(
            cls.eye(dim, dtype=dtype, scale=0.5).to_dense(),
            0.5 * torch.eye(dim, dtype=torch.float64),
            dtype,
        )
        assert torch.all(cls.zeros(dim, dtype=dtype).to_dense() == 0)


def test_wrapping_writes_through_to_the_state_tensor():
    data = torch.zeros(DenseMatrix.numel(3))
    DenseMatrix(data, 3).diag_add_(2.0)
    assert torch.equal(data.view(3, 3), 2 * torch.eye(3))


@pytest.mark.parametrize(
    ("name", "dim", "numel"),
    [
        ("dense", 64, 64 * 64),
        ("diagonal", 64, 64),
        ("block30diagonal", 64, 2 * 900 + 16),
        ("tril", 64, 64 * 65 // 2),
        ("hierarchical15_15", 64, 225 + 15 * 49 + 34 + 15 * 34 + 225),
        ("hierarchical15_15", 20, 225 + 15 * 5 + 0 + 0 + 25),
        ("triltoeplitz", 64, 64),
    ],
)
def test_memory_is_the_structure_count(name, dim, numel):
    """Stored values per factor (reference/singd.md §7 table)."""
    assert get_structure(name).numel(dim) == numel


def test_names_and_errors():
    assert set(STRUCTURES) >= {
        "dense",
        "diagonal",
        "block30diagonal",
        "hierarchical15_15",
        "triltoeplitz",
    }
    assert get_structure("block7diagonal").BLOCK_SIZE == 7
    assert get_structure("block7diagonal") is get_structure("block7diagonal")
    assert get_structure("hierarchical4_2").K1 == 4
    for bad in ("sparse", "block0diagonal", "hierarchical0_3"):
        with pytest.raises(ValueError, match="structures"):
            get_structure(bad)
    with pytest.raises(TypeError, match="structures"):
        get_structure(3)
    with pytest.raises(ValueError, match="data"):
        DenseMatrix(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="dim"):
        DiagonalMatrix(torch.zeros(0), 0)
    with pytest.raises(TypeError, match="other"):
        DenseMatrix.eye(2) + DiagonalMatrix.eye(2)
    with pytest.raises(ValueError, match="X"):
        DenseMatrix.eye(2).matmul(torch.zeros(3, 1))


# ---------------------------------------------------------------- the INGD / IKFAC maths
@pytest.mark.parametrize("alpha1", [0.0, 0.5])
@pytest.mark.parametrize("kfac_like", [False, True])
def test_factor_update_is_the_paper_formula(alpha1, kfac_like):
    """One update with random dense K, C, U, G, m = reference/singd.md §4 / §6 written densely."""
    torch.manual_seed(0)
    d_i, d_o, lam, beta1 = 5, 4, 1e-2, 0.1
    K0 = torch.eye(d_i, dtype=torch.float64) + 0.1 * torch.randn(d_i, d_i, dtype=torch.float64)
    C0 = torch.eye(d_o, dtype=torch.float64) + 0.1 * torch.randn(d_o, d_o, dtype=torch.float64)
    A, B = (
        torch.randn(9, d_i, dtype=torch.float64) / 3,
        torch.randn(9, d_o, dtype=torch.float64) / 3,
    )
    U, G = A.T @ A, B.T @ B
    mK0 = torch.randn(d_i, d_i, dtype=torch.float64)
    mK0 = (mK0 + mK0.T) / 10
    mC0 = torch.randn(d_o, d_o, dtype=torch.float64)
    mC0 = (mC0 + mC0.T) / 10
    K, C = DenseMatrix.from_dense(K0), DenseMatrix.from_dense(C0)
    hyper = FactorUpdate(damping=lam, alpha1=alpha1, lr_cov=beta1, kfac_like=kfac_like)
    H_K, H_C = K.inner(A.T), C.inner(B.T)
    new_K, new_C, new_mK, new_mC = update_factors(
        K, C, H_K, H_C, hyper, DenseMatrix.from_dense(mK0), DenseMatrix.from_dense(mC0)
    )
    HK, HC = K0.T @ U @ K0, C0.T @ G @ C0
    I_i, I_o = torch.eye(d_i, dtype=torch.float64), torch.eye(d_o, dtype=torch.float64)
    tr = lambda X: torch.diagonal(X).mean()  # noqa: E731
    if kfac_like:
        mK = 0.5 * (HK + lam * K0.T @ K0 - I_i)
        mC = 0.5 * (HC + lam * C0.T @ C0 - I_o)
    else:
        mK = alpha1 * mK0 + 0.5 * (tr(HC) * HK + lam * tr(C0.T @ C0) * K0.T @ K0 - I_i)
        mC = alpha1 * mC0 + 0.5 * (tr(HK) * HC + lam * tr(K0.T @ K0) * C0.T @ C0 - I_o)
    torch.testing.assert_close(new_mK.to_dense(), mK, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new_mC.to_dense(), mC, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new_K.to_dense(), K0 - beta1 * K0 @ mK, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new_C.to_dense(), C0 - beta1 * C0 @ mC, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(K.to_dense(), K0)  # inputs untouched


def test_normalized_factor_step():
    """normalize_lr_cov: ½(1 − α₁) scale and β₁ / max(1, max|m|)."""
    K, C = DenseMatrix.eye(3, dtype=torch.float64), DenseMatrix.eye(2, dtype=torch.float64)
    A = torch.full((4, 3), 10.0, dtype=torch.float64)
    B = torch.ones(4, 2, dtype=torch.float64)
    hyper = FactorUpdate(damping=0.0, alpha1=0.5, lr_cov=0.1, normalize_lr_cov=True)
    new_K, _, m_K, _ = update_factors(K, C, K.inner(A.T), C.inner(B.T), hyper)
    expected_m = 0.25 * (
        4.0 * torch.full((3, 3), 400.0, dtype=torch.float64) - torch.eye(3, dtype=torch.float64)
    )
    torch.testing.assert_close(m_K.to_dense(), expected_m)
    step = 0.1 / expected_m.abs().max()
    torch.testing.assert_close(
        new_K.to_dense(), torch.eye(3, dtype=torch.float64) - step * expected_m
    )


def test_natural_gradient_and_rows():
    torch.manual_seed(0)
    K = DenseMatrix.from_dense(torch.randn(4, 4, dtype=torch.float64))
    C = DiagonalMatrix(torch.rand(3, dtype=torch.float64), 3)
    grad = torch.randn(3, 4, dtype=torch.float64)
    Kd, Cd = K.to_dense(), C.to_dense()
    torch.testing.assert_close(natural_gradient(K, C, grad), Cd @ Cd.T @ grad @ Kd @ Kd.T)
    a, g = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 2, dtype=torch.float64)
    A, B = scaled_rows(
        a, g, num_examples=5, num_positions=15, approx="expand", loss_average="batch"
    )
    torch.testing.assert_close(A.T @ A, torch.einsum("nti,ntj->ij", a, a) / 15)
    torch.testing.assert_close(B.T @ B, torch.einsum("nti,ntj->ij", g, g) / 5)
    A, B = scaled_rows(
        a, g, num_examples=5, num_positions=15, approx="reduce", loss_average="batch+sequence"
    )
    torch.testing.assert_close(A.T @ A, torch.einsum("ni,nj->ij", a.mean(1), a.mean(1)) / 5)
    torch.testing.assert_close(B.T @ B, torch.einsum("ni,nj->ij", g.sum(1), g.sum(1)) * 15 / 25)
    _, B = scaled_rows(a, g, num_examples=5, num_positions=15, loss_average=None)
    torch.testing.assert_close(B.T @ B, torch.einsum("nti,ntj->ij", g, g))
    with pytest.raises(ValueError, match="kfac_approx"):
        scaled_rows(a, g, num_examples=5, num_positions=15, approx="mean")
