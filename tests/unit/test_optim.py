"""The fused training pieces give what the torch reference ops give: loss, gradients, sparse Adam, lookups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hm_recsys.model import FeatureSpec, ModelConfig, TwoTower
from hm_recsys.training.optim import RowSparseAdam, keep_freed_memory, sampled_softmax_loss


def _reference(q, c, log_q, temperature, rows, cols):
    """The loss through torch's own ops: corrected logits, -inf at the masked pairs, F.cross_entropy."""
    logits = (q / temperature) @ c.T - (0 if log_q is None else log_q)
    logits = logits.index_put((rows, cols), torch.tensor(float("-inf")))
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def test_sampled_softmax_loss_matches_torch_with_masked_entries():
    g = torch.Generator().manual_seed(0)
    q, c, log_q = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g), torch.randn(9, generator=g)
    rows, cols = torch.tensor([0, 2, 5]), torch.tensor([3, 7, 0])  # masked, never a row's own column
    for lq in (log_q, None):
        ours_q, ours_c = q.clone().requires_grad_(True), c.clone().requires_grad_(True)
        ref_q, ref_c = q.clone().requires_grad_(True), c.clone().requires_grad_(True)
        ours = sampled_softmax_loss(ours_q, ours_c, lq, 0.3, (rows, cols))
        ref = _reference(ref_q, ref_c, lq, 0.3, rows, cols)
        torch.testing.assert_close(ours, ref)
        (3.0 * ours).backward()
        (3.0 * ref).backward()
        torch.testing.assert_close(ours_q.grad, ref_q.grad)
        torch.testing.assert_close(ours_c.grad, ref_c.grad)


def test_sampled_softmax_loss_is_exact_when_a_positive_underflows():
    """A positive 200 below its row's best has softmax 0 in float32: the loss still matches torch's, finite."""
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # row 1's positive scores -100 vs 100
    rows, cols = torch.tensor([1]), torch.tensor([3])  # a mask on the underflowing row: recomputed with it
    ours_q, ref_q = q.clone().requires_grad_(True), q.clone().requires_grad_(True)
    ours = sampled_softmax_loss(ours_q, c, None, 0.01, (rows, cols))
    ref = _reference(ref_q, c, None, 0.01, rows, cols)
    assert torch.isfinite(ours) and ours > 60  # row 1 alone contributes 200 / 3
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours_q.grad, ref_q.grad)


def test_sampled_softmax_loss_rejects_fewer_candidates_than_queries():
    with pytest.raises(ValueError, match="C >= B"):
        sampled_softmax_loss(torch.zeros(4, 2), torch.zeros(3, 2), None, 1.0)


def _sparse_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50, (40,), generator=g)  # duplicates on purpose
    idx[:3] = torch.tensor([7, 7, 7])
    values = torch.randn(40, 4, generator=g)
    return torch.sparse_coo_tensor(idx.unsqueeze(0), values, (60, 4), check_invariants=True)


