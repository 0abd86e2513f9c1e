"""The fast training paths (pure PyTorch, CPU and GPU) of ReLU and TopK JSAEs: encoder, decoder and
alignment on the active codes only, as tensor-only functions.  They compute codes and reconstructions; the loss
is :class:`jsae.saes.joint_sae.TrainingJointSAE`'s one definition, read from them.

An L1-trained ReLU SAE soon has only a few per cent of its codes non-zero, yet a plain autograd step spends
six dense ``[B, d_in] x [d_in, d_sae]`` matmuls on it: the encoder forward, the decoder forward, and four in
the backward (the code gradient ``grad_recon @ W_dec^T``, ``grad_W_dec = z^T @ grad_recon``,
``grad_W_enc = sae_in^T @ grad_pre`` and ``grad_sae_in = grad_pre @ W_enc^T`` for ``b_dec``).  The
gradient of every loss term with respect to an inactive pre-activation is zero (the ReLU's), so only the
encoder forward must stay dense.  Here, with the active entries of ``relu(pre)`` as :class:`SparseCodes`:

* the decoder forward is ``embedding_bag`` over ``W_dec`` with one bag per sample (:class:`CsrMM`);
* the code gradient is needed only on the active entries: ``torch.sparse.sampled_addmm`` (a sampled
  dense-dense product, SDDMM) instead of the dense ``grad_recon @ W_dec^T``;
* ``grad_W_dec`` and ``grad_W_enc`` are ``embedding_bag`` over ``grad_recon`` and ``sae_in`` with the entries
  grouped by latent (one bag per latent, :class:`Bags`);
* ``grad_b_dec`` through the centred input is ``-W_enc @ grad_b_enc`` (a matrix-vector product) instead of
  the dense ``grad_pre @ W_enc^T``;
* the L1 term is the sum of the active values, and the alignment terms (:data:`SPARSE_ALIGNMENTS`) are
  computed from the codes of the two modalities directly: cosine (:class:`SparseCosine`, analytic backward) from
  each entry's partner in the other modality (:func:`partner_values`: a gather from that modality's dense codes,
  which the ReLU path has anyway) and L2 from the matching entries (``searchsorted`` on the row-major linear
  indices), InfoNCE's ``[B, B]`` logits as one more :class:`CsrMM` against the other modality's normalised codes;
* the entries are grouped by latent with one stable sort on one thread
  (:func:`argsort_latents`), and the trainer's dead-latent statistics come from the
  per-latent counts (``JointStepOutput.fired``) instead of a pass over the dense codes.

The TopK path uses the same functions on its ``k`` selected entries per sample (:func:`topk_codes`), its
auxiliary loss on the top dead latents' entries.  One modality's path is one function: :func:`relu_sparse_codes`,
:func:`relu_dense_codes`, :func:`topk_sparse_codes` (with :func:`sparse_aux_reconstruction`).

Cost of a step: one dense matmul (the encoder forward) plus ``O(nnz · d_in)`` work, which the caller runs on one
intra-op thread (:func:`one_thread`).  When the codes are dense (early in training) :class:`EncoderFromPre` still
saves the ``grad_sae_in`` matmul and :class:`DenseCosine` computes the cosine alignment with an analytic backward:
the caller picks the path from the measured density (``TrainingJointSAE.sparse_relu_max_density``, by default
:func:`sparse_switch_density` of the SAE's width, with hysteresis: ``sparse_relu_stay_factor``).  The trainer runs its optimiser step on the thread count that
:class:`ThreadPick` measures faster.  Results equal the dense
autograd path (``TrainingJointSAE(..).paired_forward_pass(.., dense=True)``) up to float summation order
(``tests/test_fast_relu.py``, ``tests/test_synthetic.py``, ``tests/test_reference_options.py``).  Everything here takes and
returns tensors only; :class:`jsae.saes.joint_sae.TrainingJointSAE` composes it.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Bags", "CsrMM", "DENSE_ALIGNMENTS", "DenseCosine", "EncoderFromPre", "SPARSE_ALIGNMENTS", "SparseCodes", "SparseCosine", "SparseReluEncoder", "ThreadPick",
           "active_entries", "argsort_latents", "csr_mm", "encoder_from_pre", "relu_codes", "relu_dense_codes",
           "one_thread", "partner_values", "sparse_switch_density", "relu_sparse_codes", "sparse_aux_reconstruction", "sparse_relu_encode", "topk_codes",
           "topk_sparse_codes"]


# Where the ReLU path turns sparse, by width (benchmarks/train_throughput.py --crossover: one paired forward + backward
# on sparse and on dense codes, interleaved, at set densities; 2 threads, a shared 2-core machine under load 3.4-3.6,
# benchmarks/results/train_throughput_relu_crossover*.json).  The sparse step's cost per active entry grows with the
# weight matrices (its row gathers leave the cache), the dense one's does not, so the break-even density falls with
# d_in * d_sae: at 512 -> 4096 (2**21 weights) the sparse step took 0.53, 0.66, 0.73, 0.84, 1.18 of the dense-code
# step at 5, 10, 15, 20, 30% density (load 3.6; at load 4.3: 0.39, 0.42, 0.74, 0.99, 1.13 at 2, 5, 10, 20, 30%;
# break-even 20-25%); at 4096 -> 16384 (2**26) 0.62, 1.10, 0.92, 1.83 at 4, 7, 10, 15% (break-even ~9%).  The switch
# sits at or below the break-even, log-linearly between the two measured widths.
SPARSE_SWITCH_SMALL = (2**21, 0.2)  # (d_in * d_sae, density at which the path turns sparse)
SPARSE_SWITCH_LARGE = (2**26, 0.07)


def sparse_switch_density(d_in: int, d_sae: int) -> float:
    """The code density at or below which the ReLU fast path runs sparse, for a ``d_in -> d_sae`` SAE: 0.2 up to
    2**21 weights, 0.07 from 2**26, log-linear in ``d_in * d_sae`` between (see ``SPARSE_SWITCH_SMALL``)."""
    (n0, rho0), (n1, rho1) = SPARSE_SWITCH_SMALL, SPARSE_SWITCH_LARGE
    t = min(1.0, max(0.0, (math.log2(max(1, d_in * d_sae)) - math.log2(n0)) / (math.log2(n1) - math.log2(n0))))
    return rho0 * (rho1 / rho0) ** t


@contextlib.contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Inside the block torch runs on one intra-op thread (when ``enabled``); the thread count is restored on exit.

    The sparse steps are hundreds of small operations (index, gather, ``embedding_bag``, ``index_add``) on
    ``O(nnz)`` entries: on more than one thread each pays a barrier, and with OpenMP's default spin-wait policy the
    threads spin against each other when the cores are shared (the sparse ReLU step at 512 -> 4096, 1024 pairs,
    under load 7: 2.9 units on one thread, 7.1 on two spinning ones).  Only the dense encoder matmul, outside the
    block, uses every thread."""
    if not enabled or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ThreadPick:
    """Runs a recurring block of memory-bound work (the trainer's optimiser step and decoder housekeeping) on the
    intra-op thread count that this machine, at this load, runs it faster on: one thread or the caller's count.

    Every ``every`` calls, ``probes`` calls on each count (alternating, after one untimed call) are timed and the
    count with the lower median kept until the next probe.  Which count wins depends on the machine: with OpenMP's
    default spin-wait policy on shared cores (a 2-core machine under load 4) the optimiser step of a 512 -> 4096
    JSAE took 290-350 ms on two threads and 40-60 ms on one; with ``OMP_WAIT_POLICY=PASSIVE`` 41-45 ms on two and
    52-55 on one; a many-core machine gains from its threads.  Only work whose result does not depend on the thread
    count belongs in the block (element-wise updates, per-tensor and per-row norms), so the choice changes timing,
    never the numbers."""

    def __init__(self, probes: int = 3, every: int = 500):
        if probes < 1 or every < 2 * probes + 1:
            raise ValueError(f"ThreadPick needs probes >= 1 and every >= 2 * probes + 1, got {probes}, {every}")
        self.probes, self.every = probes, every
        self.calls = 0
        self.times: dict[int, list[float]] = {}
        self.one: bool = False  # whether one thread won the latest probe

    def threads_for(self, phase: int, threads: int) -> int:
        """The count the block runs on at ``phase`` (its call number modulo ``every``) under ``threads``."""
        if 1 <= phase <= 2 * self.probes:
            return 1 if phase % 2 else threads
        return 1 if self.one else threads

    @contextlib.contextmanager
    def block(self, enabled: bool = True) -> Iterator[None]:
        threads = torch.get_num_threads()
        if not enabled or threads == 1:
            yield
            return
        phase = self.calls % self.every
        n = self.threads_for(phase, threads)
        if phase == 1:
            self.times = {}
        torch.set_num_threads(n)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            torch.set_num_threads(threads)
            self.calls += 1
            if 1 <= phase <= 2 * self.probes:
                self.times.setdefault(n, []).append(elapsed)
                if phase == 2 * self.probes:
                    median = {k: sorted(v)[len(v) // 2] for k, v in self.times.items()}
                    self.one = 1 in median and median[1] < min((median[k] for k in median if k != 1), default=math.inf)


def argsort_latents(latents: Tensor) -> Tensor:
    """A stable argsort of 1-D int64 latent indices; on CPU on one thread.

    PyTorch sorts int64 on CPU with a parallel radix sort whose thread barriers stall when the cores are
    shared: 85k keys on the 2-core machine under load 3.7 took median 6 ms, 90th percentile 176 ms on 2
    threads, against median 1.4 ms, max 5.5 ms on one (a float32-key argsort: median 40 ms)."""
    with one_thread(latents.device.type == "cpu"):
        return torch.argsort(latents, stable=True)


class Bags(NamedTuple):
    """The entries of sparse codes grouped by latent (one bag per latent, for ``embedding_bag``)."""

    order: Tensor  # permutation of the entries that sorts them by latent
    sample_of_entry: Tensor  # the sample of each sorted entry
    offsets: Tensor  # [n_latents] start of each latent's run, as embedding_bag wants


class SparseCodes(NamedTuple):
    """The active entries of codes ``[B, d_sae]`` (ReLU's positive ones, or TopK's ``k`` a row), in row-major
    order; the values travel separately, as the differentiable tensor."""

    rows: Tensor  # [nnz] the sample of each entry
    cols: Tensor  # [nnz] the latent of each entry
    linear: Tensor  # [nnz] rows * d_sae + cols, ascending
    offsets: Tensor  # [B] where each sample's entries start (embedding_bag offsets)
    bags: Bags  # the entries grouped by latent
    latent_counts: Tensor  # [d_sae] how many samples fired each latent
    shape: tuple[int, int]  # (B, d_sae)
    dense: Tensor | None = None  # [B, d_sae] the codes without gradient (the values at `linear`, 0 elsewhere) if known

    @property
    def density(self) -> float:
        return self.rows.numel() / max(1, self.shape[0] * self.shape[1])


def _starts(counts: Tensor) -> Tensor:
    """Where each run starts, given the run lengths (an exclusive cumulative sum)."""
    return counts.cumsum(0) - counts


def active_entries(pre: Tensor, positive: Tensor | None = None) -> Tensor:
    """The row-major linear indices of the positive entries of ``pre`` (``positive``: the caller's ``pre > 0``)."""
    return torch.nonzero((pre > 0 if positive is None else positive).reshape(-1)).squeeze(1)


def relu_codes(pre: Tensor, linear: Tensor | None = None) -> tuple[SparseCodes, Tensor]:
    """``(codes, values)``: the positive entries of ``pre [B, d_sae]`` (no gradient) and their values;
    ``linear`` is :func:`active_entries` of ``pre`` when the caller has it already."""
    n, d_sae = pre.shape
    linear = active_entries(pre) if linear is None else linear
    values = pre.reshape(-1).index_select(0, linear)  # index_select: ~1.5x aten::index's speed on 1-D gathers
    rows = torch.div(linear, d_sae, rounding_mode="floor")
    cols = linear - rows * d_sae
    order = argsort_latents(cols)
    counts = torch.bincount(cols, minlength=d_sae)
    bags = Bags(order, rows.index_select(0, order), _starts(counts))
    return SparseCodes(rows, cols, linear, _starts(torch.bincount(rows, minlength=n)), bags, counts, (n, d_sae)), values


def topk_codes(pre: Tensor, k: int) -> tuple[SparseCodes, Tensor]:
    """``(codes, values)`` of the ``k`` largest entries of each row of ``pre [B, d_sae]`` (values not clamped:
    the caller applies the ReLU), each row's entries in ascending latent order so that ``linear`` ascends."""
    n, d_sae = pre.shape
    top = pre.topk(k, dim=-1, sorted=False)
    idx, within = top.indices.sort(dim=-1)
    cols = idx.reshape(-1)
    rows = torch.arange(n, device=pre.device).repeat_interleave(k)
    order = argsort_latents(cols)
    counts = torch.bincount(cols, minlength=d_sae)
    bags = Bags(order, torch.div(order, k, rounding_mode="floor"), _starts(counts))
    offsets = torch.arange(0, n * k, k, device=pre.device)
    codes = SparseCodes(rows, cols, rows * d_sae + cols, offsets, bags, counts, (n, d_sae))
    return codes, top.values.gather(-1, within).reshape(-1)


def _by_latent(weights: Tensor, rows_of: Tensor, codes: SparseCodes) -> Tensor:
    """``out[j] = sum over the entries e of latent j of weights[e] * rows_of[row(e)]``: ``[d_sae, d]``."""
    bags = codes.bags
    return F.embedding_bag(bags.sample_of_entry, rows_of.contiguous(), bags.offsets,
                           per_sample_weights=weights.index_select(0, bags.order).to(rows_of.dtype), mode="sum")


def _sampled(grad_out: Tensor, W: Tensor, codes: SparseCodes) -> Tensor:
    """``grad_out[row(e)] · W[col(e)]`` for every entry ``e`` (a sampled dense-dense product)."""
    n, d_sae = codes.shape
    if codes.rows.numel() == 0:
        return grad_out.new_zeros(0)
    crow = torch.cat([codes.offsets, codes.offsets.new_tensor([codes.rows.numel()])])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, codes.cols, grad_out.new_zeros(codes.rows.numel()), (n, d_sae),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, grad_out.contiguous(), W.t()).values()


class CsrMM(torch.autograd.Function):
    """``out[b] = sum over the entries e of sample b of values[e] * W[col(e)]``: the sparse codes times a dense
    ``W [d_sae, d]``, with both gradients sparse (``values``: a sampled product; ``W``: one bag per latent)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, W: Tensor, codes: SparseCodes) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values, W)
        ctx.codes = codes
        return F.embedding_bag(codes.cols, W, codes.offsets, per_sample_weights=values.to(W.dtype), mode="sum")

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        values, W = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad_values = _sampled(grad_out, W, codes) if ctx.needs_input_grad[0] else None
        grad_W = _by_latent(values, grad_out, codes) if ctx.needs_input_grad[1] else None
        return grad_values, grad_W, None


class SparseReluEncoder(torch.autograd.Function):
    """The active values of ``relu((x - b_dec) @ W_enc + b_enc)`` with a backward over the active entries only.

    ``values`` and ``codes`` come from :func:`relu_codes` of the pre-activations the caller computed without
    gradient, so the forward repeats no work.  ``x`` is data (no gradient); ``b_dec`` gets
    ``-W_enc @ grad_b_enc`` when ``centre`` (SAELens's ``apply_b_dec_to_input``)."""

    @staticmethod
    def forward(ctx: Any, sae_in: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, values: Tensor,  # type: ignore[override]
                codes: SparseCodes, centre: bool) -> Tensor:
        ctx.save_for_backward(sae_in, W_enc)
        ctx.codes, ctx.centre = codes, centre
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        sae_in, W_enc = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad_W = grad_b = grad_b_dec = None
        if ctx.needs_input_grad[2]:
            grad_W = _by_latent(grad, sae_in, codes).t()
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[1]:
            grad_b = torch.zeros(codes.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, codes.cols, grad)
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ grad_b) if ctx.centre else torch.zeros_like(sae_in[0])
        return None, grad_b_dec, grad_W, grad_b if ctx.needs_input_grad[3] else None, None, None, None


class EncoderFromPre(torch.autograd.Function):
    """``pre = (x - b_dec) @ W_enc + b_enc`` given ``pre`` (computed without gradient), with a dense backward
    that returns ``grad_b_dec = -W_enc @ grad_b_enc`` instead of the ``[B, d_in]`` input gradient."""

    @staticmethod
    def forward(ctx: Any, sae_in: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor,  # type: ignore[override]
                centre: bool) -> Tensor:
        ctx.save_for_backward(sae_in, W_enc)
        ctx.centre = centre
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        sae_in, W_enc = ctx.saved_tensors
        grad_W = sae_in.t() @ grad if ctx.needs_input_grad[2] else None
        grad_b = grad.sum(0)
        grad_b_dec = None
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ grad_b) if ctx.centre else torch.zeros_like(sae_in[0])
        return None, grad_b_dec, grad_W, grad_b if ctx.needs_input_grad[3] else None, None, None


