"""dpc_lens.flows on hand-built matrices; every expected number is worked out by hand here."""

from __future__ import annotations

import math

import pytest
import torch

from dpc_lens.errors import InputError
from dpc_lens.flows import (
    column_scores,
    flow_mean,
    flow_proportions,
    pair_mask,
    row_scores,
    row_totals,
    saliency_map,
    segment_flow_sums,
    segment_pair_counts,
)

# A 4x4 saliency (lower triangle, diagonal zero) with distinct entries:
#        j=0  j=1  j=2  j=3
# i=0  [  0    0    0    0 ]
# i=1  [  1    0    0    0 ]
# i=2  [  2    3    0    0 ]
# i=3  [  4    5    6    0 ]
I4 = torch.tensor([[0., 0, 0, 0], [1, 0, 0, 0], [2, 3, 0, 0], [4, 5, 6, 0]])[None]  # [1, 4, 4]
# two segments: S = {0, 1}, T = {2, 3}
MASKS = torch.tensor([[[1., 1, 0, 0], [0, 0, 1, 1]]])  # [batch 1, segment 2, pos 4]


def test_pair_mask_strict_and_with_diagonal():
    assert pair_mask(3).tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert pair_mask(3, include_diagonal=True).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_segment_flow_sums_by_hand():
    sums = segment_flow_sums(I4, MASKS)
    assert sums.shape == (1, 2, 2)  # [batch, target, source]
    # S->T: i in {2,3}, j in {0,1}: 2 + 3 + 4 + 5 = 14
    assert float(sums[0, 1, 0]) == 14.0
    # S->S: i in {0,1}, j in {0,1}: only (1,0) = 1
    assert float(sums[0, 0, 0]) == 1.0
    # T->T: only (3,2) = 6
    assert float(sums[0, 1, 1]) == 6.0
    # T->S: nothing (upper triangle)
    assert float(sums[0, 0, 1]) == 0.0


def test_pair_counts_by_hand():
    c = segment_pair_counts(MASKS)
    # target S / source S: (1,0) -> 1; target T / source S: 2x2 = 4; T/T: (3,2) -> 1; S/T: 0
    assert c[0].tolist() == [[1.0, 0.0], [4.0, 1.0]]
    cd = segment_pair_counts(MASKS, include_diagonal=True)
    # with the diagonal: S/S gets (0,0),(1,1) -> 3; T/T gets (2,2),(3,3) -> 3
    assert cd[0].tolist() == [[3.0, 0.0], [4.0, 3.0]]


def test_flow_mean_by_hand_and_nan_where_undefined():
    # three-token target / one-token source example: the mean is (a + b + c) / 3
    a, b, c = 0.5, 1.25, 4.0
    I = torch.zeros(1, 4, 4)
    I[0, 1, 0], I[0, 2, 0], I[0, 3, 0] = a, b, c
    I[0, 3, 2] = 100.0  # target->target pair: must not enter source->target
    masks = torch.tensor([[[1., 0, 0, 0], [0, 1, 1, 1]]])
    mean = flow_mean(segment_flow_sums(I, masks), segment_pair_counts(masks))
    assert float(mean[0, 1, 0]) == pytest.approx((a + b + c) / 3)
    assert math.isnan(float(mean[0, 0, 1]))  # target->source: no pair, undefined
    # 4x4 example: S->T mean = 14 / 4
    m4 = flow_mean(segment_flow_sums(I4, MASKS), segment_pair_counts(MASKS))
    assert float(m4[0, 1, 0]) == 3.5
    assert float(m4[0, 1, 1]) == 6.0
    assert math.isnan(float(m4[0, 0, 1]))


