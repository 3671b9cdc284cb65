"""The compiled loops of the training step against the torch ops they replace."""

from __future__ import annotations

import numpy as np
import torch

from hm_recsys.arrays import top_k
from hm_recsys.kernels import _compiled, add_rows, bag_weights, lazy_adam


def test_add_rows_is_index_add_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 7, (500,), generator=g)  # many duplicates: the summation order matters
    src = torch.randn(500, 5, generator=g) * torch.logspace(-6, 6, 500).unsqueeze(1)
    ours, ref = torch.zeros(7, 5), torch.zeros(7, 5)
    add_rows(ours.numpy(), index.numpy(), src.numpy())
    ref.index_add_(0, index, src)
    assert torch.equal(ours, ref)
    flat_ours, flat_ref = torch.zeros(7), torch.zeros(7)
    add_rows(flat_ours.numpy(), index.numpy(), src[:, 0].contiguous().numpy())
    flat_ref.index_add_(0, index, src[:, 0])
    assert torch.equal(flat_ours, flat_ref)


def test_bag_weights_match_index_add_over_all_slots():
    rng = np.random.default_rng(1)
    b, length, pads = 6, 9, [3, 5]
    idx = np.stack([rng.integers(0, p, (b, length)) for p in pads], 2)
    weights = rng.random((b, length)).astype(np.float32)
    weights[:, 6:] = 0.0  # padding slots: weight 0, index = the table's padding row
    for k, p in enumerate(pads):
        idx[:, 6:, k] = p
    starts = np.array([0, pads[0] + 1])
    ours = bag_weights(idx, weights, starts, sum(pads) + 2)
    ref = torch.zeros(b * (sum(pads) + 2))
    flat = torch.from_numpy(idx + starts) + torch.arange(b).view(b, 1, 1) * (sum(pads) + 2)
    ref.index_add_(0, flat.reshape(-1), torch.from_numpy(weights).unsqueeze(2).expand(b, length, 2).reshape(-1))
    assert np.array_equal(ours, ref.view(b, -1).numpy())
    # a non-contiguous index (a slice of the history's columns, as the model passes it)
    wide = np.concatenate([idx, idx[:, :, :1]], 2)
    assert np.array_equal(bag_weights(wide[:, :, :2], weights, starts, sum(pads) + 2), ours)


def test_lazy_adam_updates_touched_rows_only_and_resets_its_scratch():
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal((10, 3)).astype(np.float32)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    index = np.array([4, 1, 4, 4, 8])
    values = rng.standard_normal((5, 3)).astype(np.float32)
    slot = np.full(10, -1, np.int32)
    assert lazy_adam(p, m, v, index, values, slot, np.float32(0.1), np.float32(0.001), np.float32(0.01),
                     np.float32(1e-8)) == 3
    assert (slot == -1).all()
    untouched = [0, 2, 3, 5, 6, 7, 9]
    assert np.array_equal(p[untouched], p0[untouched]) and not m[untouched].any()
    g = np.zeros_like(p0)
    np.add.at(g, index, values)
    np.testing.assert_allclose(m[[1, 4, 8]], 0.1 * g[[1, 4, 8]], rtol=1e-6)
    np.testing.assert_allclose(v[[1, 4, 8]], 0.001 * g[[1, 4, 8]] ** 2, rtol=1e-5)
    # first step of Adam: m / sqrt(v) = g / |g| * sqrt(0.1^2 / 0.001), so each entry moves by step_size * 3.162
    np.testing.assert_allclose(p0[[1, 4, 8]] - p[[1, 4, 8]], 0.01 * np.sign(g[[1, 4, 8]]) * 0.1 / np.sqrt(0.001),
                               rtol=1e-4)


def test_lazy_adam_gives_the_same_rows_in_index_order_and_in_table_order():
    """Few rows touched in a big table: visited in index order; most rows of a small one: in table order
    (``kernels._DENSE``). The same rows with the same gradients must come out bit for bit the same."""
    rng = np.random.default_rng(4)
    big = rng.standard_normal((20_000, 16)).astype(np.float32)
    rows = rng.choice(20_000, 40, replace=False)  # 40 * _DENSE < 20,000 rows: index order
    index = rng.choice(rows, 300)  # duplicates, in no order
    f = np.float32
    small_of = {r: i for i, r in enumerate(sorted(rows))}  # the same rows packed in a 40-row table: table order
    small = big[sorted(rows)].copy()
    states = [(big, np.zeros_like(big), np.zeros_like(big), np.full(20_000, -1, np.int32), index),
              (small, np.zeros_like(small), np.zeros_like(small), np.full(40, -1, np.int32),
               np.array([small_of[r] for r in index]))]
    for step in range(1, 4):  # moments non-zero from the second step on
        values = rng.standard_normal((300, 16)).astype(np.float32)
        for p, m, v, slot, idx in states:
            assert lazy_adam(p, m, v, idx, values, slot, f(0.1), f(0.001), f(0.01 * step), f(1e-8)) == 40
            assert (slot == -1).all()
    (p1, m1, v1, *_), (p2, m2, v2, *_) = states
    order = sorted(rows)
    assert np.array_equal(p1[order], p2) and np.array_equal(m1[order], m2) and np.array_equal(v1[order], v2)


def test_top_k_is_the_exact_top_k_with_ties_by_lower_column():
    rng = np.random.default_rng(3)
    for trial in range(30):
        n, m, k = int(rng.integers(1, 12)), int(rng.integers(1, 4000)), int(rng.integers(1, 150))
        scores = rng.standard_normal((n, m)).astype(np.float32)
        if trial % 3 == 0:
            scores = np.round(scores * 4) / 4  # many ties, also at the k-th place
        if trial % 5 == 0:
            scores[:, ::7] = -np.inf  # excluded articles
        cols, vals = top_k(scores, k)
        assert cols.shape == vals.shape == (n, min(k, m))
        for i in range(n):
            want = np.lexsort((np.arange(m), -scores[i]))[:min(k, m)]
            assert np.array_equal(cols[i], want), trial
            assert np.array_equal(vals[i], scores[i, want])


def test_compiled_falls_back_to_no_cache_where_none_can_be_written():
    namespace: dict = {}
    exec("def twice(x):\n    return 2 * x\n", namespace)  # no source file: numba has no cache locator for it
    assert _compiled(namespace["twice"])(21) == 42
