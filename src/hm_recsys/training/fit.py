"""Fit the two towers on the prepared shards, then the fusion of candidate sources on the validation weeks.

The loss is an in-batch sampled softmax (``in_batch_softmax_loss``): the B
positives of a batch (all from one week) plus ``uniform_negatives`` articles
drawn uniformly from the catalogue are the candidates; logits are
``cos / temperature - log Q`` where Q is a candidate's expected count in the
candidate set (the logQ sampling-bias correction, without which popular
articles are over-penalised as negatives); other rows' copies of a row's
positive (accidental hits) and the same customer's other purchases are masked
out. Sparse gradients (``optim.RowSparseAdam``) for the id tables, AdamW for the rest.
Early stopping on the validation weeks' Recall@12; the best epoch's weights
are kept. ``fit_fusion`` then weighs every candidate source on the validation
weeks' buyers, served as they would have been (never the holdout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hm_recsys.features import ArticleRaw, FeatureState, History
from hm_recsys.training.dataset import Batch, Prepared, iterate_batches
from hm_recsys.training.epochs import EpochLog

if TYPE_CHECKING:
    import torch

    from hm_recsys.bundle import Recommender
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.fusion import Fusion
    from hm_recsys.model import TwoTower
    from hm_recsys.training.config import Config


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------
def corrected_logits(queries: torch.Tensor, candidates: torch.Tensor, log_q: torch.Tensor | None,
                     temperature: float) -> torch.Tensor:
    """``(B, d) x (C, d) -> (B, C)``: ``<q, c> / temperature - log_q[c]``.

    ``log_q`` (``(C,)``) is the log of each candidate's expected count in the
    sampled candidate set; subtracting it turns the sampled softmax into an
    unbiased estimate of the full softmax (Yi et al. 2019, "Sampling-bias-
    corrected neural modeling"): popular articles, sampled as negatives more
    often, get their logits lowered by exactly how much more often.
    """
    from hm_recsys.training.optim import masked_logits

    return masked_logits(queries / temperature, candidates, log_q)


def equal_pairs(row_keys: torch.Tensor, col_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(i, j)`` with ``row_keys[i] == col_keys[j]`` and ``i != j``, without a dense (B, C) mask.

    Sorting the columns once makes this O((B + C) log C + pairs); in-batch
    duplicates are rare, so the pairs are few. In numpy: a dozen small array
    operations, each several times cheaper than torch's dispatch of the same.
    """
    import torch

    rk, ck = row_keys.numpy(), col_keys.numpy()
    order = np.argsort(ck, kind="stable")
    sorted_keys = ck[order]
    lo = np.searchsorted(sorted_keys, rk, side="left")
    counts = np.searchsorted(sorted_keys, rk, side="right") - lo
    rows = np.repeat(np.arange(rk.size), counts)
    within = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = order[np.repeat(lo, counts) + within]
    keep = rows != cols
    return torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep])


def in_batch_softmax_loss(queries: torch.Tensor, candidates: torch.Tensor, candidate_ids: torch.Tensor,
                          log_q: torch.Tensor | None, temperature: float,
                          query_ids: torch.Tensor | None = None,
                          mask_accidental_hits: bool = True) -> torch.Tensor:
    """Mean cross-entropy of each query against its positive among all candidates.

    Args:
        queries: ``(B, d)`` customer embeddings.
        candidates: ``(C, d)``, C >= B; candidate i < B is the positive of query i,
            the rest are extra negatives.
        candidate_ids: ``(C,)`` article identity of each candidate.
        log_q: ``(C,)`` log expected count of each candidate (None: no correction).
        query_ids: ``(B,)`` customer identity; if given, candidate j < B with the
            same customer as query i (another of its purchases) is masked for i.
        mask_accidental_hits: mask candidates j != i carrying query i's positive article.

    Returns:
        scalar loss.
    """
    import torch

    from hm_recsys.training.optim import sampled_softmax_loss

    b = queries.shape[0]
    masked = []
    if mask_accidental_hits:
        masked.append(equal_pairs(candidate_ids[:b], candidate_ids))
    if query_ids is not None:
        masked.append(equal_pairs(query_ids, query_ids))
    pairs = (torch.cat([r for r, _ in masked]), torch.cat([c for _, c in masked])) if masked else None
    # a masked logit is -inf: its softmax probability, and so its gradient, is exactly 0
    return sampled_softmax_loss(queries, candidates, log_q, temperature, pairs)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def build_model(config: Config, state: FeatureState) -> TwoTower:
    """The towers for ``config`` with the fitted cardinalities (the bundle's model args)."""
    from hm_recsys.model import TwoTower

    cards = state.cardinalities()
    fc = config.features
    mc = config.model.with_features({n: cards[n] for n in fc.customer}, {n: cards[n] for n in fc.article},
                                    {n: cards[n] for n in fc.history})
    return TwoTower(mc)


