"""The two towers: customer and article encoders with L2-normalised outputs. No I/O, no loss.

Everything the model needs to rebuild itself is in ``ModelConfig`` (the
"model args" saved in every bundle's ``config.json``), so serving never
re-types a hyperparameter::

    customer tower: [emb(f) for f in customer features]
                    ++ [sum_l w_l * emb(h_l) for h in history features]    (recency-weighted mean)
                    -> MLP -> L2 normalise                                   (B, output_dim)
    article tower:  [emb(f) for f in article features] -> MLP -> L2 normalise (N, output_dim)
    score(c, a) = <c, a>  (a cosine in [-1, 1]; the loss divides by a temperature)

Every feature has ``cardinality`` indices (0 = out-of-vocabulary / missing)
plus one padding row at index ``cardinality`` that stays zero. With
``share_history_embeddings`` the history bag reads the article tower's tables,
so a customer's recent articles and the candidates live in one space.
Tables with at least ``sparse_min_rows`` rows (the id embeddings) produce
sparse gradients: an update touches only the rows of the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    """One categorical input: indices ``0..cardinality-1`` (0 = unknown), padding row ``cardinality``."""

    name: str
    cardinality: int
    dim: int


@dataclass(frozen=True)
class ModelConfig:
    """Tower architecture. ``customer``/``article`` are filled in from the fitted features.

    Attributes:
        customer: the customer tower's categorical features, in input-column order.
        article: the article tower's features, in input-column order.
        history: article features averaged over recent purchases (customer tower).
        embedding_dim: default embedding width; ``embedding_dims`` overrides per feature.
        customer_layers / article_layers: hidden widths of each tower's MLP.
        output_dim: width of the L2-normalised output (d).
        share_history_embeddings: history bags reuse the article tower's table of the same
            feature (when the article tower has it); otherwise they get their own.
        sparse_min_rows: tables with at least this many rows get sparse gradients.
        dropout: dropout on the MLP hidden layers (training only).
    """

    customer: tuple[FeatureSpec, ...] = ()
    article: tuple[FeatureSpec, ...] = ()
    history: tuple[FeatureSpec, ...] = ()
    embedding_dim: int = 16
    embedding_dims: Mapping[str, int] = field(default_factory=dict)
    customer_layers: tuple[int, ...] = (256,)
    article_layers: tuple[int, ...] = (256,)
    output_dim: int = 64
    share_history_embeddings: bool = True
    sparse_min_rows: int = 4096
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.output_dim < 1 or self.embedding_dim < 1:
            raise ValueError("model.output_dim and model.embedding_dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for w in (*self.customer_layers, *self.article_layers, *self.embedding_dims.values()):
            if int(w) < 1:
                raise ValueError(f"model: layer widths and embedding dims must be >= 1, got {w}")

    def dim_of(self, name: str) -> int:
        return int(self.embedding_dims.get(name, self.embedding_dim))

    def with_features(self, customer: Mapping[str, int], article: Mapping[str, int],
                      history: Mapping[str, int]) -> ModelConfig:
        """A copy with the feature specs resolved from fitted cardinalities (name -> cardinality, in order)."""

        def specs(card: Mapping[str, int]) -> tuple[FeatureSpec, ...]:
            return tuple(FeatureSpec(n, int(c), self.dim_of(n)) for n, c in card.items())

        return dataclasses.replace(self, customer=specs(customer), article=specs(article), history=specs(history))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["embedding_dims"] = dict(self.embedding_dims)
        for k in ("customer_layers", "article_layers"):
            d[k] = list(d[k])
        for k in ("customer", "article", "history"):
            d[k] = [dataclasses.asdict(s) for s in getattr(self, k)]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"model: unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
        for k in ("customer", "article", "history"):
            if k in d:
                d[k] = tuple(FeatureSpec(**s) if isinstance(s, Mapping) else s for s in d[k])
        for k in ("customer_layers", "article_layers"):
            if k in d:
                d[k] = tuple(int(w) for w in d[k])
        if "embedding_dims" in d:
            d["embedding_dims"] = {str(k): int(v) for k, v in dict(d["embedding_dims"]).items()}
        return cls(**d)


def _mlp(d_in: int, hidden: tuple[int, ...], d_out: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d_in = width
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def _table(spec: FeatureSpec, sparse_min_rows: int) -> nn.Embedding:
    emb = nn.Embedding(spec.cardinality + 1, spec.dim, padding_idx=spec.cardinality,
                       sparse=spec.cardinality + 1 >= sparse_min_rows)
    # small init: many concatenated tables feed one MLP; N(0, 1) would swamp it at start
    nn.init.normal_(emb.weight, std=0.05)
    with torch.no_grad():
        emb.weight[spec.cardinality].zero_()
    return emb


def _dense_bag(idx: torch.Tensor, weights: torch.Tensor, weight: torch.Tensor, pad: int) -> torch.Tensor:
    """``sum_l weights[b, l] * weight[idx[b, l]]`` for a small table, as (B, V) weights @ (V, dim).

    Same result as ``F.embedding_bag(..., mode="sum", padding_idx=pad)``, but its
    backward is one small matrix product instead of sorting B * L indices
    (which dominated a training step on CPU for attribute tables of ~10-300 rows).
    """
    b = idx.shape[0]
    w = torch.zeros(b, pad + 1, dtype=weight.dtype)
    # one index_add_ into the flat (B, V + 1) buffer: index_put_(accumulate=True) sorts under deterministic mode
    flat = idx.add(torch.arange(0, b * (pad + 1), pad + 1).unsqueeze(1)).reshape(-1)
    w.view(-1).index_add_(0, flat, weights.reshape(-1).to(weight.dtype))
    return w[:, :pad] @ weight[:pad]


class _SparseBag(torch.autograd.Function):
    """``sum_l weights[b, l] * weight[idx[b, l]]`` over the non-padding slots, with a sparse (COO) gradient.

    ``F.embedding_bag(..., sparse=True, padding_idx=pad)``'s backward carries every
    slot through (B * L gradient rows, padding included, then filtered with
    copies) and dominated a training step's id-table work. Here the padding
    slots are dropped before the lookup and the gradient is built directly:
    one gradient row per real slot, ``grad[b] * weights[b, l]``; duplicates are
    summed by the optimiser (``training.optim.RowSparseAdam``).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, pad: int) -> torch.Tensor:  # type: ignore[override]
        b, length = idx.shape
        is_real = idx != pad
        real = is_real.reshape(-1).nonzero().squeeze(1)
        flat = idx.reshape(-1).index_select(0, real)
        w = weights.reshape(-1).index_select(0, real).to(weight.dtype)
        counts = is_real.sum(1)
        offsets = torch.cumsum(counts, 0).sub_(counts)
        out = F.embedding_bag(flat, weight, offsets, mode="sum", per_sample_weights=w)
        bags = torch.repeat_interleave(torch.arange(b), counts)
        ctx.save_for_backward(flat, w, bags)
        ctx.shape = weight.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        flat, w, bags = ctx.saved_tensors
        values = grad.index_select(0, bags).mul_(w.unsqueeze(1))
        g = torch.sparse_coo_tensor(flat.unsqueeze(0), values, ctx.shape, is_coalesced=False,
                                    check_invariants=False)
        return g, None, None, None


