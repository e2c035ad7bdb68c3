"""Owner assignment and the flat collectives of the distributors (2 forked gloo ranks)."""

from __future__ import annotations

import pytest
import torch

from secondorder.distributed.collectives import OwnerLayout
from secondorder.distributed.distributor import AllGatherDistributor, Distributor, assign_owners
from tests.distributed.launcher import ForkedRankError, run_forked

pytestmark = pytest.mark.distributed


def test_lpt_assignment_balances_largest_first():
    # Sorted: 8(b0) -> r0, 7(b3) -> r1, 5(b1) -> r1 (7 < 8), 4(b2) -> r0 (8 < 12),
    # 1(b4) -> r0 (12 = 12: the lower rank).
    assert assign_owners([8, 5, 4, 7, 1], 2) == [0, 1, 0, 1, 0]
    assert assign_owners([3.0, 3.0, 3.0], 3) == [0, 1, 2]
    # Ties keep list order: equal costs alternate in order.
    assert assign_owners([1, 1, 1, 1], 2) == [0, 1, 0, 1]


def test_assignment_is_deterministic_and_balanced():
    generator = torch.Generator().manual_seed(3)
    costs = (torch.rand(40, generator=generator) * 100).tolist()
    owners = assign_owners(costs, 4)
    assert owners == assign_owners(list(costs), 4)
    loads = [sum(c for c, o in zip(costs, owners, strict=False) if o == r) for r in range(4)]
    # LPT bound: max load <= mean load + largest single cost.
    assert max(loads) <= sum(costs) / 4 + max(costs)


def test_sizes_balance_state_bytes_as_well_as_cost():
    costs, sizes = [10, 5, 5, 0.1], [10, 0, 0, 10]
    # Cost alone puts both big-state blocks on rank 0 (all state there, none on rank 1).
    assert assign_owners(costs, 2) == [0, 1, 1, 0]
    # Both criteria: rank 0 holds 49.5% of the cost and 50% of the state.
    assert assign_owners(costs, 2, sizes) == [0, 1, 1, 1]
    assert Distributor().assign(costs, sizes) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="Invalid sizes"):
        assign_owners(costs, 2, sizes[:2])


def test_more_ranks_than_blocks_leaves_ranks_empty():
    assert assign_owners([5, 2], 4) == [0, 1]
    assert assign_owners([], 3) == []
    with pytest.raises(ValueError, match="world_size"):
        assign_owners([1.0], 0)


def test_single_process_distributor_is_identity():
    distributor = Distributor()
    updates = [torch.ones(2, 3), None]
    assert distributor.assign([1.0, 2.0]) == [0, 0]
    out = distributor.all_gather_updates(updates, [0, 0])
    assert out[0] is updates[0] and out[1] is None
    assert distributor.reduce_to_owners(updates, [0, 0])[0] is updates[0]
    assert distributor.reduce_to_owners(updates, [0, 0], op="sum")[0] is updates[0]
    with pytest.raises(ValueError, match="op"):
        distributor.reduce_to_owners(updates, [0, 0], op="max")
    assert distributor.communication_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="owners"):
        distributor.all_gather_updates(updates, [0])


def test_all_gather_distributor_needs_a_process_group():
    with pytest.raises(ValueError, match="communication_dtype"):
        AllGatherDistributor(communication_dtype=torch.int64)
    with pytest.raises(ValueError, match="process_group"):
        AllGatherDistributor()


def test_owner_layout_offsets():
    layout = OwnerLayout.build([0, 1, 0, 1], [4, 6, None, 2], 2, header=True)
    assert layout.offsets == (0, 0, -1, 7)
    assert layout.slice_size == 10


def _collectives_body(rank: int, world_size: int) -> dict:
    distributor = AllGatherDistributor()
    assert (distributor.rank, distributor.world_size) == (rank, world_size)
    shapes = [(2, 3), (4,), (3, 3), (1,), (2, 2)]
    like = [torch.zeros(s) for s in shapes]
    like[3] = None  # parameter without gradient: absent on every rank
    full = [
        torch.arange(torch.Size(s).numel(), dtype=torch.float32).reshape(s) + 10 * i
        for i, s in enumerate(shapes)
    ]
    out = {}
    # Mixed owners; block 4 skipped by its owner (rank 0).
    owners = [1, 0, 1, 0, 0]
    updates = [full[i] if owners[i] == rank and i != 4 else None for i in range(5)]
    out["mixed"] = distributor.all_gather_updates(updates, owners, like)
    # Rank 1 owns nothing: it still joins the collective and receives everything.
    owners0 = [0] * 5
    updates0 = [full[i] if rank == 0 else None for i in range(5)]
    out["rank1_empty"] = distributor.all_gather_updates(updates0, owners0, like)
    bf16 = AllGatherDistributor(communication_dtype=torch.bfloat16)
    out["bf16"] = bf16.all_gather_updates(
        [full[0] / 3 if rank == 1 else None] + [None] * 4, owners, like
    )
    # Statistics: rank-dependent values, mean to the owner.
    stats = [torch.full((2, 2), float(rank + 1)), torch.full((3,), 2.0 * rank), None]
    out["reduced"] = distributor.reduce_to_owners(stats, [1, 1, 0])
    # Sums of float64 statistics (data-shard sums): exact, float64 kept, one owner each.
    out["summed"] = distributor.reduce_to_owners(_rank_sums(rank), [0, 1], op="sum")
    with pytest.raises(ValueError, match="op"):
        distributor.reduce_to_owners(stats, [1, 1, 0], op="product")
    # Example tensors of uneven length per rank, two dtypes.
    n = 2 + rank
    examples = [
        torch.full((n, 3), float(rank)),
        torch.arange(n, dtype=torch.long) + 100 * rank,
        None,
        torch.full((n, 2, 2), float(rank), dtype=torch.float64),
    ]
    out["gathered"] = distributor.gather_to_owners(examples, [0, 1, 0, 1])
    return out