def train_step(model: TwoTower, optimizers: Sequence[torch.optim.Optimizer], batch: Batch, config: Config) -> float:
    """One optimisation step on one batch (towers, corrected sampled softmax, optimisers); returns the loss."""
    import torch

    tc = config.train
    q, a = model.embeddings(torch.from_numpy(batch.cust_cats), torch.from_numpy(batch.hist),
                            torch.from_numpy(batch.weights), torch.from_numpy(batch.cand_cats))
    a = a.index_select(0, torch.from_numpy(batch.cand_inverse))  # backward: index_add_, not a sorted index_put_
    loss = in_batch_softmax_loss(
        q, a, torch.from_numpy(batch.cand_rows),
        torch.from_numpy(batch.log_q) if tc.logq_correction else None, tc.temperature,
        query_ids=torch.from_numpy(batch.customer_rows) if tc.mask_same_customer else None,
        mask_accidental_hits=tc.mask_accidental_hits)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return float(loss.detach())


@contextlib.contextmanager
def training_kernels(threads: int) -> Iterator[None]:
    """The settings every fit runs under (and ``bench/train.py`` with it), restored after.

    Bit-reproducible for a seed at any thread count: torch's deterministic
    kernels are on. (Without them, two 2-thread fits on `small` differed in 32
    of their tensors; with them, in none.) Deterministic mode would also fill
    every new buffer with NaN, in case a kernel read memory it never wrote;
    none of the step's kernels does (``test_train``'s determinism test
    compares every weight), and the fill was an extra pass over each (B, C)
    buffer, so it is off. Freed buffers are kept for reuse
    (``optim.keep_freed_memory``).
    """
    import torch
    import torch.utils.deterministic

    from hm_recsys.training.optim import keep_freed_memory

    keep_freed_memory()
    was = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory,
           torch.get_num_threads())
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.utils.deterministic.fill_uninitialized_memory = was[1]
        torch.set_num_threads(was[2])


def train_epoch(model: TwoTower, optimizers: Sequence[torch.optim.Optimizer], prep: Prepared, config: Config,
                rng: np.random.Generator, progress: bool = True, desc: str = "train") -> tuple[list[float], int]:
    """One pass over the training shards; returns (per-step losses, examples seen)."""
    from tqdm.auto import tqdm

    model.train()
    losses: list[float] = []
    seen = 0
    bar = tqdm(total=prep.n_examples, desc=desc, unit="ex", unit_scale=True, disable=not progress)
    for batch in iterate_batches(prep, config, rng):
        value = train_step(model, optimizers, batch, config)
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {len(losses)}; lower train.lr "
                                     f"or raise train.temperature")
        losses.append(value)
        b = batch.customer_rows.size
        seen += b
        bar.update(b)
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    return losses, seen


def make_optimizers(model: TwoTower, config: Config) -> list[torch.optim.Optimizer]:
    """Sparse Adam for the id tables (only touched rows move; ``RowSparseAdam``), AdamW for the rest."""
    import torch

    from hm_recsys.training.optim import RowSparseAdam

    tc = config.train
    # fused: one kernel over all ~30 dense tensors instead of a dozen ops per tensor (3x faster on CPU)
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(model.dense_parameters(), lr=tc.lr,
                                                           weight_decay=tc.weight_decay, fused=True)]
    sparse = model.sparse_parameters()
    if sparse:
        opts.append(RowSparseAdam(sparse, lr=tc.sparse_lr))
    return opts


def recommender(model: TwoTower, prep: Prepared, history: History, raw: ArticleRaw) -> Recommender:
    from hm_recsys.bundle import Recommender

    return Recommender(model, prep.state, prep.tables, raw, history, article_static=prep.article_static,
                       customer_static=prep.customer_static)


def rank(rec: Recommender, customer_ids: Sequence[str], k: int, exclude_purchased: bool = False,
         batch: int = 8192) -> dict[str, list[str]]:
    """Top-k article ids for each customer (exact), as ``evaluate`` predictions."""
    from hm_recsys.evaluate import predictions_from_index

    ids = list(customer_ids)
    out: dict[str, list[str]] = {}
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        rows, _ = rec.recommend_rows(chunk, k=k, exclude_purchased=exclude_purchased)
        out.update(predictions_from_index(chunk, rec.article_ids, rows))
    return out


def evaluate_valid(model: TwoTower, prep: Prepared, config: Config) -> dict[str, float]:
    """The towers' validation metrics, pooled over every validation customer-week (each week as of its start)."""
    from hm_recsys.evaluate import evaluate_rankings

    tc = config.train
    per_week = []
    for vw in prep.valid:
        rec = recommender(model, prep, vw.history, vw.raw)
        preds = rank(rec, list(vw.truth), tc.eval_k, tc.exclude_purchased)
        per_week.append(evaluate_rankings(preds, vw.truth, ks=(12, tc.eval_k), catalogue_size=prep.tables.n_articles))
    n = np.array([r["n_customers"] for r in per_week])
    out = {k: float(np.dot(n, [r[k] for r in per_week]) / n.sum()) for k in per_week[0] if k != "n_customers"}
    out["n_customers"] = float(n.sum())
    return out