def test_row_sparse_adam_matches_torch_sparse_adam_over_steps():
    torch.manual_seed(0)
    start = torch.randn(60, 4)
    ours = torch.nn.Parameter(start.clone())
    ref = torch.nn.Parameter(start.clone())
    opt_ours = RowSparseAdam([ours], lr=0.05)
    opt_ref = torch.optim.SparseAdam([ref], lr=0.05)
    touched = set()
    for step in range(6):
        grad = _sparse_problem(step)
        touched |= set(grad.coalesce().indices()[0].tolist())
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_ref.step()
    torch.testing.assert_close(ours.data, ref.data, rtol=1e-5, atol=1e-6)
    untouched = sorted(set(range(60)) - touched)
    assert untouched and torch.equal(ours.data[untouched], start[untouched])  # lazy: other rows never move
    m, v = opt_ours.state_tensors(ours)
    torch.testing.assert_close(m, opt_ref.state[ref]["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v, opt_ref.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-7)


def test_row_sparse_adam_steps_after_a_copy():
    import copy

    p = torch.nn.Parameter(torch.zeros(60, 4))
    opt = RowSparseAdam([p], lr=0.05)
    p.grad = _sparse_problem(0)
    opt.step()
    twin = copy.deepcopy({"p": p, "opt": opt})
    for q, o in ((p, opt), (twin["p"], twin["opt"])):
        q.grad = _sparse_problem(1)
        o.step()
    assert torch.equal(p.data, twin["p"].data)


def test_row_sparse_adam_refuses_dense_gradients():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        RowSparseAdam([p]).step()


def _tower(sparse_min_rows: int) -> TwoTower:
    cfg = ModelConfig(customer=(FeatureSpec("customer_id", 30, 4),),
                      article=(FeatureSpec("article_id", 20, 4), FeatureSpec("colour", 5, 4)),
                      history=(FeatureSpec("article_id", 20, 4), FeatureSpec("colour", 5, 4)),
                      customer_layers=(8,), article_layers=(8,), output_dim=6, sparse_min_rows=sparse_min_rows)
    torch.manual_seed(3)
    return TwoTower(cfg)


def test_history_bags_give_embedding_bags_values_and_gradients():
    """Training's bags (sparse id tables: padding dropped, COO gradient) == F.embedding_bag at inference."""
    torch.manual_seed(1)
    b, length = 5, 4
    cats = torch.randint(0, 30, (b, 1))
    hist = torch.stack([torch.randint(0, 20, (b, length)), torch.randint(0, 5, (b, length))], 2)
    hist[0, 2:, 0], hist[0, 2:, 1] = 20, 5  # padding
    hist[3, :, 0], hist[3, :, 1] = 20, 5  # no history at all
    w = torch.rand(b, length)
    w[0, 2:] = 0
    w[3] = 0
    sparse, dense = _tower(sparse_min_rows=10), _tower(sparse_min_rows=10**9)
    assert sparse.article_tables["article_id"].sparse and not dense.article_tables["article_id"].sparse
    with torch.no_grad():
        want = dense.customer_embedding(cats, hist, w)
    got = sparse.customer_embedding(cats, hist, w)
    torch.testing.assert_close(got, want)
    got[:, 0].sum().backward()
    dense.customer_embedding(cats, hist, w)[:, 0].sum().backward()
    g_sparse = sparse.article_tables["article_id"].weight.grad
    assert g_sparse.is_sparse
    torch.testing.assert_close(g_sparse.to_dense(), dense.article_tables["article_id"].weight.grad)
    assert 20 not in g_sparse.coalesce().indices()[0].tolist()  # padding rows never get a gradient row


def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory() in (True, False)
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory()


def test_small_table_lookups_match_nn_embedding_bit_for_bit():
    """Training reads a run of small tables as one lookup: the values and every table's gradient are nn.Embedding's,
    padding rows included (no gradient)."""
    from hm_recsys.model import _embedded, _runs

    torch.manual_seed(5)
    specs = (FeatureSpec("age", 6, 3), FeatureSpec("club", 4, 3), FeatureSpec("colour", 9, 3))
    tables = torch.nn.ModuleDict({s.name: torch.nn.Embedding(s.cardinality + 1, s.dim, padding_idx=s.cardinality)
                                  for s in specs})
    cats = torch.stack([torch.randint(0, s.cardinality + 1, (64,)) for s in specs], 1)  # duplicates and padding
    upstream = torch.randn(64, 9)
    (got,) = _embedded(tables, specs, cats, {}, _runs(tables, specs))
    (got * upstream).sum().backward()
    ours = [t.weight.grad.clone() for t in tables.values()]
    for t in tables.values():
        t.weight.grad = None
    want = torch.cat([tables[s.name](cats[:, i]) for i, s in enumerate(specs)], 1)
    (want * upstream).sum().backward()
    assert torch.equal(got, want)
    for g, t in zip(ours, tables.values()):
        assert torch.equal(g, t.weight.grad)
        assert not g[t.padding_idx].any()


def test_training_embeddings_match_the_towers_with_one_sparse_gradient_per_shared_table():
    cfg = ModelConfig(customer=(FeatureSpec("customer_id", 30, 4), FeatureSpec("age", 6, 4), FeatureSpec("club", 4, 4)),
                      article=(FeatureSpec("article_id", 20, 4), FeatureSpec("colour", 5, 4), FeatureSpec("kind", 7, 4)),
                      history=(FeatureSpec("article_id", 20, 4), FeatureSpec("colour", 5, 4)),
                      customer_layers=(8,), article_layers=(8,), output_dim=6, sparse_min_rows=10)
    torch.manual_seed(2)
    b, length, n = 6, 3, 9
    cats = torch.stack([torch.randint(0, c, (b,)) for c in (30, 6, 4)], 1)
    hist = torch.stack([torch.randint(0, 20, (b, length)), torch.randint(0, 5, (b, length))], 2)
    hist[1, 1:, 0], hist[1, 1:, 1] = 20, 5  # padding
    w = torch.rand(b, length)
    w[1, 1:] = 0
    acats = torch.stack([torch.randint(0, c, (n,)) for c in (20, 5, 7)], 1)
    acats[4, 0] = 20  # an article row at the id table's padding index: a zero row, no gradient
    torch.manual_seed(4)
    joint = TwoTower(cfg)
    apart = TwoTower(cfg)
    apart.load_state_dict(joint.state_dict())
    q, a = joint.embeddings(cats, hist, w, acats)
    q2, a2 = apart.customer_embedding(cats, hist, w), apart.article_embedding(acats)
    assert torch.equal(q, q2) and torch.equal(a, a2)
    ((q[:, :1] @ a[:, :1].T).sum() + q.sum()).backward()
    ((q2[:, :1] @ a2[:, :1].T).sum() + q2.sum()).backward()
    shared = joint.article_tables["article_id"].weight.grad
    assert shared.is_sparse and shared._nnz() == int((hist[:, :, 0] != 20).sum()) + n - 1  # one COO: bags + rows
    for (name, p), p2 in zip(joint.named_parameters(), apart.parameters()):
        g, g2 = p.grad, p2.grad
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, g2.to_dense() if g2.is_sparse else g2,
                                   msg=name)
