"""Compiled loops (numba): the training step's scattered row updates, history slots, exact top-k selection.

On CPU, torch runs ``index_add_`` through its generic scatter kernel, one
scalar at a time (~1 ms for 35k rows of 16 floats, ~5 ns an element), and a
lazy Adam update needs a dozen ops a table: find the touched rows, sum their
duplicates, gather the parameter and both moments, update, scatter all three
back. Each loop here makes one pass instead: no temporary tables, no sort.

Every loop is serial and visits its input in order, so its result is the
same at any thread count and on every run: sums of duplicate rows are taken
in index order (as ``index_add_`` does on CPU, so ``add_rows`` is bit for bit
``index_add_``). Compiled on first use and cached next to this file
(``__pycache__``; ``NUMBA_CACHE_DIR`` moves it), so later processes load it;
where no cache location is writable each process compiles its own (~1-3 s a
kernel).

The arrays are the CPU tensors' own memory (``tensor.numpy()``; strided
views are fine); callers bump a parameter's autograd version themselves
after writing it. Indices are not bounds-checked: they come from tensors
that torch has already used to index the same tables.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_JIT = {"nogil": True, "error_model": "numpy", "boundscheck": False}
_AHEAD = 16  # lazy_adam: rows whose memory is requested ahead of their update
_DENSE = 16  # lazy_adam: visit the touched rows in table order when at least 1 in _DENSE rows is touched


def _compiled(f):
    """``numba.njit`` with an on-disk cache, or without one where no cache location is writable."""
    try:
        return numba.njit(cache=True, **_JIT)(f)
    except RuntimeError:  # "cannot cache function ...: no locator available" (read-only install, no NUMBA_CACHE_DIR)
        return numba.njit(cache=False, **_JIT)(f)


@intrinsic
def _prefetch(typingctx, array, row):  # pragma: no cover (compiled)
    """Hint the CPU to fetch ``array[row]``'s first element for writing (``llvm.prefetch``; no effect on results).

    Works for 1-D and 2-D arrays (a 2-D row's first cache line); out-of-range
    rows are harmless (a prefetch never faults), but callers pass valid ones.
    """
    if not isinstance(array, types.Array) or not isinstance(row, types.Integer) or array.ndim not in (1, 2):
        return None

    def codegen(context, builder, signature, args):
        array_type, row_type = signature.args
        arr = context.make_array(array_type)(context, builder, args[0])
        index = [context.cast(builder, args[1], row_type, types.intp)]
        index += [context.get_constant(types.intp, 0)] * (array_type.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, array_type, arr, index, wraparound=False)
        byte_ptr, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, byte_ptr), i32(1), i32(3), i32(1)])  # write, keep in all levels, data
        return context.get_dummy_value()

    return types.void(array, row), codegen


@_compiled
def add_rows(out: np.ndarray, index: np.ndarray, src: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out[index[i]] += src[i]`` for each i in order (``out.index_add_(0, index, src)``); 1-D or 2-D."""
    if out.ndim == 1:
        for i in range(index.shape[0]):
            out[index[i]] += src[i]
    else:
        d = out.shape[1]
        for i in range(index.shape[0]):
            r = index[i]
            for j in range(d):
                out[r, j] += src[i, j]


@_compiled
def lazy_adam(param: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, index: np.ndarray,
              values: np.ndarray, slot: np.ndarray, one_minus_beta1: np.float32, one_minus_beta2: np.float32,
              step_size: np.float32, eps: np.float32) -> int:  # pragma: no cover (compiled)
    """SparseAdam's update of the rows a COO gradient ``(index, values)`` touches; returns how many.

    A row's gradient is the sum of its values in index order. Then, for each
    touched row r (float32 throughout, like the torch ops it replaces)::

        m_r += (1 - beta1) * (g_r - m_r);  v_r += (1 - beta2) * (g_r^2 - v_r)
        p_r -= step_size * m_r / (sqrt(v_r) + eps),  step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)

    ``slot`` is caller-owned scratch, ``int32`` of the table's length, all
    ``-1``; it is left all ``-1`` again (only touched entries are reset).

    In a training step the touched rows of the three tables are cache misses
    (a step's products stream ~20 MiB through the cache in between), so the
    update is bound by memory latency, not arithmetic: the rows are visited
    in table order where they are dense enough for a pass over ``slot`` to
    find them cheaply (ascending addresses, which the hardware prefetcher
    follows), and each row's memory is requested ``_AHEAD`` rows early. Rows
    are updated independently, so the order changes no result.
    """
    n, d = index.shape[0], values.shape[1]
    rows = np.empty(n, np.int64)
    acc = np.empty((n, d), values.dtype)
    touched = 0
    for i in range(n):
        if i + _AHEAD < n:
            _prefetch(slot, index[i + _AHEAD])
        r = index[i]
        s = slot[r]
        if s < 0:
            slot[r] = touched
            rows[touched] = r
            for j in range(d):
                acc[touched, j] = values[i, j]
            touched += 1
        else:
            for j in range(d):
                acc[s, j] += values[i, j]
    if touched * _DENSE >= slot.shape[0]:  # table order: one pass over slot (4 bytes a row) finds them
        c = 0
        for r in range(slot.shape[0]):
            if slot[r] >= 0:
                rows[c] = r
                c += 1
    for k in range(touched):
        if k + _AHEAD < touched:
            ahead = rows[k + _AHEAD]
            _prefetch(param, ahead)
            _prefetch(exp_avg, ahead)
            _prefetch(exp_avg_sq, ahead)
        r = rows[k]
        a = slot[r]
        slot[r] = -1
        for j in range(d):
            g = acc[a, j]
            m = exp_avg[r, j]
            m += one_minus_beta1 * (g - m)
            v = exp_avg_sq[r, j]
            v += one_minus_beta2 * (g * g - v)
            exp_avg[r, j] = m
            exp_avg_sq[r, j] = v
            param[r, j] -= step_size * m / (np.sqrt(v) + eps)
    return touched


@_compiled
def bag_weights(index: np.ndarray, weights: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:  # pragma: no cover
    """``out[b, starts[k] + index[b, l, k]] += weights[b, l]``: the (B, width) bag-weight rows of K small tables.

    Visits (b, l, k) in that order, skipping zero weights (padding slots):
    the sums are ``index_add_``'s over the flattened slots, bit for bit.
    """
    n, length, k = index.shape
    out = np.zeros((n, width), weights.dtype)
    for b in range(n):
        for slot in range(length):
            w = weights[b, slot]
            if w == 0:
                continue
            for t in range(k):
                out[b, starts[t] + index[b, slot, t]] += w
    return out


@_compiled
def real_slots(index: np.ndarray, weights: np.ndarray, pad: int):  # pragma: no cover (compiled)
    """The non-padding slots of (B, L) history bags, in (b, l) order: ``(rows, weights, bag starts, bag of each)``.

    ``rows``/``weights`` are the slots' table rows and weights, ``starts[b]``
    where bag b's slots begin (``F.embedding_bag``'s offsets), ``bag[i]`` the
    bag slot i belongs to.
    """
    n, length = index.shape
    rows = np.empty(n * length, np.int64)
    w = np.empty(n * length, weights.dtype)
    bag = np.empty(n * length, np.int64)
    starts = np.empty(n, np.int64)
    c = 0
    for b in range(n):
        starts[b] = c
        for slot in range(length):
            r = index[b, slot]
            if r != pad:
                rows[c] = r
                w[c] = weights[b, slot]
                bag[c] = b
                c += 1
    return rows[:c], w[:c], starts, bag[:c]


@_compiled
def bag_gradient(grad: np.ndarray, bag: np.ndarray, w: np.ndarray, extra: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Rows ``grad[bag[i]] * w[i]`` for each slot, then the rows of ``extra``: a sparse gradient's values."""
    n, d = bag.shape[0], grad.shape[1]
    out = np.empty((n + extra.shape[0], d), grad.dtype)
    for i in range(n):
        b, wi = bag[i], w[i]
        for j in range(d):
            out[i, j] = grad[b, j] * wi
    out[n:] = extra
    return out


@_compiled
def history_slots(start: np.ndarray, count: np.ndarray, article_rows: np.ndarray, days_ago: np.ndarray,
                  table: np.ndarray, length: int):  # pragma: no cover (compiled)
    """Customers' padded histories as the customer tower reads them: ``(rows, days, real)``.

    Customer b's history is ``article_rows[start[b]:start[b] + count[b]]``
    (most recent first) with ``days_ago`` beside it; its first ``length``
    slots are read. ``rows`` ``(n, length, k)``: the ``table`` row of each
    slot's article (its last row, the padding, for empty slots and negative
    article rows); ``days`` ``(n, length)`` int32: days ago, at least 0, and
    0 on empty slots; ``real`` ``(n, length)``: slot holds an article. One
    pass, instead of NumPy's repeat/scatter/gather over every slot.
    """
    n, k = start.shape[0], table.shape[1]
    pad = table.shape[0] - 1
    rows = np.empty((n, length, k), table.dtype)
    days = np.zeros((n, length), np.int32)
    real = np.zeros((n, length), np.bool_)
    for b in range(n):
        m = min(count[b], length)
        s = start[b]
        for slot in range(length):
            a = pad
            if slot < m:
                x = article_rows[s + slot]
                if x >= 0:
                    a = x
                    real[b, slot] = True
                d = days_ago[s + slot]
                days[b, slot] = d if d > 0 else 0
            for t in range(k):
                rows[b, slot, t] = table[a, t]
    return rows, days, real


@_compiled
def rows_at_least(scores: np.ndarray, threshold: np.ndarray, k: int):  # pragma: no cover (compiled)
    """Each row's k highest scores, best first, equal scores by lower column: ``(columns int64, scores)``, (n, k).

    Only the columns scoring at least ``threshold[i]`` are ranked, so the
    threshold must be a lower bound of row i's k-th highest score
    (``arrays.top_k`` takes the k-th highest of its block maxima). A row
    where fewer than k columns reach it (NaN scores) is ranked whole.
    """
    n, m = scores.shape
    cols = np.empty((n, k), np.int64)
    vals = np.empty((n, k), scores.dtype)
    cand = np.empty(m, np.int64)
    for i in range(n):
        row = scores[i]
        t = threshold[i]
        c = 0
        for j in range(m):
            if row[j] >= t:
                cand[c] = j
                c += 1
        if c < k:
            c = m
            for j in range(m):
                cand[j] = j
        picked = cand[:c]
        order = np.argsort(-row[picked], kind="mergesort")  # stable: ties keep the ascending columns
        for p in range(k):
            cols[i, p] = picked[order[p]]
            vals[i, p] = row[cols[i, p]]
    return cols, vals
