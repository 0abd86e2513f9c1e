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
auxiliary loss on the top dead latents' entries.  Each path is one function: :func:`relu_dense_codes`,
:func:`topk_sparse_codes` (with :func:`sparse_aux_reconstruction`) for one modality, and for the sparse ReLU step of
both modalities one autograd node (:func:`relu_sparse_pair`, :class:`PairedSparseRelu`: the backward functions of
:class:`SparseReluEncoder` and :class:`CsrMM`), so that where the caller has two or more intra-op threads the two modalities' small
operations run side by side on two threads (:func:`in_pair`) — the autograd engine would run two nodes one after
the other.  Where ``W_dec`` is larger than the cache (:data:`ROW_BLOCK_BYTES`) the decoder forward and the sampled
code gradient read it in blocks of rows (:func:`row_blocks`), each block's rows from the cache.

Cost of a step: one dense matmul (the encoder forward) plus ``O(nnz · d_in)`` work, which the caller runs on one
intra-op thread per modality (:func:`one_thread`).  When the codes are dense (early in training) :class:`EncoderFromPre` still
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
import threading
import time
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Bags", "CsrMM", "DENSE_ALIGNMENTS", "DenseCosine", "EncoderFromPre", "PairedSparseRelu", "ROW_BLOCK_BYTES", "ROW_BLOCK_MIN_ENTRIES", "RowBlocks", "SPARSE_ALIGNMENTS", "SparseCodes", "SparseCosine", "SparseReluEncoder", "ThreadPick",
           "active_entries", "argsort_latents", "csr_mm", "encoder_from_pre", "in_pair", "relu_codes", "relu_dense_codes", "relu_sparse_pair", "row_blocks",
           "one_thread", "partner_values", "sparse_switch_density", "sparse_aux_reconstruction", "sparse_relu_encode", "topk_codes",
           "topk_sparse_codes"]


# Where the ReLU path turns sparse, by width: one paired forward + backward on sparse and on dense codes, interleaved,
# at set densities, 2 threads (the sparse step's two modalities side by side, W read in row blocks), a shared 2-core
# machine under load 2.5-4.5 (the measure of benchmarks/train_throughput.py --crossover).  At 512 -> 4096
# (2**21 weights) the sparse step took 0.87, 1.00, 1.25 of the dense-code step at 13, 20, 30% density (break-even
# ~20%); at 4096 -> 16384 (2**26) 0.52, 0.51, 0.69, 0.81, 1.10, 1.23 at 5, 7, 10, 15, 20, 25% (break-even ~18%; one
# thread, without the side-by-side modalities, ~10-12%).  The switch sits at or below the break-even, log-linearly
# between the two measured widths.
SPARSE_SWITCH_SMALL = (2**21, 0.2)  # (d_in * d_sae, density at which the path turns sparse)
SPARSE_SWITCH_LARGE = (2**26, 0.15)


def sparse_switch_density(d_in: int, d_sae: int) -> float:
    """The code density at or below which the ReLU fast path runs sparse, for a ``d_in -> d_sae`` SAE: 0.2 up to
    2**21 weights, 0.15 from 2**26, log-linear in ``d_in * d_sae`` between (see ``SPARSE_SWITCH_SMALL``)."""
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


# A weight matrix larger than two of these is read in blocks of rows of about this size by the decoder's forward and
# the sampled code gradient (CPU): entries grouped by sample read a random row of W each, from memory when W does
# not fit the cache; grouped by block first, they read rows of a cache-sized block.  4096 -> 16384 (W 256 MiB), 1024
# pairs, one thread, load 1.2-1.7: the decoder 1275 -> 576 ms at 5% density and 2535 -> 569 at 10%, the sampled
# product 1406 -> 425 and 2510 -> 782 (2 MiB blocks: 1298 / 1478 ms, too many partial sums; 16 MiB: 441 / 783).
ROW_BLOCK_BYTES = 8 * 2**20
# ...when each row of W is read by this many entries or more on average: with fewer, blocking saves no reads and pays
# for its sort and its partial sums (4096 -> 16384, 1024 samples, decoder + sampled product, one thread: 215 against
# 206 ms at 2 entries a latent, 312 against 387 at 5, 409 against 760 at 10; TopK k = 32: 224 against 130 ms).
ROW_BLOCK_MIN_ENTRIES = 4


class RowBlocks(NamedTuple):
    """The entries of sparse codes grouped by block of ``size`` latents, each block's in row-major order."""

    size: int  # latents (rows of W) per block
    order: Tensor  # [nnz] the permutation of the entries (a stable sort by block)
    cols: Tensor  # [nnz] each sorted entry's latent within its block
    starts: Tensor  # [n_blocks, B] where each sample's entries start in the sorted order
    bounds: list[int]  # [n_blocks + 1] where each block's entries start and end in the sorted order


