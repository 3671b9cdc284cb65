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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


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


def _dense_bags(idx: torch.Tensor, weights: torch.Tensor, tables: list[torch.Tensor],
                pads: list[int]) -> list[torch.Tensor]:
    """``sum_l weights[b, l] * w_k[idx[b, l, k]]`` for small tables ``w_k``, each as (B, V_k) weights @ (V_k, dim).

    Same result as ``F.embedding_bag(..., mode="sum", padding_idx=pad)`` per
    table, but the backward is one small matrix product per table instead of
    sorting B * L indices (which dominated a training step on CPU for
    attribute tables of ~10-300 rows). The (B, V_k) weights of all tables are
    built in one buffer by one compiled pass that skips zero weights (the
    padding slots; ``kernels.bag_weights``; ``index_add_`` took ~2 ms a
    full-scale step).
    """
    from hm_recsys.kernels import bag_weights

    starts = [0]
    for p in pads:
        starts.append(starts[-1] + p + 1)
    w = torch.from_numpy(bag_weights(idx.numpy(), weights.to(tables[0].dtype).numpy(), np.asarray(starts[:-1]),
                                     starts[-1]))
    return [w[:, s:s + p] @ t[:p] for s, p, t in zip(starts, pads, tables)]


class _SmallLookups(torch.autograd.Function):
    """``cat([w_k[idx[:, k]] for k])`` over small (dense-gradient) tables of one width, as one lookup.

    Training reads ~20 small attribute tables a step. ``nn.Embedding`` reads
    each with its own op and autograd node, and its CPU backward adds each
    index's row through its own TensorIterator call (~0.3 ms for a 2048-row
    batch): with ~20 tables that was more than the towers' hidden layers.
    Here the tables are stacked, read with one ``index_select`` and their
    gradients summed in one compiled pass (``kernels.add_rows``: the sums of
    ``index_add_``, whose CPU scatter goes a scalar at a time): the same rows
    in the same (index) order, so the gradients are bit for bit
    ``nn.Embedding``'s; the padding rows' stay zero.
    """

    @staticmethod
    def forward(ctx, idx: torch.Tensor, offsets: torch.Tensor, pads: torch.Tensor,  # type: ignore[override]
                *weights: torch.Tensor) -> torch.Tensor:
        flat = idx.add(offsets).reshape(-1)
        ctx.save_for_backward(flat, pads)
        ctx.rows = [w.shape[0] for w in weights]
        return torch.cat(weights).index_select(0, flat).reshape(idx.shape[0], -1)

    @staticmethod
    @once_differentiable  # the gradient is computed outside autograd (compiled loops)
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        flat, pads = ctx.saved_tensors
        from hm_recsys.kernels import add_rows

        g = torch.zeros((sum(ctx.rows), grad.shape[1] // len(ctx.rows)), dtype=grad.dtype)
        add_rows(g.numpy(), flat.numpy(), grad.contiguous().reshape(flat.numel(), -1).numpy())  # index_add_, bit for bit
        g[pads] = 0.0
        return (None, None, None, *g.split(ctx.rows))


def _runs(tables: nn.ModuleDict, specs: tuple[FeatureSpec, ...]) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(i, j, offsets, pads)`` per part of a training lookup: features ``i:j`` are one run of consecutive small
    (dense-gradient, trainable) tables of one width, read together (``offsets``/``pads``: each table's first and
    padding row in the stacked tables), or one other feature (``j = i + 1``, no offsets)."""

    def small(i: int) -> bool:
        t = tables[specs[i].name]
        return not t.sparse and t.weight.requires_grad and t.padding_idx is not None

    out, i, none = [], 0, torch.zeros(0, dtype=torch.int64)
    while i < len(specs):
        j = i + 1
        if small(i):
            while j < len(specs) and small(j) and specs[j].dim == specs[i].dim:
                j += 1
        if j - i == 1:
            out.append((i, j, none, none))
        else:
            run = [tables[s.name] for s in specs[i:j]]
            offsets = torch.cumsum(torch.tensor([0] + [t.num_embeddings for t in run]), 0)[:-1]
            out.append((i, j, offsets, offsets + torch.tensor([t.padding_idx for t in run])))
        i = j
    return out


def _embedded(tables: nn.ModuleDict, specs: tuple[FeatureSpec, ...], cats: torch.Tensor,
              read: dict[str, torch.Tensor], runs: list[tuple[int, int, torch.Tensor, torch.Tensor]]
              ) -> list[torch.Tensor]:
    """``[table(cats[:, i])]`` per feature (``read[name]`` where already read); in training, each run of
    consecutive small tables of one width (``_runs``) is read as one part by ``_SmallLookups`` (same values)."""
    if not torch.is_grad_enabled():
        return [tables[s.name](cats[:, i]) for i, s in enumerate(specs)]
    parts = []
    for i, j, offsets, pads in runs:
        if specs[i].name in read:
            parts.append(read[specs[i].name])
        elif j - i == 1:
            parts.append(tables[specs[i].name](cats[:, i]))
        else:
            parts.append(_SmallLookups.apply(cats[:, i:j], offsets, pads, *(tables[s.name].weight for s in specs[i:j])))
    return parts


_NO_ROWS = torch.zeros(0, dtype=torch.int64)


class _SparseBag(torch.autograd.Function):
    """``sum_l weights[b, l] * weight[idx[b, l]]`` over the non-padding slots, with a sparse (COO) gradient.

    ``F.embedding_bag(..., sparse=True, padding_idx=pad)``'s backward carries every
    slot through (B * L gradient rows, padding included, then filtered with
    copies) and dominated a training step's id-table work. Here the padding
    slots are dropped before the lookup and the gradient is built directly:
    one gradient row per real slot, ``grad[b] * weights[b, l]``; duplicates are
    summed by the optimiser (``training.optim.RowSparseAdam``).

    ``rows`` are rows the article tower reads from the same table (shared
    history embeddings); they are returned as the second output and their
    gradient joins the bag's in one COO tensor. Read apart, the table would
    get two sparse gradients and autograd would add them (a copy of both:
    ~1.5 ms per table in a full-scale step).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, pad: int,  # type: ignore[override]
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from hm_recsys.kernels import real_slots

        flat, w, offsets, bags = (torch.from_numpy(a) for a in real_slots(idx.numpy(), weights.numpy(), pad))
        out = F.embedding_bag(flat, weight, offsets, mode="sum", per_sample_weights=w.to(weight.dtype))
        real_rows = (rows != pad).nonzero().squeeze(1)  # as nn.Embedding: the padding row gets no gradient
        ctx.save_for_backward(flat, w, bags, rows, real_rows)
        ctx.shape = weight.shape
        return out, weight.index_select(0, rows)

    @staticmethod
    @once_differentiable  # the gradient is computed outside autograd (compiled loops)
    def backward(ctx, grad: torch.Tensor, grad_rows: torch.Tensor):  # type: ignore[override]
        from hm_recsys.kernels import bag_gradient

        flat, w, bags, rows, real_rows = ctx.saved_tensors
        if real_rows.numel() < rows.numel():
            rows, grad_rows = rows.index_select(0, real_rows), grad_rows.index_select(0, real_rows)
        values = torch.from_numpy(bag_gradient(grad.contiguous().numpy(), bags.numpy(), w.numpy(),
                                               grad_rows.contiguous().numpy()))
        flat = torch.cat([flat, rows]) if rows.numel() else flat
        g = torch.sparse_coo_tensor(flat.unsqueeze(0), values, ctx.shape, is_coalesced=False,
                                    check_invariants=False)
        return g, None, None, None, None


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
        self._lookup_runs: dict[tuple, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}

    def _runs_of(self, tower: str) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """The tower's training lookup parts (``_runs``), built once per set of trainable tables."""
        if not torch.is_grad_enabled():  # inference reads table by table (_embedded)
            return []
        tables = self.customer_tables if tower == "customer" else self.article_tables
        key = (tower, tuple(t.weight.requires_grad for t in tables.values()))
        if key not in self._lookup_runs:
            self._lookup_runs[key] = _runs(tables, getattr(self.config, tower))
        return self._lookup_runs[key]

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
        return self._customer(cats, hist, weights, {})

    def article_embedding(self, cats: torch.Tensor) -> torch.Tensor:
        """Article tower: ``int64 (N, len(config.article))`` -> ``float32 (N, output_dim)``, unit L2 norm."""
        return self._article(cats, {})

    def embeddings(self, cats: torch.Tensor, hist: torch.Tensor, weights: torch.Tensor,
                   article_cats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(customer_embedding(cats, hist, weights), article_embedding(article_cats))``, as a training step needs.

        Same values. Each id table that the history bags share with the
        article tower is read for both towers by one ``_SparseBag``, so its
        gradient is one sparse tensor.
        """
        bags: dict[str, torch.Tensor] = {}
        read: dict[str, torch.Tensor] = {}
        if torch.is_grad_enabled():
            article_col = {s.name: i for i, s in enumerate(self.config.article)}
            for j, s in enumerate(self.config.history):
                table = self._history_table(s.name)
                if table.sparse and s.name not in self.history_tables and s.name in article_col:
                    bags[s.name], read[s.name] = _SparseBag.apply(table.weight, hist[:, :, j], weights, s.cardinality,
                                                                  article_cats[:, article_col[s.name]])
        return self._customer(cats, hist, weights, bags), self._article(article_cats, read)

    def _customer(self, cats: torch.Tensor, hist: torch.Tensor, weights: torch.Tensor,
                  bags: dict[str, torch.Tensor]) -> torch.Tensor:
        runs = self._runs_of("customer")
        parts: list[torch.Tensor | None] = [*_embedded(self.customer_tables, self.config.customer, cats, {}, runs)]
        first = len(parts)
        small = []  # training, small tables: the cheaper backward of _dense_bags (same values)
        for j, s in enumerate(self.config.history):
            table = self._history_table(s.name)
            if s.name in bags:
                parts.append(bags[s.name])
            elif not torch.is_grad_enabled():
                parts.append(F.embedding_bag(hist[:, :, j], table.weight, per_sample_weights=weights, mode="sum",
                                             padding_idx=s.cardinality))
            elif table.sparse:  # training, id table: a gradient row per real slot only
                parts.append(_SparseBag.apply(table.weight, hist[:, :, j], weights, s.cardinality, _NO_ROWS)[0])
            else:
                small.append(j)
                parts.append(None)
        if small:
            specs = self.config.history
            cols = slice(small[0], small[-1] + 1) if small[-1] - small[0] + 1 == len(small) else small  # a view
            done = iter(_dense_bags(hist[:, :, cols], weights, [self._history_table(specs[j].name).weight for j in small],
                                    [specs[j].cardinality for j in small]))
            parts[first:] = [next(done) if p is None else p for p in parts[first:]]
        return F.normalize(self.customer_mlp(torch.cat(parts, dim=1)), dim=1)

    def _article(self, cats: torch.Tensor, read: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = _embedded(self.article_tables, self.config.article, cats, read, self._runs_of("article"))
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