class TwoTower(nn.Module):
    """Customer and article towers sharing nothing but (optionally) the history tables."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.article:
            raise ValueError("ModelConfig has no article features: resolve it with with_features() first")
        self.config = config
        smr = config.sparse_min_rows
        self.customer_tables = nn.ModuleDict({s.name: _table(s, smr) for s in config.customer})
        self.article_tables = nn.ModuleDict({s.name: _table(s, smr) for s in config.article})
        shared = {s.name: s for s in config.article} if config.share_history_embeddings else {}
        for s in config.history:
            if s.name in shared and shared[s.name] != s:
                raise ValueError(f"history feature {s} cannot share the article table {shared[s.name]}")
        self.history_tables = nn.ModuleDict({s.name: _table(s, smr) for s in config.history if s.name not in shared})
        d_customer = sum(s.dim for s in config.customer) + sum(s.dim for s in config.history)
        d_article = sum(s.dim for s in config.article)
        self.customer_mlp = _mlp(d_customer, config.customer_layers, config.output_dim, config.dropout)
        self.article_mlp = _mlp(d_article, config.article_layers, config.output_dim, config.dropout)

    def _history_table(self, name: str) -> nn.Embedding:
        return self.history_tables[name] if name in self.history_tables else self.article_tables[name]

    def customer_embedding(self, cats: torch.Tensor, hist: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Customer tower.

        Args:
            cats: ``int64 (B, len(config.customer))`` feature indices.
            hist: ``int64 (B, L, len(config.history))`` indices of recent articles' features (padding = cardinality).
            weights: ``float32 (B, L)`` recency weights (rows sum to 1, or 0 without history).

        Returns:
            ``float32 (B, output_dim)``, unit L2 norm per row.
        """
        parts = [self.customer_tables[s.name](cats[:, i]) for i, s in enumerate(self.config.customer)]
        for j, s in enumerate(self.config.history):
            table = self._history_table(s.name)
            if not torch.is_grad_enabled():
                parts.append(F.embedding_bag(hist[:, :, j], table.weight, per_sample_weights=weights, mode="sum",
                                             padding_idx=s.cardinality))
            elif table.sparse:  # training, id table: a gradient row per real slot only
                parts.append(_SparseBag.apply(table.weight, hist[:, :, j], weights, s.cardinality))
            else:  # training, small table: the cheaper backward (same values)
                parts.append(_dense_bag(hist[:, :, j], weights, table.weight, s.cardinality))
        return F.normalize(self.customer_mlp(torch.cat(parts, dim=1)), dim=1)

    def article_embedding(self, cats: torch.Tensor) -> torch.Tensor:
        """Article tower: ``int64 (N, len(config.article))`` -> ``float32 (N, output_dim)``, unit L2 norm."""
        parts = [self.article_tables[s.name](cats[:, i]) for i, s in enumerate(self.config.article)]
        return F.normalize(self.article_mlp(torch.cat(parts, dim=1)), dim=1)

    @staticmethod
    def score(customers: torch.Tensor, articles: torch.Tensor) -> torch.Tensor:
        """Dot products ``(B, d) x (N, d) -> (B, N)`` (cosines, as both sides are unit vectors)."""
        return customers @ articles.T

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse (for SparseAdam); the rest take a dense optimiser."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding) and m.sparse]

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]