def row_blocks(codes: SparseCodes, W: Tensor) -> RowBlocks | None:
    """:class:`RowBlocks` of ``codes`` for reading ``W [d_sae, d]`` (``None``: read it whole — on GPU, when W is at
    most two blocks of :data:`ROW_BLOCK_BYTES`, or when its rows are read by fewer than :data:`ROW_BLOCK_MIN_ENTRIES`
    entries each on average)."""
    row_bytes = W.shape[1] * W.element_size()
    if (W.device.type != "cpu" or W.shape[0] * row_bytes <= 2 * ROW_BLOCK_BYTES
            or codes.rows.numel() < ROW_BLOCK_MIN_ENTRIES * W.shape[0] or codes.rows.numel() == 0):
        return None
    size = max(1, ROW_BLOCK_BYTES // row_bytes)
    n_blocks, n = -(-W.shape[0] // size), codes.shape[0]
    block = torch.div(codes.cols, size, rounding_mode="floor")
    order = argsort_latents(block)  # stable: the entries are row-major, so each block's stay row-major
    counts = torch.bincount(block * n + codes.rows, minlength=n_blocks * n)
    bounds = [0] + torch.bincount(block, minlength=n_blocks).cumsum(0).tolist()
    cols = codes.cols.index_select(0, order) - block.index_select(0, order) * size
    return RowBlocks(size, order, cols, _starts(counts).view(n_blocks, n), bounds)


def _decode(values: Tensor, W: Tensor, codes: SparseCodes, blocks: RowBlocks | None) -> Tensor:
    """``out[b] = sum over the entries e of sample b of values[e] * W[col(e)]``: ``[B, d]``, by blocks of W's rows
    when ``blocks``."""
    values = values.to(W.dtype)
    if blocks is None:
        return F.embedding_bag(codes.cols, W, codes.offsets, per_sample_weights=values, mode="sum")
    values = values.index_select(0, blocks.order)
    out = W.new_zeros(codes.shape[0], W.shape[1])
    for i, (b0, b1) in enumerate(zip(blocks.bounds[:-1], blocks.bounds[1:])):
        if b1 > b0:
            out.add_(F.embedding_bag(blocks.cols[b0:b1], W[i * blocks.size:(i + 1) * blocks.size], blocks.starts[i] - b0,
                                     per_sample_weights=values[b0:b1], mode="sum"))
    return out


def _silence_csr_beta_warning() -> None:
    """PyTorch warns once a process that sparse CSR tensors are "in beta"; that once is spent here, at import, so
    :func:`_sampled` needs no ``warnings.catch_warnings`` (which swaps the process-wide filters and is not safe in
    the two threads of :func:`in_pair`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.sparse_csr_tensor(torch.tensor([0, 0]), torch.zeros(0, dtype=torch.long), torch.zeros(0), (1, 1),
                                check_invariants=False)


_silence_csr_beta_warning()


def _sampled(grad_out: Tensor, W: Tensor, codes: SparseCodes, blocks: RowBlocks | None = None) -> Tensor:
    """``grad_out[row(e)] · W[col(e)]`` for every entry ``e`` (a sampled dense-dense product), by blocks of W's rows
    when ``blocks``."""
    n, d_sae = codes.shape
    if codes.rows.numel() == 0:
        return grad_out.new_zeros(0)
    grad_out = grad_out.contiguous()
    if blocks is None:
        return _sampled_csr(grad_out, W, codes.offsets, codes.cols, codes.rows.numel(), d_sae)
    parts = [_sampled_csr(grad_out, W[i * blocks.size:(i + 1) * blocks.size], blocks.starts[i] - b0, blocks.cols[b0:b1],
                          b1 - b0, min(blocks.size, d_sae - i * blocks.size))
             for i, (b0, b1) in enumerate(zip(blocks.bounds[:-1], blocks.bounds[1:])) if b1 > b0]
    return grad_out.new_empty(codes.rows.numel()).index_copy_(0, blocks.order, torch.cat(parts))


def _sampled_csr(grad_out: Tensor, W: Tensor, offsets: Tensor, cols: Tensor, nnz: int, width: int) -> Tensor:
    crow = torch.cat([offsets, offsets.new_tensor([nnz])])
    pattern = torch.sparse_csr_tensor(crow, cols, grad_out.new_zeros(nnz), (grad_out.shape[0], width), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, grad_out, W.t()).values()


class CsrMM(torch.autograd.Function):
    """``out[b] = sum over the entries e of sample b of values[e] * W[col(e)]``: the sparse codes times a dense
    ``W [d_sae, d]``, with both gradients sparse (``values``: a sampled product; ``W``: one bag per latent)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, W: Tensor, codes: SparseCodes) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values, W)
        ctx.codes, ctx.blocks = codes, row_blocks(codes, W)
        return _decode(values, W, codes, ctx.blocks)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        values, W = ctx.saved_tensors
        return (*_decoder_backward(grad_out, values, W, ctx.codes, ctx.blocks, *ctx.needs_input_grad[:2]), None)


