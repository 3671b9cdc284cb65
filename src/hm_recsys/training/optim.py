"""The training step's two memory-bound parts, fused: the sampled-softmax cross-entropy and the sparse Adam.

Profiling a full-scale step (``bench/train.py --profile``: B = 2048 positives,
C = 2560 candidates, 12.6M parameters of which 12.4M in id tables, 2 threads)
showed the matrix products were not where the time went:

* ``F.cross_entropy`` over the (B, C) logits, after masking them with an
  autograd-tracked ``index_put_``, made four full passes with fresh (B, C)
  buffers in the backward (mask, NLL, log-softmax, each zero-filled or copied);
* ``torch.optim.SparseAdam`` coalesced every sparse gradient by sorting and
  built several sparse tensors per table.

``sampled_softmax_loss`` is one autograd node over one (B, C) buffer: the
corrected, masked logits, their softmax in place (the loss from its
diagonal), and in the backward ``(softmax - onehot) / B`` in place, from which
both matrix products are taken.
``RowSparseAdam`` is SparseAdam's update (lazy Adam: only the rows a batch
touched move, bias correction by the global step) in one compiled pass a
table (``hm_recsys.kernels``). Both are deterministic on CPU (no atomics; the
duplicate rows of a gradient are summed in index order; every other write
goes to distinct rows).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
from collections.abc import Iterator

import numpy as np
import torch

from hm_recsys.kernels import lazy_adam

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
_TINY = torch.finfo(torch.float32).tiny
_LOG_TINY = math.log(_TINY) + 10  # below: a softmax entry near float32's smallest normal
_NO_PAIRS = torch.zeros(0, dtype=torch.int64)


def keep_freed_memory() -> bool:
    """Let this process reuse freed tensor buffers instead of returning them to the OS (glibc only).

    A step allocates several (B, C) buffers of ~20 MiB; above glibc's dynamic
    mmap threshold each is a fresh ``mmap`` whose pages fault in on first touch
    and go back with ``munmap`` when freed, every step. Raising the mmap
    threshold to its ceiling and the trim threshold to 1 GiB keeps them in the
    heap for reuse: 10-25% of a full-scale step (``bench/train.py``). The cost
    is that the process keeps up to 1 GiB of freed memory. Returns whether it
    applied (False off glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def masked_logits(scaled: torch.Tensor, candidates: torch.Tensor, log_q: torch.Tensor | None,
                  rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """``scaled @ candidates.T - log_q``, with ``-inf`` at the masked ``(rows, cols)``.

    The correction rides in the product as one more inner dimension
    (``[scaled, 1] @ [candidates, -log_q].T``): ``addmm`` would first copy the
    broadcast ``-log_q`` into the whole (B, C) output, a pass over ~20 MiB
    (~2-6 ms of a full-scale step) that the product with K = 65 does not
    need (it runs as fast as K = 64).
    """
    if log_q is None:
        logits = scaled @ candidates.T
    else:
        ones = torch.ones((scaled.shape[0], 1), dtype=scaled.dtype)
        logits = torch.cat([scaled, ones], 1) @ torch.cat([candidates, log_q.neg().unsqueeze(1)], 1).T
    if rows is not None and cols is not None and rows.numel():
        with _distinct_rows():  # every write stores -inf: no sort needed
            logits.index_put_((rows, cols), torch.tensor(float("-inf")))
    return logits


class _SampledSoftmax(torch.autograd.Function):
    """Mean over rows of ``-log softmax(logits)[i, i]`` with ``logits = q / t @ c.T - log_q``, masked."""

    @staticmethod
    def forward(ctx, queries: torch.Tensor, candidates: torch.Tensor, log_q: torch.Tensor | None,  # type: ignore[override]
                rows: torch.Tensor, cols: torch.Tensor, temperature: float) -> torch.Tensor:
        scaled = queries / temperature  # (B, d): cheaper than dividing the (B, C) product
        logits = masked_logits(scaled, candidates, log_q, rows, cols)
        # in place: one (B, C) buffer for logits, softmax and gradient (it then fits in a 32 MiB L3 at full scale)
        p = torch.ops.aten._softmax.out(logits, 1, False, out=logits)
        log_p = p.diagonal().log()
        low = log_p < _LOG_TINY  # so small it may have rounded: exact from these rows' logits, recomputed
        if bool(low.any()):
            r = low.nonzero().squeeze(1)
            keep = torch.isin(rows, r)
            z = masked_logits(scaled.index_select(0, r), candidates, log_q, torch.searchsorted(r, rows[keep]), cols[keep])
            log_p[r] = z.gather(1, r.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=1)
        ctx.save_for_backward(p, scaled, candidates)
        ctx.temperature = temperature
        return -log_p.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        p, scaled, candidates = ctx.saved_tensors
        scale = grad / p.shape[0]
        g = p.mul_(scale)  # the saved buffer is ours and read once more: (softmax - onehot) / B in place
        g.diagonal().sub_(scale)
        grad_q = (g @ candidates).div_(ctx.temperature) if ctx.needs_input_grad[0] else None
        grad_c = g.T @ scaled if ctx.needs_input_grad[1] else None
        return grad_q, grad_c, None, None, None, None


def sampled_softmax_loss(queries: torch.Tensor, candidates: torch.Tensor, log_q: torch.Tensor | None,
                         temperature: float, masked: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``F.cross_entropy(q / t @ c.T - log_q, arange(B))`` with ``-inf`` at the ``masked`` (rows, cols).

    Candidate i < B is query i's positive (C >= B). One (B, C) buffer holds
    the logits, then their softmax (in place), then in the backward the
    gradient ``(softmax - onehot) / B`` (in place again), from which both
    matrix products are taken: the logits' product, the mask and the
    softmax are one autograd node. Rows whose positive's probability
    underflows get their loss exactly from recomputed logits (logsumexp).
    The graph can be backpropagated once (no ``retain_graph``).
    """
    b, c = queries.shape[0], candidates.shape[0]
    if queries.dim() != 2 or candidates.dim() != 2 or c < b:
        raise ValueError(f"expected (B, d) queries and (C >= B, d) candidates, got {tuple(queries.shape)} and "
                         f"{tuple(candidates.shape)}")
    rows, cols = masked if masked is not None else (_NO_PAIRS, _NO_PAIRS)
    return _SampledSoftmax.apply(queries, candidates, log_q, rows, cols, temperature)


class RowSparseAdam(torch.optim.Optimizer):
    """``torch.optim.SparseAdam``'s update for sparse (COO) gradients, in one compiled pass a table.

    For each parameter with a gradient, ``kernels.lazy_adam`` sums each
    touched row's gradient (duplicates in index order), then updates Adam's
    moments and the parameter on those rows only::

        m_r += (1 - beta1) * (g_r - m_r);  v_r += (1 - beta2) * (g_r^2 - v_r)
        p_r -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m_r / (sqrt(v_r) + eps)

    where t counts this optimizer's steps (as in SparseAdam). No sort, no
    gathered copies of the tables: one pass over the gradient, one read and
    write of each touched row. In torch ops the same update took ~20 ops and
    ~4 ms a table at full scale (find the rows with a mask over the table,
    sum duplicates with ``index_add_``'s scalar scatter, gather, update,
    scatter back three tables).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid RowSparseAdam settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("RowSparseAdam takes no closure")
        # (Running the tables on threads of their own measured faster beside another step in one process, but
        # 30-40% slower alone: each calling thread gets its own OpenMP team, whose workers then spin against
        # the main thread's matrix products.)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowSparseAdam takes sparse gradients; use Adam(W) for dense parameters")
                if p.device.type != "cpu" or p.dtype != torch.float32 or p.dim() != 2 or not p.is_contiguous():
                    raise RuntimeError(f"RowSparseAdam updates contiguous float32 CPU tables, got {p.dtype} "
                                       f"{tuple(p.shape)} on {p.device}")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                _update(p, state, group, self._slot(p))

    def _slot(self, p: torch.Tensor) -> np.ndarray:
        """``lazy_adam``'s scratch for ``p``: int32, one per row, all -1 between steps (not part of the state:
        rebuilt after a copy or a load)."""
        slots = self.__dict__.setdefault("_slots", {})
        slot = slots.get(id(p))
        if slot is None or slot.shape[0] != p.shape[0]:
            slot = slots[id(p)] = np.full(p.shape[0], -1, dtype=np.int32)
        return slot

    def state_tensors(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) moment tables of ``p``, shaped like it (zeros before its first step)."""
        state = self.state[p]
        if "exp_avg" not in state:
            return torch.zeros_like(p), torch.zeros_like(p)
        return state["exp_avg"], state["exp_avg_sq"]


def _update(p: torch.Tensor, state: dict, group: dict, slot: np.ndarray) -> None:
    """One table's lazy Adam update on the rows its gradient touched, in one compiled pass (``kernels.lazy_adam``)."""
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    index, values = p.grad._indices()[0], p.grad._values()  # coalesced or not: lazy_adam sums duplicates
    if index.numel() == 0:
        return
    t = state["step"]
    step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    f32 = np.float32
    lazy_adam(p.detach().numpy(), state["exp_avg"].numpy(), state["exp_avg_sq"].numpy(),
              index.contiguous().numpy(), values.contiguous().numpy(), slot,
              f32(1.0 - beta1), f32(1.0 - beta2), f32(step_size), f32(eps))
    torch.autograd.graph.increment_version(p)  # written through numpy: tell autograd, as an in-place op would


@contextlib.contextmanager
def _distinct_rows() -> Iterator[None]:
    """Deterministic mode off for writes to distinct rows: one result whatever the order, so no sort needed."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