def _rank_sums(rank: int) -> list[torch.Tensor]:
    """Rank-dependent float64 statistics (a fixed seed per rank, so the oracle can redo them)."""
    generator = torch.Generator().manual_seed(10 + rank)
    return [
        torch.randn(3, 3, generator=generator, dtype=torch.float64),
        torch.randn(5, generator=generator, dtype=torch.float64) * 1e-8,
    ]


def test_flat_collectives_on_two_ranks():
    results = run_forked(_collectives_body, 2)
    shapes = [(2, 3), (4,), (3, 3), (1,), (2, 2)]
    full = [
        torch.arange(torch.Size(s).numel(), dtype=torch.float32).reshape(s) + 10 * i
        for i, s in enumerate(shapes)
    ]
    for rank, out in enumerate(results):
        for key in ("mixed", "rank1_empty"):
            got = out[key]
            assert got[3] is None
            for i in (0, 1, 2):
                torch.testing.assert_close(got[i], full[i], rtol=0, atol=0)
        assert out["mixed"][4] is None  # skipped by its owner
        torch.testing.assert_close(out["rank1_empty"][4], full[4], rtol=0, atol=0)
        assert out["bf16"][0].dtype == torch.bfloat16
        torch.testing.assert_close(out["bf16"][0], (full[0] / 3).bfloat16(), rtol=0, atol=0)
        reduced = out["reduced"]
        if rank == 1:
            torch.testing.assert_close(reduced[0], torch.full((2, 2), 1.5))
            torch.testing.assert_close(reduced[1], torch.full((3,), 1.0))
            assert reduced[2] is None
        else:
            assert reduced[0] is None and reduced[1] is None and reduced[2] is None
        summed = out["summed"]
        expected = [a + b for a, b in zip(_rank_sums(0), _rank_sums(1), strict=True)]
        assert summed[1 - rank] is None
        assert summed[rank].dtype == torch.float64
        torch.testing.assert_close(summed[rank], expected[rank], rtol=0, atol=0)
        gathered = out["gathered"]
        if rank == 0:
            torch.testing.assert_close(
                gathered[0], torch.tensor([0.0] * 2 + [1.0] * 3)[:, None].expand(5, 3)
            )
            assert gathered[1] is None and gathered[3] is None
        else:
            assert gathered[1].tolist() == [0, 1, 100, 101, 102]
            assert gathered[3].dtype == torch.float64 and gathered[3].shape == (5, 2, 2)
            assert gathered[0] is None


def _failing_body(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("rank one fails on purpose")
    torch.distributed.barrier()


def test_launcher_reports_the_failing_rank():
    with pytest.raises(ForkedRankError, match="rank one fails on purpose"):
        run_forked(_failing_body, 2, timeout=30)


def _rows_body(rank: int, world_size: int) -> list[torch.Tensor]:
    """Rows of three tensors (uneven, one rank with none, two dtypes) to owners and back."""
    from secondorder.distributed.distributor import resolve_distributor

    distributor = resolve_distributor(True)
    wholes = [
        torch.arange(7 * 2, dtype=torch.float64).view(7, 2),
        torch.arange(2 * 3, dtype=torch.float32).view(2, 3) + 100,
        torch.arange(5, dtype=torch.float64) - 50,
    ]
    rows = [[3, 3, 1], [1, 1, 0], [2, 2, 1]]
    owners = [2, 0, 1]
    mine = [w.split(r)[rank] for w, r in zip(wholes, rows, strict=True)]
    gathered = distributor.gather_to_owners(mine, owners)
    ok = [(g is not None) == (o == rank) and (g is None or torch.equal(g, w))
          for g, o, w in zip(gathered, owners, wholes, strict=True)]
    values = [None if g is None else -g for g in gathered]
    back = distributor.scatter_rows_from_owners(values, owners, rows, mine)
    ok += [torch.equal(b, -m) and b.dtype == m.dtype for b, m in zip(back, mine, strict=True)]
    return ok


def test_rows_gathered_to_owners_and_scattered_back():
    for ok in run_forked(_rows_body, 3):
        assert all(ok), ok