def _decoder_backward(grad_out: Tensor, values: Tensor, W: Tensor, codes: SparseCodes, blocks: RowBlocks | None,
                      need_values: bool = True, need_W: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """:class:`CsrMM`'s backward: ``(grad_values [nnz], grad_W [d_sae, d])`` (``None`` where not needed)."""
    grad_values = _sampled(grad_out, W, codes, blocks) if need_values else None
    grad_W = _by_latent(values, grad_out, codes) if need_W else None
    return grad_values, grad_W


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
        n = ctx.needs_input_grad
        grad_W, grad_b, grad_b_dec = _encoder_backward(grad, sae_in, W_enc, ctx.codes, ctx.centre, n[2], n[3], n[1])
        return None, grad_b_dec, grad_W, grad_b, None, None, None


def _encoder_backward(grad: Tensor, sae_in: Tensor, W_enc: Tensor, codes: SparseCodes, centre: bool,
                      need_W: bool = True, need_b: bool = True, need_b_dec: bool = True
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:class:`SparseReluEncoder`'s backward from the gradient of the active values: ``(grad_W_enc [d_in, d_sae],
    grad_b_enc [d_sae], grad_b_dec [d_in])`` (``None`` where not needed)."""
    grad_W = grad_b = grad_b_dec = None
    if need_W:
        # the by-latent sums come out [d_sae, d_in]: transposed here, on the caller's thread (one of in_pair's two),
        # rather than by autograd's gradient accumulation, which copies a tensor of the wrong layout on its one thread
        grad_W = _by_latent(grad, sae_in, codes).t().contiguous()
    if need_b or need_b_dec:
        grad_b = torch.zeros(codes.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, codes.cols, grad)
    if need_b_dec:
        grad_b_dec = -(W_enc @ grad_b) if centre else torch.zeros_like(sae_in[0])
    return grad_W, grad_b if need_b else None, grad_b_dec


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


def in_pair(first: Callable[[], Any], second: Callable[[], Any], parallel: bool) -> tuple[Any, Any]:
    """``(first(), second())``; with ``parallel``, ``first`` runs on a fresh thread while ``second`` runs on this
    one (torch releases the GIL in its kernels, so two single-threaded streams of small operations use two cores),
    and a failure of either is raised here.  The new thread gets this thread's grad mode and intra-op thread
    count.  A fresh thread each call (~0.1 ms) rather than a pool: nothing to go stale across ``fork``."""
    if not parallel:
        return first(), second()
    box: dict[str, Any] = {}
    grad = torch.is_grad_enabled()

    def run() -> None:
        try:
            with torch.set_grad_enabled(grad):
                box["out"] = first()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, name="jsae-modality", daemon=True)
    worker.start()
    try:
        b = second()
    finally:
        worker.join()
    if "error" in box:
        raise box["error"]
    return box["out"], b


class PairedSparseRelu(torch.autograd.Function):
    """Both modalities' sparse ReLU steps as one autograd node, so that the two run side by side: the forward
    decodes each modality's active values (:class:`CsrMM`'s ``embedding_bag``) and the backward runs each one's
    whole backward — :class:`CsrMM`'s then :class:`SparseReluEncoder`'s, the same functions
    (:func:`_decoder_backward`, :func:`_encoder_backward`) — with the two modalities on two threads
    (:func:`in_pair`) when ``parallel``.  The autograd engine runs one node at a time on CPU, so two separate
    modalities' nodes would run one after the other, each on one intra-op thread (see :func:`one_thread`).

    Inputs: per modality ``W_enc, b_enc, W_dec, b_dec`` (vision, then text; a shared weight may be passed twice
    and gets the sum of its two gradients), then ``branches``: per modality ``(sae_in, values, codes)`` from
    :func:`relu_codes`.  Outputs: per modality the active values (what the L1 and alignment terms read) and the
    reconstruction ``[B, d_in]`` (with ``b_dec``): ``values_v, recon_v, values_t, recon_t``."""

    @staticmethod
    def forward(ctx: Any, W_enc_v: Tensor, b_enc_v: Tensor, W_dec_v: Tensor, b_dec_v: Tensor,  # type: ignore[override]
                W_enc_t: Tensor, b_enc_t: Tensor, W_dec_t: Tensor, b_dec_t: Tensor,
                branches: tuple[tuple[Tensor, Tensor, SparseCodes], ...], centre: bool, parallel: bool) -> tuple[Tensor, ...]:
        (in_v, val_v, codes_v), (in_t, val_t, codes_t) = branches

        def decode(values: Tensor, W: Tensor, codes: SparseCodes, b: Tensor) -> tuple[Tensor, RowBlocks | None]:
            blocks = row_blocks(codes, W)
            return _decode(values, W, codes, blocks) + b, blocks

        (recon_v, blocks_v), (recon_t, blocks_t) = in_pair(lambda: decode(val_v, W_dec_v, codes_v, b_dec_v),
                                                           lambda: decode(val_t, W_dec_t, codes_t, b_dec_t), parallel)
        ctx.save_for_backward(W_enc_v, W_dec_v, in_v, val_v, W_enc_t, W_dec_t, in_t, val_t)
        ctx.codes, ctx.blocks, ctx.centre, ctx.parallel = (codes_v, codes_t), (blocks_v, blocks_t), centre, parallel
        return val_v.clone(), recon_v, val_t.clone(), recon_t

    @staticmethod
    def backward(ctx: Any, g_val_v: Tensor, g_rec_v: Tensor, g_val_t: Tensor, g_rec_t: Tensor  # type: ignore[override]
                 ) -> tuple[Tensor | None, ...]:
        saved, n = ctx.saved_tensors, ctx.needs_input_grad

        def branch(i: int, g_values: Tensor, g_recon: Tensor) -> tuple[Tensor | None, ...]:
            W_enc, W_dec, sae_in, values = saved[4 * i:4 * i + 4]
            codes, (need_W_enc, need_b_enc, need_W_dec, need_b_dec) = ctx.codes[i], n[4 * i:4 * i + 4]
            need_encoder = need_W_enc or need_b_enc or need_b_dec
            g_from_recon, grad_W_dec = _decoder_backward(g_recon, values, W_dec, codes, ctx.blocks[i], need_encoder,
                                                         need_W_dec)
            grad_W_enc = grad_b_enc = grad_b_dec = None
            if need_encoder:
                grad_W_enc, grad_b_enc, grad_b_dec = _encoder_backward(
                    g_values + g_from_recon, sae_in, W_enc, codes, ctx.centre, need_W_enc, need_b_enc, need_b_dec)
            if need_b_dec:
                grad_b_dec = g_recon.sum(0) + grad_b_dec
            return grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec

        v, t = in_pair(lambda: branch(0, g_val_v, g_rec_v), lambda: branch(1, g_val_t, g_rec_t), ctx.parallel)
        return (*v, *t, None, None, None)


def relu_sparse_pair(branches: dict[str, tuple[Tensor, Tensor, Tensor | None]], weights: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]],
                     centre: bool = True, parallel: bool = False) -> dict[str, tuple[Tensor, SparseCodes, Tensor]]:
    """The sparse ReLU step of two modalities at once (:class:`PairedSparseRelu`): ``branches`` maps each of the
    two modalities (in order) to ``(sae_in, pre, active)`` (``active``: :func:`active_entries` of ``pre``, or ``None``
    to find them here), ``weights`` to its ``(W_enc, b_enc, W_dec, b_dec)``;
    the result maps each to ``(values [nnz], codes, recon [B, d_in])``, the same numbers as
    :func:`sparse_relu_encode` then :func:`csr_mm` (+ ``b_dec``) up to float summation order.  With ``parallel`` the two modalities' codes, decoders and backwards each run on
    their own thread (:func:`in_pair`; call it inside :func:`one_thread` so that each is single-threaded)."""
    names = list(branches)
    if len(names) != 2 or list(weights) != names:
        raise ValueError(f"relu_sparse_pair takes two modalities with weights for each, got {names} and {list(weights)}")

    def codes_of(m: str) -> tuple[SparseCodes, Tensor]:
        _, pre, active = branches[m]
        codes, values = relu_codes(pre, active)
        return SparseCodes(*codes[:-1], dense=pre.relu_()), values  # pre is relu(pre) from here on

    (codes_v, val_v), (codes_t, val_t) = in_pair(lambda: codes_of(names[0]), lambda: codes_of(names[1]), parallel)
    both = ((branches[names[0]][0], val_v, codes_v), (branches[names[1]][0], val_t, codes_t))
    values_v, recon_v, values_t, recon_t = PairedSparseRelu.apply(*weights[names[0]], *weights[names[1]], both,
                                                                   centre, parallel)
    return {names[0]: (values_v, codes_v, recon_v), names[1]: (values_t, codes_t, recon_t)}


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