def early_stopping(prep: Prepared, config: Config) -> bool:
    """Whether the validation sample is large enough (``train.min_valid_customers``) to pick the epoch."""
    return sum(len(v.truth) for v in prep.valid) >= config.train.min_valid_customers


def fit(prep: Prepared, config: Config, progress: bool = True,
        on_epoch: typing.Callable[[EpochLog], None] | None = None) -> tuple[TwoTower, list[EpochLog], int]:
    """Train with early stopping; returns (model with the best epoch's weights, epoch logs, best epoch).

    Bit-reproducible for a seed at any thread count (``training_kernels``).
    """
    with training_kernels(config.train.threads):
        return _fit(prep, config, progress, on_epoch)


def _fit(prep: Prepared, config: Config, progress: bool,
         on_epoch: typing.Callable[[EpochLog], None] | None) -> tuple[TwoTower, list[EpochLog], int]:
    import torch

    tc = config.train
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    model = build_model(config, prep.state)
    optimizers = make_optimizers(model, config)
    logs: list[EpochLog] = []
    best, best_epoch, best_state, waited = -math.inf, 0, None, 0
    if not early_stopping(prep, config):
        # too few validation customers to pick an epoch: a fixed number of epochs, the last one kept
        for epoch in range(1, tc.epochs + 1):
            t0 = time.perf_counter()
            losses, seen = train_epoch(model, optimizers, prep, config, rng, progress,
                                       desc=f"epoch {epoch}/{tc.epochs}")
            seconds = time.perf_counter() - t0
            first = sum(len(e.step_losses) for e in logs)
            log = EpochLog(epoch, float(np.mean(losses)), evaluate_valid(model, prep, config), seconds, seen,
                           losses, first)
            logs.append(log)
            if on_epoch:
                on_epoch(log)
        return model.eval(), logs, tc.epochs
    for epoch in range(1, tc.epochs + 1):
        t0 = time.perf_counter()
        losses, seen = train_epoch(model, optimizers, prep, config, rng, progress, desc=f"epoch {epoch}/{tc.epochs}")
        seconds = time.perf_counter() - t0
        valid = evaluate_valid(model, prep, config)
        first = sum(len(e.step_losses) for e in logs)
        log = EpochLog(epoch, float(np.mean(losses)), valid, seconds, seen, losses, first)
        logs.append(log)
        if on_epoch:
            on_epoch(log)
        score = valid[tc.early_stopping_metric]
        if score > best:
            best, best_epoch, waited = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= tc.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    return model.eval(), logs, best_epoch


# ---------------------------------------------------------------------------
# The fusion of candidate sources, fitted on the validation weeks
# ---------------------------------------------------------------------------
def fit_fusion(model: TwoTower, prep: Prepared, config: Config, warehouse: Warehouse, scratch: Path,
               label: str, progress: bool = True) -> Fusion:
    """Fit the fusion on the validation weeks' buyers, never the holdout.

    Each validation week is served as it would have been: a served state as
    of the week's start (``served.build_state``: features replayed, the
    candidate tables, the index), the candidates of the week's (sampled)
    buyers from every source, labelled by what they bought that week.
    """
    from hm_recsys import fusion as fusion_mod
    from hm_recsys.candidates import Candidates
    from hm_recsys.fusion import Fusion
    from hm_recsys.served import build_state

    rec = recommender(model, prep, prep.end_history, prep.end_raw)
    parts, labels, offset = [], [], 0
    for vw in prep.valid:
        ids = sorted(vw.truth)
        state = build_state(rec, warehouse, vw.as_of, label, scratch / f"valid-state-{vw.as_of}", config.retrieval,
                            Fusion.single("two_tower"), customers=ids, progress=progress)
        cands, _ = state.candidates(ids)
        labels.append(state.labels(cands, ids, vw.truth))
        parts.append(dataclasses.replace(cands, group=cands.group + offset))
        offset += cands.n_customers
    pooled = Candidates(np.concatenate([p.group for p in parts]), np.concatenate([p.rows for p in parts]),
                        np.concatenate([p.features for p in parts]), np.concatenate([p.bought for p in parts]), offset)
    y = np.concatenate(labels)
    fitted = fusion_mod.fit(pooled, y, features=config.retrieval.fusion_features, prior=config.retrieval.fusion_prior)
    facts = {**fitted.fitted, "weeks": [vw.as_of.isoformat() for vw in prep.valid],
             "candidates_per_customer": round(y.size / max(offset, 1), 1),
             "candidate_recall": round(float(y.sum()) / max(sum(len(v) for vw in prep.valid for v in vw.truth.values()),
                                                           1), 4)}
    return dataclasses.replace(fitted, fitted=facts)

