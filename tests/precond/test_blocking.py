"""Blocking of parameters: distributed_shampoo's merge/split rules (reference/shampoo.md §1.2)."""

import math

import pytest
import torch

from secondorder.distributed.blocking import BlockLayout, merge_small_dims, split_sizes


@pytest.mark.parametrize("shape,merged,block_shapes", [
    ((32, 16), (512,), [(512,)]),
    ((10, 256), (10, 256), [(10, 256)]),
    ((1024, 1024), (1024, 1024), [(1024, 1024)]),
    ((4096, 1024), (4096, 1024), [(1024, 1024)] * 4),
    ((64, 64, 3, 3), (64, 576), [(64, 576)]),
    ((2048,), (2048,), [(1024,), (1024,)]),
    ((50257, 768), (50257, 768), [(1024, 768)] * 49 + [(81, 768)]),
    ((), (1,), [(1,)]),
    ((1, 5, 1), (5,), [(5,)]),
    ((3, 0), (0,), [(0,)]),
])
def test_reference_table(shape, merged, block_shapes):
    layout = BlockLayout.for_shape(shape, 1024)
    assert layout.merged_shape == merged
    assert list(layout.shapes) == block_shapes


def test_infinite_limits():
    assert merge_small_dims((1024, 1024), math.inf, target_order=1) == (1048576,)
    assert merge_small_dims((4, 5, 6), 1024, target_order=math.inf) == (4, 5, 6)
    assert merge_small_dims((4, 5, 6), 1024, target_order=2) == (4, 30)
    assert split_sizes(10, math.inf) == [10]
    assert split_sizes(10, 4) == [4, 4, 2]


def test_blocks_are_row_major_views_that_write_through():
    param = torch.arange(6 * 5, dtype=torch.float64).reshape(6, 5)
    layout = BlockLayout.for_shape(param.shape, 4)
    assert layout.shapes == ((4, 4), (4, 1), (2, 4), (2, 1))
    blocks = layout.blocks(param)
    torch.testing.assert_close(blocks[1], param[:4, 4:])
    torch.testing.assert_close(blocks[2], param[4:, :4])
    blocks[3].fill_(-1)
    assert float(param[5, 4]) == -1
    torch.testing.assert_close(layout.assemble(layout.blocks(param), param), param)