def test_flow_mean_broadcasts_counts_over_layer_and_head_axes():
    counts = torch.tensor([[[1., 0], [4, 1]]])  # [batch, t, s]
    sums = torch.arange(2 * 1 * 3 * 2 * 2, dtype=torch.float32).view(2, 1, 3, 2, 2)  # [L, B, H, t, s]
    out = flow_mean(sums, counts)
    assert out.shape == sums.shape
    assert float(out[1, 0, 2, 1, 0]) == float(sums[1, 0, 2, 1, 0]) / 4
    assert float(out[0, 0, 1, 0, 0]) == float(sums[0, 0, 1, 0, 0])
    assert torch.isnan(out[..., 0, 1]).all()


def test_per_head_segment_sums():
    I = torch.stack([I4[0], 2 * I4[0]])[None]  # [batch 1, head 2, 4, 4]
    sums = segment_flow_sums(I, MASKS)
    assert sums.shape == (1, 2, 2, 2)
    assert sums[0, 0].tolist() == [[1.0, 0.0], [14.0, 6.0]]
    assert sums[0, 1].tolist() == [[2.0, 0.0], [28.0, 12.0]]


def test_proportions_sum_to_one_and_nan_where_all_zero():
    flows = {"a->b": torch.tensor([1.0, 0.0, 3.0]), "c->b": torch.tensor([3.0, 0.0, 1.0])}
    p = flow_proportions(flows)
    assert p["a->b"].tolist()[0] == 0.25 and p["c->b"].tolist()[0] == 0.75
    assert p["a->b"].tolist()[2] == 0.75 and p["c->b"].tolist()[2] == 0.25
    assert math.isnan(p["a->b"][1]) and math.isnan(p["c->b"][1])  # all zero in layer 1
    total = p["a->b"] + p["c->b"]
    assert total[0] == 1.0 and total[2] == 1.0
    # a chosen subset and order
    q = flow_proportions({**flows, "x->y": torch.tensor([4.0, 1.0, 4.0])}, ["x->y", "a->b"])
    assert list(q) == ["x->y", "a->b"]
    torch.testing.assert_close(q["x->y"], torch.tensor([0.8, 1.0, 4.0 / 7.0]))
    torch.testing.assert_close(q["a->b"], torch.tensor([0.2, 0.0, 3.0 / 7.0]))


def test_proportions_errors():
    with pytest.raises(InputError, match="at least one flow"):
        flow_proportions({}, [])
    with pytest.raises(InputError, match=r"Unknown flows \['nope'\]"):
        flow_proportions({"a->b": torch.ones(2)}, ["nope"])


def test_column_scores_raw_and_row_normalised():
    target = torch.tensor([[0., 0, 1, 1]])  # rows 2 and 3
    raw = column_scores(I4, target)
    # column j: sum over i in {2,3} of I[i,j] -> [2+4, 3+5, 0+6, 0]
    assert raw[0].tolist() == [6.0, 8.0, 6.0, 0.0]
    norm = column_scores(I4, target, row_normalize=True)
    # row 2 total 5 -> [2/5, 3/5, 0, 0]; row 3 total 15 -> [4/15, 5/15, 6/15, 0]
    expected = torch.tensor([2 / 5 + 4 / 15, 3 / 5 + 5 / 15, 6 / 15, 0.0])
    torch.testing.assert_close(norm[0], expected)
    assert float(norm.sum()) == pytest.approx(2.0)  # each target row contributes a share of 1