def csr_mm(values: Tensor, W: Tensor, codes: SparseCodes) -> Tensor:
    """:class:`CsrMM` as a function."""
    return CsrMM.apply(values, W, codes)  # type: ignore[no-any-return]


def sparse_relu_encode(sae_in: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, values: Tensor, codes: SparseCodes,
                       centre: bool = True) -> Tensor:
    """:class:`SparseReluEncoder` as a function."""
    return SparseReluEncoder.apply(sae_in, b_dec, W_enc, b_enc, values, codes, centre)  # type: ignore[no-any-return]


def encoder_from_pre(sae_in: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, centre: bool = True) -> Tensor:
    """:class:`EncoderFromPre` as a function."""
    return EncoderFromPre.apply(sae_in, b_dec, W_enc, b_enc, pre, centre)  # type: ignore[no-any-return]


# ---- the fast paths of one modality: codes and reconstruction; TrainingJointSAE computes the loss from them ----
# Each takes ``sae_in`` (the processed, centred input) and ``pre = sae_in @ W_enc + b_enc``, both computed without
# gradient (the one dense matmul), and gives the differentiable codes and reconstruction with the values and
# gradients of the plain-autograd reference (TrainingJointSAE._reference_codes) up to float summation order.


def relu_sparse_codes(sae_in: Tensor, pre: Tensor, active: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                      b_dec: Tensor, centre: bool = True) -> tuple[Tensor, SparseCodes, Tensor]:
    """ReLU on the active entries (``active``: :func:`active_entries` of ``pre``): ``(values [nnz], codes,
    recon [B, d_in])``; the L1 term is ``values.sum()``.  ``pre`` becomes ``relu(pre)`` in place (no copy), the
    codes' ``dense``."""
    codes, vals = relu_codes(pre, active)
    codes = SparseCodes(*codes[:-1], dense=pre.relu_())
    values = sparse_relu_encode(sae_in, b_dec, W_enc, b_enc, vals, codes, centre)
    return values, codes, csr_mm(values, W_dec, codes) + b_dec


