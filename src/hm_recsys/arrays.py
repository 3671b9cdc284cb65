"""Array helpers shared by the hot paths.

``unique``: the sorted distinct values of an integer array. numpy >= 2.3
answers a plain ``np.unique(x)`` (no ``return_*``) with a hash table, which on
this code's keys (``group * n_articles + row``: wide, ~1M values) is 12-14x
slower than sorting: 0.74 vs 0.06 s on 1M int64 keys with numpy 2.4
(``candidates.generate`` spent 15 of the gate's 34 s scoring 70k buyers in
it). Same values, same order, same dtype.

``scores_into``: chunks of ``queries @ embeddings.T`` written into one buffer
(``score_buffer``) instead of a fresh array per chunk. A fresh (1,024, 105k)
chunk is a new ~430 MB mapping whose pages fault in on first write: 252 ms
of a chunk's product against 88 ms into a reused buffer at full scale (the
exact searches of validation, tuning and evaluation run thousands of them).
Same BLAS call, same values.

``top_k``: each row's k highest scores, exactly, ties by lower column. A
lower bound of the k-th highest score (the k-th highest of 4k block maxima,
``amax`` over a view) leaves ~k columns to rank per row
(``kernels.rows_at_least``): 2x ``torch.topk``'s time on (1,024, 105k)
scores, whose selection also left ties at the k-th place to chance.
"""

from __future__ import annotations

import numpy as np


def unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` for a 1-D array, by sort and compare (see the module docstring)."""
    s = np.sort(np.asarray(values).ravel())
    if s.size < 2:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def score_buffer(rows: int, embeddings: np.ndarray) -> np.ndarray:
    """A ``(rows, len(embeddings))`` buffer for ``scores_into``, allocated once per search."""
    return np.empty((rows, embeddings.shape[0]), dtype=np.result_type(embeddings.dtype, np.float32))


def scores_into(queries: np.ndarray, embeddings: np.ndarray, buffer: np.ndarray | None) -> np.ndarray:
    """``queries @ embeddings.T``, written into ``buffer``'s first rows when given (see the module docstring).

    The result is a view of ``buffer``: valid until the next call with it.
    """
    if buffer is None or np.result_type(queries.dtype, embeddings.dtype) != buffer.dtype:
        return queries @ embeddings.T
    return np.matmul(queries, embeddings.T, out=buffer[:queries.shape[0]])


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(columns int64 (n, k'), scores (n, k'))``: each row's k highest, best first, equal scores by lower
    column; ``k' = min(k, n_columns)`` (see the module docstring)."""
    import torch

    from hm_recsys.kernels import rows_at_least

    scores = np.ascontiguousarray(scores)
    n, m = scores.shape
    k = min(int(k), m)
    width = m // (4 * k) if k else 0
    if width < 2:  # few columns: rank them all
        threshold = np.full(n, -np.inf, dtype=scores.dtype)
    else:
        blocks = torch.from_numpy(scores)[:, :4 * k * width].view(n, 4 * k, width).amax(2)
        threshold = torch.topk(blocks, k, dim=1, sorted=False).values.amin(1).numpy()
    return rows_at_least(scores, threshold, k)
