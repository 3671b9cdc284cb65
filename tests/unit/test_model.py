"""The towers: shapes, unit norm, padding, bag weighting, sharing, sparse gradients, config round trip."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch

from hm_recsys.model import FeatureSpec, ModelConfig, TwoTower


def _config(**kw) -> ModelConfig:
    """customer_id (100) + age (5) | article_id (60) + colour (7) | history of both; d = 3."""
    base = ModelConfig(embedding_dim=4, customer_layers=(8,), article_layers=(8,), output_dim=3, sparse_min_rows=50)
    return dataclasses.replace(base, **kw).with_features(
        customer={"customer_id": 100, "age": 5},
        article={"article_id": 60, "colour": 7},
        history={"article_id": 60, "colour": 7},
    )


def _inputs(b: int = 5, length: int = 3):
    g = torch.Generator().manual_seed(0)
    cats = torch.stack([torch.randint(0, 100, (b,), generator=g), torch.randint(0, 5, (b,), generator=g)], 1)
    hist = torch.stack([torch.randint(0, 60, (b, length), generator=g), torch.randint(0, 7, (b, length), generator=g)], 2)
    w = torch.full((b, length), 1.0 / length)
    return cats, hist, w


def test_shapes_and_unit_norm():
    torch.manual_seed(0)
    m = TwoTower(_config()).eval()
    cats, hist, w = _inputs(b=5)
    q = m.customer_embedding(cats, hist, w)
    a = m.article_embedding(torch.tensor([[0, 0], [59, 6], [3, 2]]))
    assert q.shape == (5, 3) and a.shape == (3, 3)
    assert torch.allclose(q.norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-6)
    s = m.score(q, a)
    assert s.shape == (5, 3)
    assert torch.allclose(s, q @ a.T)
    assert (s.abs() <= 1 + 1e-6).all()  # cosines


def test_history_padding_is_ignored_and_weights_average():
    """Padding rows (index = cardinality) contribute nothing; weights give a weighted mean of the bag."""
    torch.manual_seed(0)
    m = TwoTower(_config()).eval()
    cats = torch.tensor([[1, 1]])
    pad = torch.tensor([[[60, 7], [60, 7]]])
    one = torch.tensor([[[5, 2], [60, 7]]])
    with torch.no_grad():
        # a padded slot with weight 0 changes nothing
        a = m.customer_embedding(cats, torch.tensor([[[5, 2], [60, 7]]]), torch.tensor([[1.0, 0.0]]))
        b = m.customer_embedding(cats, torch.tensor([[[5, 2], [9, 3]]]), torch.tensor([[1.0, 0.0]]))
        assert torch.allclose(a, b)
        # an empty history equals a history of padding (the padding row is zero)
        e1 = m.customer_embedding(cats, pad, torch.zeros(1, 2))
        assert m.article_tables["article_id"].weight[60].abs().sum() == 0
        # same article twice with weights 0.5/0.5 == once with weight 1
        twice = m.customer_embedding(cats, torch.tensor([[[5, 2], [5, 2]]]), torch.tensor([[0.5, 0.5]]))
        once = m.customer_embedding(cats, one, torch.tensor([[1.0, 0.0]]))
        assert torch.allclose(twice, once, atol=1e-6)
        assert not torch.allclose(e1, once)


def test_history_shares_article_tables_when_asked():
    torch.manual_seed(0)
    shared = TwoTower(_config())
    assert len(shared.history_tables) == 0
    separate = TwoTower(_config(share_history_embeddings=False))
    assert set(separate.history_tables) == {"article_id", "colour"}
    # changing an article embedding moves the customer embedding only when shared
    cats, hist, w = _inputs(b=2)
    with torch.no_grad():
        before = shared.customer_embedding(cats, hist, w).clone()
        shared.article_tables["article_id"].weight.add_(1.0)
        assert not torch.allclose(before, shared.customer_embedding(cats, hist, w))


def test_sparse_gradients_for_big_tables_only():
    torch.manual_seed(0)
    m = TwoTower(_config())  # sparse_min_rows=50: customer_id (101 rows) and article_id (61) are sparse
    assert {id(p) for p in m.sparse_parameters()} == {id(m.customer_tables["customer_id"].weight),
                                                      id(m.article_tables["article_id"].weight)}
    cats, hist, w = _inputs(b=4)
    q = m.customer_embedding(cats, hist, w)
    a = m.article_embedding(torch.tensor([[1, 1], [2, 2]]))
    (q @ a.T).sum().backward()
    g = m.article_tables["article_id"].weight.grad
    assert g.is_sparse
    touched = set(g.coalesce().indices()[0].tolist())
    assert touched <= set(hist[:, :, 0].flatten().tolist()) | {1, 2}
    assert not m.article_tables["colour"].weight.grad.is_sparse
    dense = {id(p) for p in m.dense_parameters()}
    assert not dense & {id(p) for p in m.sparse_parameters()}
    assert len(dense) + len(m.sparse_parameters()) == len(list(m.parameters()))


def test_config_round_trip_through_json_and_state_dict_weights_only():
    torch.manual_seed(0)
    cfg = _config()
    doc = json.loads(json.dumps(cfg.to_dict()))
    again = ModelConfig.from_dict(doc)
    assert again == cfg
    assert again.customer[0] == FeatureSpec("customer_id", 100, 4)
    m1 = TwoTower(cfg).eval()
    buf = io.BytesIO()
    torch.save(m1.state_dict(), buf)
    buf.seek(0)
    m2 = TwoTower(again).eval()
    m2.load_state_dict(torch.load(buf, weights_only=True))
    cats, hist, w = _inputs()
    with torch.no_grad():
        assert torch.equal(m1.customer_embedding(cats, hist, w), m2.customer_embedding(cats, hist, w))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown option"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError, match="with_features"):
        TwoTower(ModelConfig())
