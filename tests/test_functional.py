"""The pure math: exact-K masks, tie-breaking, STE gradients, block masks and quantizers."""

import pytest
import torch

from qsparse_hf import functional as QF


@pytest.mark.parametrize(
    "topk, dim, expected",
    [(0.7, 4096, 2867), (0.7, 10, 7), (0.29, 100, 29), (0.5, 7, 3), (0.001, 10, 1), (1.0, 33, 33), (64, 4096, 64),
     (5000, 4096, 4096)],
)
def test_keep_count_rounding(topk, dim, expected):
    assert QF.keep_count(topk, dim) == expected


@pytest.mark.parametrize("shape", [(1, 1, 1023), (3, 7), (2, 5, 64), (4, 2, 3, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_mask_keeps_exactly_k_largest(shape, dtype):
    x = torch.randn(shape).to(dtype)
    k = max(1, shape[-1] * 3 // 10)
    mask = QF.topk_mask(x, k)
    assert (mask.sum(-1) == k).all()
    kept_min = torch.where(mask, x.abs(), torch.full_like(x, float("inf"))).amin(-1)
    dropped_max = torch.where(~mask, x.abs(), torch.full_like(x, -1.0)).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_topk_mask_matches_torch_topk_without_ties():
    x = torch.randn(16, 257, dtype=torch.float64)
    mask = QF.topk_mask(x, 100)
    reference = torch.zeros_like(mask).scatter(-1, x.abs().topk(100, dim=-1).indices, True)
    assert torch.equal(mask, reference)


def test_ties_break_toward_lowest_index_deterministically():
    x = torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0, 0.5]], dtype=torch.bfloat16)
    mask = QF.topk_mask(x, 3)
    assert mask.tolist() == [[False, True, True, True, False, False]]
    # Many equal bf16 magnitudes: still exactly K, the same mask every call.
    y = torch.randint(-3, 4, (64, 512)).to(torch.bfloat16)
    first = QF.topk_mask(y, 200)
    assert (first.sum(-1) == 200).all()
    assert all(torch.equal(first, QF.topk_mask(y, 200)) for _ in range(3))


def test_sparsify_full_keep_returns_input_unchanged():
    x = torch.randn(2, 8)
    assert QF.sparsify(x, 8) is x


def test_ste_gradient_reaches_dense_input_unmasked():
    x = torch.tensor([[0.3, -2.0, 1.0, 0.05]], requires_grad=True)
    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y = QF.sparsify(x, 2, ste=True)
    assert y.tolist() == [[0.0, -2.0, 1.0, 0.0]]
    (y * weights).sum().backward()
    # d/dx of sum(w * x̃) under STE is w everywhere, including the two masked entries.
    assert x.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_without_ste_masked_entries_get_zero_gradient():
    x = torch.tensor([[0.3, -2.0, 1.0, 0.05]], requires_grad=True)
    (QF.sparsify(x, 2, ste=False) * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert x.grad.tolist() == [[0.0, 2.0, 3.0, 0.0]]


def test_rescale_keeps_l2_norm_per_token():
    x = torch.randn(5, 64)
    y = QF.sparsify(x, 16, rescale=True)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert ((y != 0).sum(-1) == 16).all()


def test_block_topk_keeps_n_per_block():
    x = torch.randn(3, 4, 64)
    mask = QF.block_topk_mask(x, 2, 4)
    assert (mask.reshape(3, 4, 16, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="multiple of block_size"):
        QF.block_topk_mask(torch.randn(2, 10), 2, 4)


def test_absmax_quantize_is_on_the_8bit_grid_with_ste():
    x = torch.randn(4, 32, requires_grad=True)
    q = QF.absmax_quantize(x, bits=8)
    scale = 127 / x.detach().abs().amax(-1, keepdim=True)
    grid = q.detach() * scale
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)
    assert grid.abs().max() <= 127.0001
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_ternary_weight_takes_three_values_and_passes_gradient():
    w = torch.randn(16, 32, requires_grad=True)
    q = QF.ternary_quantize(w)
    alpha = w.detach().abs().mean()
    values = set(torch.unique(q.detach()).tolist())
    assert values <= {-alpha.item(), 0.0, alpha.item()} and len(values) == 3
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_relu2():
    assert QF.relu2(torch.tensor([-2.0, 0.0, 3.0])).tolist() == [0.0, 0.0, 9.0]


def test_nan_is_kept_like_inf_and_k_entries_survive():
    from qsparse_hf.functional import sparsify, topk_mask

    row = torch.tensor([[1.0, float("nan"), 3.0, 2.0, 0.5, 0.1]])
    assert topk_mask(row, 2).sum() == 2
    out = sparsify(row, 2)
    assert out[0, 1].isnan() and out[0, 2] == 3.0 and (out[0, [0, 3, 4, 5]] == 0).all()
    finite = torch.tensor([[1.0, -float("inf"), 3.0, 2.0]])
    assert torch.equal(topk_mask(finite, 2), torch.tensor([[False, True, True, False]]))