def relu_dense_codes(sae_in: Tensor, pre: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                     centre: bool = True) -> tuple[Tensor, Tensor]:
    """ReLU on dense codes with :class:`EncoderFromPre`'s backward: ``(z [B, d_sae], recon [B, d_in])``."""
    z = F.relu(encoder_from_pre(sae_in, b_dec, W_enc, b_enc, pre, centre))
    return z, z @ W_dec + b_dec


def topk_sparse_codes(sae_in: Tensor, pre: Tensor, k: int, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                      centre: bool = True) -> tuple[Tensor, SparseCodes, Tensor]:
    """TopK on its ``k`` entries a row: ``(values [B * k] (ReLU'd), codes, recon [B, d_in])``."""
    codes, top_values = topk_codes(pre, k)
    values = F.relu(sparse_relu_encode(sae_in, b_dec, W_enc, b_enc, top_values, codes, centre))
    return values, codes, csr_mm(values, W_dec, codes) + b_dec


def sparse_aux_reconstruction(sae_in: Tensor, pre: Tensor, dead: Tensor, k_aux: int, W_enc: Tensor, b_enc: Tensor,
                              W_dec: Tensor, b_dec: Tensor, centre: bool = True) -> Tensor:
    """TopK's auxiliary reconstruction ``[B, d_in]`` (no ``b_dec``): the top ``k_aux`` raw pre-activations (not
    ReLU'd) among the ``dead [d_sae]`` latents, decoded; ``k_aux <= dead.sum()``, so every entry is a dead latent."""
    with torch.no_grad():
        codes, top = topk_codes(pre.masked_fill(~dead, -math.inf), k_aux)
    values = sparse_relu_encode(sae_in, b_dec, W_enc, b_enc, top, codes, centre)
    return csr_mm(values, W_dec, codes)


