"""SINGD: agreement with singd 0.0.5, the IKFAC theorem, and the singd defects fixed here
(reference/singd.md §16, §17, §21)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from secondorder import SINGD
from secondorder.precond.linalg import NumericalWarning
from secondorder.precond.structured import get_structure

STRUCTURE_NAMES = (
    "dense",
    "diagonal",
    "block3diagonal",
    "tril",
    "triu",
    "hierarchical2_3",
    "triltoeplitz",
    "triutoeplitz",
)


def mlp(
    seed: int = 0, dtype: torch.dtype = torch.float64, bias: bool = True, inplace: bool = False
) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 9, bias=bias), nn.ReLU(inplace=inplace), nn.Linear(9, 4, bias=bias)
    ).to(dtype)


def batch(
    seed: int, n: int = 16, dtype: torch.dtype = torch.float64, shape: tuple[int, ...] = (6,)
):
    generator = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn((n, *shape), generator=generator, dtype=torch.float64).to(dtype)
    y = torch.randn((n, *shape[:-1], 4), generator=generator, dtype=torch.float64).to(dtype)
    return x, y


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum(-1).mean()


def train(model, opt, steps: int, seed0: int = 0, **batch_kwargs) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = batch(seed0 + step, dtype=next(model.parameters()).dtype, **batch_kwargs)
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def make(params, **kwargs) -> SINGD:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # singd 0.0.5's own defaults for everything the tests do not set
        return SINGD(params, **{"lr": 0.05, "lr_cov": 5e-2, "T": 1, "graft": "none",
                              "init_scale": 1.0, "normalize_lr_cov": False,
                              "loss_average": "batch", **kwargs})


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_same_training_state(
    model_a, opt_a, model_b, opt_b, *, exact: bool = False, rtol=1e-12, atol=1e-12
):
    check = (
        (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0))
        if exact
        else (lambda a, b: torch.testing.assert_close(a, b, rtol=rtol, atol=atol))
    )
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        check(p, q)
        assert set(opt_a.state[p]) == set(opt_b.state[q])
        for key in opt_a.state[p]:
            assert opt_a.state[p][key].dtype == opt_b.state[q][key].dtype
            check(opt_a.state[p][key], opt_b.state[q][key])


# ============================================================================ singd 0.0.5
SINGD_CASES = {
    "dense-ingd": dict(),
    "diagonal-ingd": dict(structures=("diagonal", "diagonal")),
    "mixed-ingd": dict(structures=("dense", "diagonal")),
    "dense-ikfac": dict(kfac_like=True, alpha1=0.0),
    "diagonal-ikfac": dict(kfac_like=True, alpha1=0.0, structures=("diagonal", "diagonal")),
    "dense-T3-decay-nobias": dict(T=3, weight_decay=1e-2, bias=False),
    "diagonal-normalized-nomomentum": dict(
        structures=("diagonal", "diagonal"), normalize_lr_cov=True, momentum=0.0
    ),
    "dense-sequence-expand": dict(shape=(5, 6)),
    "dense-sequence-reduce": dict(shape=(5, 6), kfac_approx="reduce"),
    "diagonal-sequence-batch+sequence": dict(shape=(5, 6), loss_average="batch+sequence"),
    "dense-conv-expand": dict(conv=True),
    "diagonal-conv-reduce": dict(
        conv=True, kfac_approx="reduce", structures=("diagonal", "diagonal")
    ),
}


def conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 4),
    ).double()


@pytest.mark.parametrize("case", list(SINGD_CASES))
def test_agrees_with_singd_0_0_5(case):
    """Dense and diagonal structures reproduce singd 0.0.5 to 1e-10 in float64 over 20 steps:
    parameters, K, C, m_K, m_C and momentum buffers after every step (reference/singd.md §16)."""
    singd_optimizer = pytest.importorskip("singd.optim.optimizer")
    settings = dict(SINGD_CASES[case])
    shape = settings.pop("shape", (6,))
    conv = settings.pop("conv", False)
    model = conv_net(0) if conv else mlp(bias=settings.pop("bias", True))
    reference_model = copy.deepcopy(model)
    shape = (2, 8, 8) if conv else shape
    common = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, T=1, lr_cov=5e-2)
    common.update(settings)
    ours = make(model, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = singd_optimizer.SINGD(reference_model, **common)
    worst = 0.0
    for step in range(20):
        x, y = batch(step, shape=shape)
        if conv:
            y = y[:, 0, 0, :]
        for net, opt in ((model, ours), (reference_model, theirs)):
            opt.zero_grad()
            mse(net(x), y).backward()
            opt.step()
        for (name, layer), (_, ref_layer) in zip(
            linear_layers(model), linear_layers(reference_model), strict=True
        ):
            K, C = ours.factors(layer.weight)
            pairs = [
                (K.to_dense(), theirs.Ks[name].to_dense()),
                (C.to_dense(), theirs.Cs[name].to_dense()),
            ]
            state = ours.state[layer.weight]
            if name in theirs.m_Ks:
                pairs.append(
                    (type(K)(state["m_K"], K.dim).to_dense(), theirs.m_Ks[name].to_dense())
                )
                pairs.append(
                    (type(C)(state["m_C"], C.dim).to_dense(), theirs.m_Cs[name].to_dense())
                )
            else:
                assert "m_K" not in state
            for p, q in zip(layer.parameters(), ref_layer.parameters(), strict=True):
                pairs.append((p, q))
                if "momentum_buffer" in theirs.state[q]:
                    pairs.append(
                        (ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])
                    )
            for a, b in pairs:
                worst = max(worst, (a - b).abs().max().item())
    assert worst < 1e-10, worst
    # the run is not trivial: the factors moved away from the identity
    K, _ = ours.factors(linear_layers(model)[0][1].weight)
    assert (K.to_dense() - torch.eye(K.dim, dtype=torch.float64)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "structure", ["block30diagonal", "hierarchical15_15", "triltoeplitz", "triutoeplitz"]
)
def test_sparse_structures_agree_with_singd_in_float32(structure, monkeypatch):
    """The structures singd runs in float32 only match it to float32 rounding (reference/singd.md
    §16.1); dims 41 and 36 exercise the block remainder and the hierarchical diagonal part.

    singd 0.0.5's block-diagonal class assumes symmetric blocks: its ``rmatmat`` (``Kᵀ X``)
    returns ``K X`` and its ``from_inner()`` returns ``Π̂(K Kᵀ)`` instead of ``Π̂(Kᵀ K)``, so
    once ``K`` is not symmetric (after the first update) its preconditioner is ``K²`` rather
    than ``K Kᵀ``. Both are corrected here so that everything else can be compared.
    """
    singd_optimizer = pytest.importorskip("singd.optim.optimizer")
    if structure == "block30diagonal":
        from singd.structures.blockdiagonal import Block30DiagonalMatrix

        original = Block30DiagonalMatrix.from_inner

        def rmatmat(self, mat):
            top = self._blocks.shape[0] * self.BLOCK_DIM
            head = mat[:top].reshape(self._blocks.shape[0], self.BLOCK_DIM, mat.shape[1])
            head = (self._blocks.transpose(1, 2) @ head).reshape(top, mat.shape[1])
            return torch.cat([head, self._last.T @ mat[top:]])

        def from_inner(self, X=None):
            if X is not None:
                return original(self, X)
            blocks = self._blocks.transpose(1, 2) @ self._blocks
            return type(self)(blocks, self._last.T @ self._last)

        monkeypatch.setattr(Block30DiagonalMatrix, "rmatmat", rmatmat)
        monkeypatch.setattr(Block30DiagonalMatrix, "from_inner", from_inner)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 36), nn.Tanh(), nn.Linear(36, 4))
    reference_model = copy.deepcopy(model)
    settings = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, T=1, lr_cov=5e-2)
    settings["structures"] = (structure, structure)
    ours = make(model, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = singd_optimizer.SINGD(reference_model, **settings)
        for step in range(10):
            x, y = batch(step, dtype=torch.float32, shape=(40,))
            for net, opt in ((model, ours), (reference_model, theirs)):
                opt.zero_grad()
                mse(net(x), y).backward()
                opt.step()
    for (name, layer), (_, ref_layer) in zip(
        linear_layers(model), linear_layers(reference_model), strict=True
    ):
        K, C = ours.factors(layer.weight)
        torch.testing.assert_close(K.to_dense(), theirs.Ks[name].to_dense(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(C.to_dense(), theirs.Cs[name].to_dense(), rtol=1e-4, atol=1e-5)
        for p, q in zip(layer.parameters(), ref_layer.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ============================================================================ IKFAC theorem
def _tracking_errors(beta1: float, structures=("dense", "dense")) -> tuple[float, float]:
    """Relative error of K Kᵀ vs (EMA U + λI)⁻¹ and C Cᵀ vs (EMA G + λI)⁻¹ after 3/β₁ steps
    (fixed batch, lr = 0, EMA started at S₀ + λI = I; reference/singd.md §6)."""
    damping = 1e-2
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    opt = make(model, lr=0.0, lr_cov=beta1, damping=damping, kfac_like=True, structures=structures)
    steps = round(3 / beta1)
    for _ in range(steps):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        a = torch.cat([x, torch.ones(32, 1, dtype=torch.float64)], 1)
        g = 2 * (model(x) - y)  # per-example loss gradient w.r.t. the output
    U, G = a.T @ a / 32, g.T @ g / 32
    errors = []
    for factor, stat in zip(opt.factors(model.weight), (U, G), strict=True):
        eye = torch.eye(stat.shape[0], dtype=torch.float64)
        decay = (1 - beta1) ** steps
        target = torch.linalg.inv(decay * eye + (1 - decay) * (stat + damping * eye))
        if structures[0] == "diagonal":
            target = torch.diag(
                1 / torch.diagonal(decay * eye + (1 - decay) * (stat + damping * eye))
            )
        dense = factor.to_dense()
        errors.append(((dense @ dense.T - target).norm() / target.norm()).item())
    return errors[0], errors[1]


def test_kfac_like_tracks_the_damped_kfac_inverse_to_first_order_in_beta1():
    """IKFAC's K Kᵀ (C Cᵀ) tracks K-FAC's (EMA + λI)⁻¹; the error halves with β₁ (SINGD theorem)."""
    errors = {beta: _tracking_errors(beta) for beta in (4e-2, 2e-2, 1e-2)}
    for factor in (0, 1):
        series = [errors[beta][factor] for beta in (4e-2, 2e-2, 1e-2)]
        for larger, smaller in zip(series, series[1:], strict=False):
            assert 1.6 < larger / smaller < 2.5, series
        assert series[-1] < 2e-3, series


def test_diagonal_kfac_like_tracks_the_diagonal_inverse():
    """K_ii² → 1/(EMA U_ii + λ) (reference/singd.md §21.2), again to first order in β₁."""
    errors = [_tracking_errors(beta, ("diagonal", "diagonal")) for beta in (2e-2, 1e-2)]
    for factor in (0, 1):
        assert 1.6 < errors[0][factor] / errors[1][factor] < 2.5, errors
        assert errors[1][factor] < 1e-3, errors


# ============================================================================ fixed singd defects
@pytest.mark.parametrize("name", STRUCTURE_NAMES)
@pytest.mark.parametrize(
    ("model_dtype", "factor_dtype"),
    [
        (torch.float64, None),
        (torch.float32, None),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=["fp64", "fp32", "fp32-model-bf16-factors", "bf16"],
)
def test_every_structure_trains_in_every_dtype(name, model_dtype, factor_dtype):
    """float64 works for every structure (singd: block/hierarchical/Toeplitz raise), as do fp32
    and bf16; factor dtypes are kept and the state stays finite."""
    model = mlp(dtype=model_dtype)
    opt = make(model, structures=(name, name), preconditioner_dtype=factor_dtype, lr=0.02)
    x, y = batch(0, dtype=model_dtype)
    losses = []
    for _ in range(12):  # one fixed batch: the loss must fall
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    expected = factor_dtype or model_dtype
    for _, layer in linear_layers(model):
        K, C = opt.factors(layer.weight)
        assert K.dtype == C.dtype == expected
        assert type(K) is get_structure(name)
        assert torch.isfinite(K.data).all() and torch.isfinite(C.data).all()
        assert (K.to_dense().double() - torch.eye(K.dim, dtype=torch.float64)).abs().max() > 1e-3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


def _scaler_run(mode: str, clip: float | None, steps: int = 6):
    """float32 MLP; ``mode`` in plain / plain-unclipped-stats (no scaler; a disabled scaler passed
    as ``grad_scaler``, so statistics are never rescaled to the clipped gradient) / step
    (scaler.step only) / unscale (unscale_ + clip, grad_scaler given) / detect (unscale_ + clip,
    scale measured)."""
    model = mlp(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    given = {"unscale": scaler, "plain-unclipped-stats": torch.amp.GradScaler("cpu", enabled=False)}
    opt = make(model, grad_scaler=given.get(mode))
    for step in range(steps):
        x, y = batch(step, dtype=torch.float32)
        opt.zero_grad()
        loss = mse(model(x), y)
        if mode.startswith("plain"):
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            continue
        scaler.scale(loss).backward()
        if mode in ("unscale", "detect"):
            scaler.unscale_(opt)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
    return model, opt


@pytest.mark.parametrize("mode", ["step", "unscale", "detect"])
def test_grad_scaler_with_unscale_and_clipping(mode):
    """GradScaler works, including unscale_ followed by gradient clipping (singd crashes there),
    and gives the run without a scaler."""
    clip = None if mode == "step" else 1e9
    reference = _scaler_run("plain", clip)
    result = _scaler_run(mode, clip)
    assert_same_training_state(*reference, *result, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["unscale", "detect"])
def test_grad_scaler_with_active_clipping_matches_clipping_without_scaler(mode):
    """Measured scale: statistics follow the clipped gradient, with or without a scaler.
    ``grad_scaler=``: statistics of the unclipped gradient, as a run without scaler that asks
    for them."""
    clip = 0.05
    reference = _scaler_run("plain" if mode == "detect" else "plain-unclipped-stats", clip)
    result = _scaler_run(mode, clip)
    assert_same_training_state(*reference, *result, rtol=1e-5, atol=1e-6)
    other = _scaler_run("plain-unclipped-stats" if mode == "detect" else "plain", clip)
    assert not torch.allclose(flat_params(result[0]), flat_params(other[0]), rtol=1e-5, atol=1e-6)


def test_grad_scaler_skips_inf_steps_and_drops_their_statistics():
    model = mlp(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = make(model)
    train(model, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    x, y = batch(5, dtype=torch.float32)
    opt.zero_grad()
    scaler.scale(mse(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    after = opt.state_dict()
    for key, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after["state"][key][name])
    assert not opt.capture.has_records()


def _checkpoint_roundtrip(save, load, T: int = 3):
    """Train 4 steps, checkpoint, restore into a fresh copy, train 5 more: = an unbroken run."""
    model = mlp()
    opt = make(model, T=T, structures=("hierarchical2_3", "triltoeplitz"))
    train(model, opt, 4)
    blob = save(model, opt)
    fresh_model = copy.deepcopy(model)
    fresh_opt = make(fresh_model, T=T, structures=("hierarchical2_3", "triltoeplitz"))
    load(fresh_model, fresh_opt, blob)
    assert_same_training_state(model, opt, fresh_model, fresh_opt, exact=True)
    train(model, opt, 5, seed0=10)
    train(fresh_model, fresh_opt, 5, seed0=10)
    assert_same_training_state(model, opt, fresh_model, fresh_opt, exact=True)


def test_checkpoint_loads_with_weights_only():
    def save(model, opt):
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        return buffer.getvalue()

    def load(model, opt, blob):
        opt.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))

    _checkpoint_roundtrip(save, load)


def test_checkpoint_through_dcp_state_dict():
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    def save(model, opt):
        buffer = io.BytesIO()
        torch.save(get_optimizer_state_dict(model, opt), buffer)
        return buffer.getvalue()

    def load(model, opt, blob):
        set_optimizer_state_dict(model, opt, torch.load(io.BytesIO(blob), weights_only=True))

    _checkpoint_roundtrip(save, load)


def test_a_deep_copied_model_does_not_feed_the_original_optimizer():
    """copy.deepcopy(model) copies the capture's hooks; the copy's forwards must not be recorded."""
    model = mlp()
    opt = make(model)
    train(model, opt, 2)
    twin = copy.deepcopy(model)
    twin_opt = make(twin)
    twin_opt.load_state_dict(opt.state_dict())
    for step in range(3):  # interleaved, as in a resume-and-compare check
        train(model, opt, 1, seed0=10 + step)
        train(twin, twin_opt, 1, seed0=10 + step)
    assert_same_training_state(model, opt, twin, twin_opt, exact=True)


def test_bf16_factors_survive_a_checkpoint():
    model = mlp(dtype=torch.float32)
    opt = make(model, preconditioner_dtype=torch.bfloat16)
    train(model, opt, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    fresh = make(copy.deepcopy(model), preconditioner_dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    weight = next(fresh_p for fresh_p in fresh.param_groups[0]["params"])
    assert fresh.state[weight]["K"].dtype == torch.bfloat16
    assert fresh.state[weight]["step"].dtype == torch.int64


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.attention(x, x, x, need_weights=False)[0])


def test_multihead_attention_projections_are_preconditioned():
    """No KeyError (singd: out_proj's hook never fires), in_proj_weight is trained (singd: silently
    frozen): the capture recomputes nn.MultiheadAttention's projections, so both get factors."""
    torch.manual_seed(0)
    model = _Attention().double()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back: no warning
        opt = SINGD(model, lr=3e-3, T=1)
    losses = train(model, opt, 30, shape=(5, 8))
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} was not trained"
    for weight in (model.head.weight, model.attention.in_proj_weight,
                   model.attention.out_proj.weight):
        assert "K" in opt.state[weight]
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("kfac_like", [True, False], ids=["ikfac", "ingd"])
@pytest.mark.parametrize("loss_average", ["batch", None])
def test_gradient_accumulation_equals_one_big_batch(kfac_like, loss_average):
    """4 micro-batches (mean losses scaled by 1/4, or plain sums) give exactly the big-batch step;
    singd's IKFAC mode is off by the micro-batch count (reference/singd.md §17.6)."""
    settings = dict(
        kfac_like=kfac_like, loss_average=loss_average, T=2, structures=("dense", "block3diagonal")
    )
    model_big, model_micro = mlp(), mlp()
    opt_big, opt_micro = make(model_big, **settings), make(model_micro, **settings)
    reduce = (lambda out, y: ((out - y) ** 2).sum()) if loss_average is None else mse
    for step in range(5):
        x, y = batch(step, n=16)
        opt_big.zero_grad()
        reduce(model_big(x), y).backward()
        opt_big.step()
        opt_micro.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
            loss = reduce(model_micro(xs), ys)
            (loss if loss_average is None else loss / 4).backward()
        opt_micro.step()
    assert_same_training_state(model_big, opt_big, model_micro, opt_micro, rtol=1e-11, atol=1e-12)