def test_column_scores_zero_row_contributes_zero():
    target = torch.tensor([[1., 1, 0, 0]])  # row 0 is all zero, row 1 total 1
    norm = column_scores(I4, target, row_normalize=True)
    assert norm[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert not torch.isnan(norm).any()


def test_column_scores_explicit_row_total_is_used():
    target = torch.tensor([[0., 0, 0, 1]])
    total = torch.tensor([[1., 1, 1, 30.0]])  # pretend row 3's total is 30
    norm = column_scores(I4, target, row_normalize=True, row_total=total)
    assert norm[0].tolist() == pytest.approx([4 / 30, 5 / 30, 6 / 30, 0.0])


def test_column_scores_per_head():
    I = torch.stack([I4[0], 10 * I4[0]])[None]  # [1, 2, 4, 4]
    out = column_scores(I, torch.tensor([[0., 0, 1, 1]]))
    assert out.shape == (1, 2, 4)
    assert out[0, 1].tolist() == [60.0, 80.0, 60.0, 0.0]


def test_row_scores_and_totals():
    src = torch.tensor([[1., 1, 0, 0]])
    # r_i = I[i,0] + I[i,1] -> [0, 1, 5, 9]
    assert row_scores(I4, src)[0].tolist() == [0.0, 1.0, 5.0, 9.0]
    assert row_totals(I4)[0].tolist() == [0.0, 1.0, 5.0, 15.0]
    Ih = torch.stack([I4[0], -I4[0]])[None]
    assert row_scores(Ih, src)[0, 1].tolist() == [0.0, -1.0, -5.0, -9.0]


# ----------------------------------------------------------------------- saliency_map
A = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]], [[1.0, 0.0], [0.5, 0.5]]]])  # [1, head 2, 2, 2]
G = torch.tensor([[[[2.0, 7.0], [4.0, -2.0]], [[3.0, 9.0], [-6.0, 8.0]]]])


def test_saliency_map_head_sum_then_abs_and_zero_diagonal():
    out = saliency_map(A, G)
    # head 0: A*G = [[2, 0], [1, -1.5]]; head 1: [[3, 0], [-3, 4]]; sum: [[5, 0], [-2, 2.5]]
    # abs -> [[5, 0], [2, 2.5]]; diagonal zeroed -> [[0, 0], [2, 0]]
    assert out.shape == (1, 2, 2)
    assert out[0].tolist() == [[0.0, 0.0], [2.0, 0.0]]


def test_saliency_map_options():
    assert saliency_map(A, G, include_diagonal=True)[0].tolist() == [[5.0, 0.0], [2.0, 2.5]]
    assert saliency_map(A, G, signed=True)[0].tolist() == [[0.0, 0.0], [-2.0, 0.0]]
    assert saliency_map(A, G, signed=True, include_diagonal=True)[0].tolist() == [[5.0, 0.0], [-2.0, 2.5]]
    ph = saliency_map(A, G, per_head=True)
    assert ph.shape == (1, 2, 2, 2)
    # abs per head (not after the sum): head 0 row 1 = [1, |-1.5| -> zeroed diag]
    assert ph[0, 0].tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert ph[0, 1].tolist() == [[0.0, 0.0], [3.0, 0.0]]
    phs = saliency_map(A, G, per_head=True, signed=True, include_diagonal=True)
    assert phs[0, 1].tolist() == [[3.0, 0.0], [-3.0, 4.0]]
    # abs after the head sum differs from the sum of per-head abs values: 2 != 1 + 3
    assert float(saliency_map(A, G)[0, 1, 0]) != float(ph[0, :, 1, 0].sum())


def test_saliency_map_fp32_accumulation():
    a16, g16 = A.to(torch.bfloat16), G.to(torch.bfloat16)
    assert saliency_map(a16, g16).dtype == torch.float32
    assert saliency_map(a16, g16, fp32=False).dtype == torch.bfloat16
    assert saliency_map(A.double(), G.double(), fp32=False).dtype == torch.float64


def test_saliency_map_shape_mismatch():
    with pytest.raises(InputError, match=r"same shape, got \(1, 2, 2, 2\) and \(1, 2, 2, 3\)"):
        saliency_map(A, torch.zeros(1, 2, 2, 3))


def test_flow_proportions_keep_float64():
    # 1/3 is not representable in float32: a cast would show in the 8th digit
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0], dtype=torch.float64)
    p = flow_proportions({"x->y": a, "y->z": b})
    assert p["x->y"].dtype == torch.float64
    assert p["x->y"][0].item() == 1.0 / 3.0
    assert flow_proportions({"x->y": a.half(), "y->z": b.half()})["x->y"].dtype == torch.float32
