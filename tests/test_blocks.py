"""Shared transformer pieces: packed layouts, the last-token block, bf16 matmuls."""

from __future__ import annotations

import pytest
import torch

import grid.generators.layers as layers_module
from grid.generators.base import bf16_matmuls
from grid.generators.layers import Block, Layout, attend, packed_rows

LENGTHS = [1, 5, 20, 7, 3, 20, 11, 2, 9, 14, 6, 1, 14]  # 113 tokens: padded, rounded to 128


def right_padded(lengths: list[int], T: int = 20) -> torch.Tensor:
    return torch.arange(T) < torch.tensor(lengths)[:, None]


def test_packed_rows_round_up_by_at_most_an_eighth_to_few_distinct_counts():
    counts = torch.tensor([packed_rows(n) for n in range(1, 20001)])
    n = torch.arange(1, 20001)
    assert (counts >= n).all() and (counts % 16 == 0).all()
    assert (counts - n < torch.clamp(n / 8, min=16)).all()
    assert len(counts.unique()) <= 100  # about 8 per doubling: kernels get reused


def test_layout_packs_real_tokens_in_grid_order_then_padding():
    keep = right_padded(LENGTHS)
    layout = Layout.of(keep, causal=True)
    real = int(keep.sum())
    assert len(layout.index) == packed_rows(real) > real
    assert torch.equal(layout.index[:real], keep.flatten().nonzero()[:, 0])
    extra = layout.index[real:]
    assert not keep.flatten()[extra].any() and len(extra.unique()) == len(extra)
    assert layout.mask is None  # causal and right-padded: real queries never see padding
    assert torch.equal(Layout.of(keep).mask, keep[:, None, None, :])  # bidirectional: masked
    x = torch.randn(*keep.shape, 4)
    assert torch.equal(layout.pad(layout.pack(x))[keep], x[keep])
    # rounding never asks for more rows than the grid has
    nearly_full = right_padded([20] * 12 + [19])
    assert len(Layout.of(nearly_full).index) == nearly_full.numel()


@pytest.mark.parametrize("lengths", [LENGTHS, [20] * 13])  # padded, and a full grid
def test_last_token_block_equals_the_full_block_at_each_rows_last_token(lengths):
    torch.manual_seed(0)
    block = Block(32, 2, 16, 64, dropout=0.0, cross=False).eval()
    layout = Layout.of(right_padded(lengths), causal=True)
    x = torch.randn(len(layout.index) if layout.index is not None else 13 * 20, 32)
    last = torch.tensor(lengths).cumsum(0) - 1  # packed position of each row's last token
    with torch.no_grad():
        full = block(x, layout)[0]
        torch.testing.assert_close(block.last(x, layout, last), full[last])


def test_rounded_rows_leave_real_outputs_unchanged(monkeypatch):
    torch.manual_seed(0)
    blocks = [Block(32, 2, 16, 64, dropout=0.0, cross=False).eval() for _ in range(2)]
    keep = right_padded(LENGTHS)
    grid = torch.randn(*keep.shape, 32)

    def run() -> torch.Tensor:
        layout = Layout.of(keep, causal=True)
        x = layout.pack(grid)
        with torch.no_grad():
            for block in blocks:
                x = block(x, layout)[0]
        return layout.pad(x)[keep]

    rounded = run()
    monkeypatch.setattr(layers_module, "packed_rows", lambda n: n)
    torch.testing.assert_close(run(), rounded)


def test_bf16_inference_attention_agrees_with_the_plain_product(monkeypatch):
    keys = 60  # at least FLASH_MIN_KEYS: without gradients, the fused kernel runs
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 2, keys, 32, generator=g).bfloat16() for _ in range(3))
    keep = torch.arange(keys) < torch.tensor([keys, keys // 2] * 4)[:, None]
    masks = [dict(causal=True), dict(mask=keep[:, None, None, :])]
    with torch.no_grad():
        fused = [attend(q, k, v, **m).float() for m in masks]
        monkeypatch.setattr(layers_module, "FLASH_MIN_KEYS", 10**9)  # the plain product only
        plain = [attend(q, k, v, **m).float() for m in masks]
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # bf16 rounding apart


def test_bf16_matmuls_return_float32_results_without_bf16_rounding():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 96, generator=g), torch.randn(96, 2000, generator=g)
    exact = (a.double() @ b.double()).float()
    before = torch.get_float32_matmul_precision()
    with bf16_matmuls():
        fast = a @ b
    assert torch.get_float32_matmul_precision() == before
    assert fast.dtype == torch.float32
    assert (fast - exact).abs().max() < 0.15  # inputs rounded to bf16 (where the CPU has bf16
    # units): errors of about sqrt(96) x 2**-9 on sums of 96 products of magnitude 1
    on_bf16_grid = (fast.bfloat16().float() == fast).float().mean()
    assert on_bf16_grid < 0.05  # sums kept in float32: near-equal scores stay apart
    with pytest.raises(ValueError), bf16_matmuls():
        raise ValueError
    assert torch.get_float32_matmul_precision() == before
    with bf16_matmuls(enabled=False):
        assert torch.get_float32_matmul_precision() == before