# ---- alignment losses on sparse codes: the same values as jsae.saes.alignment on the dense codes -----------


def _row_sums(values: Tensor, codes: SparseCodes) -> Tensor:
    return values.new_zeros(codes.shape[0]).index_add(0, codes.rows, values)


def _norms(values: Tensor, codes: SparseCodes, eps: float) -> Tensor:
    """Per-sample norms clamped at ``eps`` (as ``F.cosine_similarity`` and ``F.normalize``; zero gradient below)."""
    return _row_sums(values * values, codes).clamp(min=eps * eps).sqrt()


def _matches(codes_v: SparseCodes, codes_t: SparseCodes) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)`` of the entries active in both: ``codes_v`` entry ``i`` is ``codes_t`` entry ``j``."""
    if codes_t.linear.numel() == 0 or codes_v.linear.numel() == 0:
        empty = codes_v.linear.new_zeros(0)
        return empty, empty
    pos = torch.searchsorted(codes_t.linear, codes_v.linear).clamp(max=codes_t.linear.numel() - 1)
    hit = torch.nonzero(codes_t.linear[pos] == codes_v.linear).squeeze(1)
    return hit, pos[hit]


def partner_values(codes: SparseCodes, other_values: Tensor, other: SparseCodes) -> Tensor:
    """``[nnz]``: the other modality's code at each of ``codes``' entries (0 where it is inactive).  A gather from
    ``other.dense`` when the path has the dense codes, else from the entries active in both (:func:`_matches`)."""
    if other.dense is not None:
        return other.dense.reshape(-1).index_select(0, codes.linear).to(other_values.dtype)
    i, j = _matches(codes, other)
    return other_values.new_zeros(codes.linear.numel()).index_put_((i,), other_values[j].detach())


def _dot(val_v: Tensor, codes_v: SparseCodes, val_t: Tensor, codes_t: SparseCodes) -> Tensor:
    i, j = _matches(codes_v, codes_t)
    return val_v.new_zeros(codes_v.shape[0]).index_add(0, codes_v.rows[i], val_v[i] * val_t[j])


def _along(scale: Tensor, cos: Tensor, norm: Tensor, sq: Tensor) -> Tensor:
    """The cosine gradient's factor on a sample's own codes: ``scale · cos / (norm · |z|)`` with ``norm`` clamped at
    ``eps`` and ``|z|`` not (``F.cosine_similarity`` clamps the norm without gradient, so a norm below ``eps`` still
    passes its gradient); zero for an empty sample."""
    return torch.where(sq > 0, scale * cos / (norm * sq.sqrt()), 0.0)


class SparseCosine(torch.autograd.Function):
    """``mean_b (1 - cos(z_v[b], z_t[b]))`` on sparse codes with an analytic backward (a dozen ``nnz``-sized
    operations in all, where autograd would record some thirty).  Norms are clamped at ``eps`` as in
    ``F.cosine_similarity`` (see :func:`_along`).  Each entry meets the other modality's code at the same place
    through :func:`partner_values` (0 where that one is inactive, which adds exact zeros to the row dots and the
    gradient: the same numbers as summing over the entries active in both)."""

    @staticmethod
    def forward(ctx: Any, val_v: Tensor, val_t: Tensor, codes_v: SparseCodes, codes_t: SparseCodes,  # type: ignore[override]
                eps: float = 1e-8) -> Tensor:
        t_at_v, v_at_t = partner_values(codes_v, val_t, codes_t), partner_values(codes_t, val_v, codes_v)
        sq_v, sq_t = _row_sums(val_v * val_v, codes_v), _row_sums(val_t * val_t, codes_t)
        norm_v, norm_t = sq_v.clamp(min=eps * eps).sqrt(), sq_t.clamp(min=eps * eps).sqrt()
        dot = val_v.new_zeros(codes_v.shape[0]).index_add_(0, codes_v.rows, val_v * t_at_v)
        cos = dot / (norm_v * norm_t)
        ctx.save_for_backward(val_v, val_t, t_at_v, v_at_t, cos, norm_v, norm_t, sq_v, sq_t)
        ctx.codes = codes_v, codes_t
        return (1.0 - cos).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        val_v, val_t, t_at_v, v_at_t, cos, norm_v, norm_t, sq_v, sq_t = ctx.saved_tensors
        codes_v, codes_t = ctx.codes
        scale = -grad / cos.numel()  # d loss / d cos_b
        across = scale / (norm_v * norm_t)  # times the other modality's matching value
        grads = []
        for val, codes, partner, norm, sq in ((val_v, codes_v, t_at_v, norm_v, sq_v), (val_t, codes_t, v_at_t, norm_t, sq_t)):
            along = _along(scale, cos, norm, sq)  # times the own value
            grads.append((across.index_select(0, codes.rows) * partner).addcmul_(along.index_select(0, codes.rows), val, value=-1.0))
        return grads[0], grads[1], None, None, None


class DenseCosine(torch.autograd.Function):
    """:func:`jsae.saes.alignment.cosine` on dense codes ``[B, d_sae]`` with the analytic backward of
    :class:`SparseCosine`: row dots as one batched product each (no ``[B, d_sae]`` temporaries) and the gradient
    in two passes, where ``F.cosine_similarity`` and its autograd take some twenty element-wise passes."""

    @staticmethod
    def forward(ctx: Any, z_v: Tensor, z_t: Tensor, eps: float = 1e-8) -> Tensor:  # type: ignore[override]
        def rows(a: Tensor, b: Tensor) -> Tensor:
            return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)

        sq_v, sq_t, dot = rows(z_v, z_v), rows(z_t, z_t), rows(z_v, z_t)
        norm_v, norm_t = sq_v.clamp(min=eps * eps).sqrt(), sq_t.clamp(min=eps * eps).sqrt()
        cos = dot / (norm_v * norm_t)
        ctx.save_for_backward(z_v, z_t, cos, norm_v, norm_t, sq_v, sq_t)
        return (1.0 - cos).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z_v, z_t, cos, norm_v, norm_t, sq_v, sq_t = ctx.saved_tensors
        scale = -grad / cos.numel()  # d loss / d cos_b
        across = (scale / (norm_v * norm_t)).unsqueeze(1)  # times the other modality's codes
        grads = []
        for own, other, norm, sq in ((z_v, z_t, norm_v, sq_v), (z_t, z_v, norm_t, sq_t)):
            along = _along(scale, cos, norm, sq).unsqueeze(1)  # times the own codes
            grads.append(torch.addcmul(other * across, own, along, value=-1.0))
        return grads[0], grads[1], None


def dense_cosine(z_v: Tensor, z_t: Tensor, **_: float) -> Tensor:
    """:class:`DenseCosine` as a function: ``mean_b (1 - cos(z_v[b], z_t[b]))``."""
    return DenseCosine.apply(z_v, z_t)  # type: ignore[no-any-return]


def sparse_cosine(val_v: Tensor, codes_v: SparseCodes, val_t: Tensor, codes_t: SparseCodes, **_: float) -> Tensor:
    """:func:`jsae.saes.alignment.cosine` on sparse codes: ``mean_b (1 - cos(z_v[b], z_t[b]))``."""
    return SparseCosine.apply(val_v, val_t, codes_v, codes_t)  # type: ignore[no-any-return]


def sparse_l2(val_v: Tensor, codes_v: SparseCodes, val_t: Tensor, codes_t: SparseCodes, **_: float) -> Tensor:
    """:func:`jsae.saes.alignment.l2` on sparse codes: ``mean_b |z_v[b] - z_t[b]|²``."""
    sq = (val_v * val_v).sum() + (val_t * val_t).sum() - 2 * _dot(val_v, codes_v, val_t, codes_t).sum()
    return sq / codes_v.shape[0]


def sparse_infonce(val_v: Tensor, codes_v: SparseCodes, val_t: Tensor, codes_t: SparseCodes, *,
                   temperature: float = 0.07, **_: float) -> Tensor:
    """:func:`jsae.saes.alignment.infonce` on sparse codes; the logits are one :class:`CsrMM` of the vision
    codes against the text codes as a dense ``[d_sae, B]`` matrix."""
    eps = 1e-8
    n, d_sae = codes_v.shape
    v = val_v / _norms(val_v, codes_v, eps)[codes_v.rows]
    t = val_t / _norms(val_t, codes_t, eps)[codes_t.rows]
    t_by_latent = val_t.new_zeros(d_sae, codes_t.shape[0]).index_put((codes_t.cols, codes_t.rows), t)
    logits = csr_mm(v, t_by_latent, codes_v) / temperature
    target = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def sparse_none(val_v: Tensor, codes_v: SparseCodes, val_t: Tensor, codes_t: SparseCodes, **_: float) -> Tensor:
    return val_v.new_zeros(())


SparseAlignment = Callable[..., Tensor]
SPARSE_ALIGNMENTS: dict[str, SparseAlignment] = {
    "cosine": sparse_cosine,
    "infonce": sparse_infonce,
    "l2": sparse_l2,
    "none": sparse_none,
}
# the fast paths' alignment on dense codes (the ReLU dense-code path); other losses use jsae.saes.alignment's
DENSE_ALIGNMENTS: dict[str, SparseAlignment] = {"cosine": dense_cosine}