# ============================================================================ behaviour
def test_factors_update_only_every_T_steps_and_statistics_are_recorded_only_then():
    model = mlp()
    opt = make(model, T=3)
    weight = model[0].weight
    history, recording = [], [opt.capture.enabled]
    for step in range(7):
        train(model, opt, 1, seed0=step)
        history.append(opt.state[weight]["K"].clone())
        recording.append(opt.capture.enabled)
    changed = [not torch.equal(history[i], history[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # updates at steps 3 and 6
    assert recording == [True, False, False, True, False, False, True, False]


def test_in_place_activations_change_nothing():
    results = []
    for inplace in (False, True):
        model = mlp(inplace=inplace)
        opt = make(model)
        train(model, opt, 4)
        results.append((model, opt))
    assert_same_training_state(*results[0], *results[1], exact=True)


def test_closure_returns_the_loss_and_no_grad_forwards_are_ignored():
    model = mlp()
    opt = make(model)
    x, y = batch(0)
    with torch.no_grad():
        model(x)

    def closure():
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    reference_model = mlp()
    reference = make(reference_model)
    train(reference_model, reference, 1)
    assert_same_training_state(model, opt, reference_model, reference, exact=True)


def test_zero_gradients_are_harmless_and_grad_none_params_untouched():
    model = mlp()
    frozen = nn.Linear(3, 3).double()
    opt = make(nn.ModuleList([model, frozen]))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in model.parameters():
        for value in opt.state[p].values():
            assert torch.isfinite(value).all()
    assert not opt.state[frozen.weight]


def test_non_finite_statistics_keep_the_last_good_factors():
    model = mlp()
    opt = make(model, lr=0.0)
    train(model, opt, 2)
    weight = model[0].weight
    K_before = opt.state[weight]["K"].clone()
    x, y = batch(9)
    x[0, 0] = float("nan")
    opt.zero_grad()
    mse(model(x), y).backward()
    with pytest.warns(NumericalWarning, match="not finite"):
        opt.step()
    assert torch.equal(opt.state[weight]["K"], K_before)
    assert int(opt.state[weight]["nonfinite_skips"]) == 1


def test_param_groups_and_subsets():
    model = mlp()
    opt = make(
        [
            {"params": model[0].parameters(), "structures": "diagonal", "lr": 0.01},
            {"params": model[2].parameters()},
        ],
        model=model,
    )
    train(model, opt, 2)
    assert (
        opt.state[model[0].weight]["K"].numel() == 7
        and opt.state[model[2].weight]["K"].numel() == 100
    )
    subset_model = mlp()
    subset = make(list(subset_model[2].parameters()), model=subset_model)
    frozen = subset_model[0].weight.detach().clone()
    train(subset_model, subset, 2)
    assert torch.equal(subset_model[0].weight, frozen)
    assert [layer.module for layer in subset.capture.layers] == [subset_model[2]]


def test_weight_and_bias_in_different_groups_train_with_their_own_lr():
    """The usual decay/no-decay split: the layer is preconditioned once (its weight's group),
    each parameter steps with its own group's lr."""
    model = mlp()
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    opt = SINGD([{"params": weights, "weight_decay": 0.1}, {"params": biases, "lr": 0.0}], model=model,
                lr=1e-2, T=1)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 3)
    for p, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, old) == any(p is b for b in biases)
    assert all("K" in opt.state[w] for w in weights)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr_cov": -1.0}, "lr_cov"),
        ({"momentum": 1.0}, "momentum"),
        ({"damping": -1.0}, "damping"),
        ({"alpha1": 1.0}, "alpha1"),
        ({"T": 0}, "T"),
        ({"T": 2.5}, "T"),
        ({"structures": ("dense", "sparse")}, "structures"),
        ({"structures": ("dense",)}, "structures"),
        ({"kfac_approx": "mean"}, "kfac_approx"),
        ({"loss_average": "tokens"}, "loss_average"),
        ({"preconditioner_dtype": torch.int32}, "preconditioner_dtype"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"kfac_like": 1}, "kfac_like"),
        ({"betas": (0.9, 1.0)}, "betas"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        SINGD(mlp(), **kwargs)


def test_model_is_required_and_kfac_like_drops_alpha1():
    model = mlp()
    with pytest.raises(TypeError, match="model"):
        SINGD(model.parameters())
    with pytest.warns(UserWarning, match="alpha1"):
        opt = SINGD(model, kfac_like=True, alpha1=0.5)
    assert opt.param_groups[0]["alpha1"] == 0.0
    assert SINGD(mlp(), kfac_like=True).param_groups[0]["alpha1"] == 0.0
    assert SINGD(mlp()).param_groups[0]["alpha1"] == 0.5


def test_init_scale_and_scheduled_lr():
    model = mlp()
    opt = make(model, init_scale=0.5, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 1)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.05
    model2 = mlp()
    opt2 = make(model2, init_scale=0.5, T=5, lr=0.0)
    train(model2, opt2, 2)  # step 0 updates, step 1 does not: K = 0.5 I moved once
    K, _ = opt2.factors(model2[0].weight)
    assert abs(K.average_trace().item() - 0.5) < 0.05
