"""The per-tensor work of `dowser merge`, near the I/O floor and bit-identical to the reference path.

The reference path (merge.py `_value` at a re-cut strength) is

    out = where(cut_mask(score_matrix(W_base, psi, a, w), rho), W_base, W_ft)

with about ten passes over matrix-sized float32 temporaries. `repair_recut` gives the same
bits with one pass over row blocks small enough to stay in the cache:

1. A seeded sample of scores brackets the k-th smallest score (k = round(rho * numel), the
   trainable count) between two values lo <= hi, as `scoring.kth_smallest` does.
2. For each block of rows, the matrix product Psi^T diag(w) A / sum(w) and its product with
   |W|, in a cache-resident buffer, exactly as `scoring.score_matrix` makes each block:
   entries below lo are trainable (keep FT), entries above hi or NaN are protected (take BASE),
   and the few inside [lo, hi] are remembered with their position and FT value.
3. The exact threshold t is the (k - below)-th smallest remembered score; entries inside the
   bracket below t, and the first ties at t in flat order (as `scoring.cut_mask` breaks them),
   get their FT value back.
If the bracket misses (it practically never does), or the matrix is small, the reference path
runs instead. Bit-identity to the reference path is tested (tests/test_reliability_merge_kernels.py).

Reading uses `os.preadv` straight into the tensor (no memory map, so no page faults per 4 KiB),
and unchanged tensors go from input file to output file with `os.copy_file_range` (a kernel copy).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

import numpy as np
import torch

from ..io.layout import StreamingWriter
from ..score import (PRODUCT_BLOCK, bracket_ranks, cut_mask, product_rows, score_blocks, score_factors, score_matrix, trainable_count)

BLOCK_ENTRIES = PRODUCT_BLOCK  # entries per block of the selection passes: cache-resident
SAMPLE = 1 << 16  # scores sampled to bracket the threshold (as scoring.kth_smallest)
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
NUMPY_INT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


@contextlib.contextmanager
def intra_op_threads(n: int):
    """torch's intra-op threads for the block: the merge's workers each run single-threaded ops on
    their own tensor (OpenMP teams of 2 on small blocks, twice over on 2 cores, spin and stall)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BufferPool:
    """Reusable memory for tensors of a few tens of MB. A fresh allocation that size is mapped by
    the allocator and faulted in 4 KiB at a time while it is filled (about as slow as reading the
    bytes); a buffer given back is handed out again for any tensor it can hold. Keeps at most
    `keep` buffers (the largest), so memory stays a few tensors."""

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[torch.Tensor] = []  # flat uint8 buffers ready to hand out
        self._made: dict[int, weakref.ref] = {}  # id -> buffer, for every buffer this pool made (weakly)
        self._lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor; its buffer lives as long as the returned tensor object does."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            key = id(buf)
            self._made[key] = weakref.ref(buf, lambda _, key=key: self._made.pop(key, None))
        out = buf[:nbytes].view(dtype).view(shape)
        out._pool_buffer = buf  # (dtype views do not record their base)
        return out

    def give_back(self, tensor: torch.Tensor) -> None:
        """Offer the memory under `tensor`, a tensor returned by `empty`, for reuse; the caller must not
        use it, or any view of it, again. Any other tensor is ignored, so memory that is not the
        pool's (a memory-mapped input) is never written."""
        buf = getattr(tensor, "_pool_buffer", None)
        with self._lock:
            made = self._made.get(id(buf)) if buf is not None else None
            if made is None or made() is not buf or any(b is buf for b in self._free):
                return
            self._free.append(buf)
            self._free.sort(key=torch.Tensor.numel, reverse=True)
            del self._free[self.keep:]


def read_tensor(ckpt, name: str, pool: BufferPool | None = None) -> torch.Tensor:
    """One tensor of a local safetensors checkpoint, read with preadv into a tensor (from `pool`
    if given); any other source (Hub ranges, pickles) through `Checkpoint.read`."""
    ref = ckpt.ref(name)
    if ref.entry is None or ckpt.is_remote:
        return ckpt.read(name)
    e = ref.entry
    out = pool.empty(e.shape, e.torch_dtype) if pool is not None else torch.empty(e.shape, dtype=e.torch_dtype)
    if e.nbytes:
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd = os.open(ckpt.file_path(ref.file), os.O_RDONLY)
        try:
            done = 0
            while done < e.nbytes:
                got = os.preadv(fd, [view[done:]], e.start + done)
                if got <= 0:
                    raise OSError(f"{ckpt.where}/{ref.file}: short read of {name!r}")
                done += got
        finally:
            os.close(fd)
    return out


_local = threading.local()


def _product_buffer(rows: int, cols: int) -> torch.Tensor:
    """This thread's float32 buffer for a score product, grown as needed and reused (see BufferPool)."""
    buf = getattr(_local, "product", None)
    if buf is None or buf.numel() < rows * cols:
        buf = _local.product = torch.empty(rows * cols)
    return buf[: rows * cols].view(rows, cols)


def _buffered_blocks(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
    """`scoring.score_blocks` of (out, in) `weight`, each block in this thread's reused buffer."""
    buf = _product_buffer(min(product_rows(weight.shape[1]), weight.shape[0]), weight.shape[1])
    return score_blocks(weight, left, right, lambda r0, r1: buf[: r1 - r0])


def score_blocks_aligned(weight, psi, a, w) -> bool:
    """Whether the blocks made in the reused buffer equal `scoring.score_matrix`'s (made into slices
    of its result) bit for bit (checked by the tests)."""
    full = score_matrix(weight, psi, a, w)
    return all(torch.equal(block.view(torch.int32), full[r0:r1].view(torch.int32))
               for r0, r1, block in _buffered_blocks(weight, *score_factors(psi, a, w)))


def _bracket(weight: torch.Tensor, psiw_t: torch.Tensor, a: torch.Tensor, k: int) -> tuple[float, float]:
    """Two scores that very likely enclose the k-th smallest, from a seeded stratified sample of
    the scores (one entry drawn in each of SAMPLE equal runs of the flat matrix, so the gathers
    walk memory in order; the ranks of scoring.bracket_ranks). The sampled scores are summed
    in another order than the matrix product's, so they may differ in the last bits: whether the
    bracket encloses the threshold is checked exactly afterwards."""
    n, cols = weight.numel(), weight.shape[1]
    run = n // SAMPLE
    idx = np.arange(SAMPLE, dtype=np.int64) * run + np.random.default_rng(n * 31 + k).integers(0, run, SAMPLE)
    rows, cols_ = np.divmod(idx, cols)
    # np.take of whole rows: about 15x faster than fancy indexing for these (rows, U) tables
    product = np.einsum("ij,ij->i", np.take(psiw_t.contiguous().numpy(), rows, axis=0),
                        np.take(a.T.contiguous().numpy(), cols_, axis=0))
    bits = np.take(weight.reshape(-1).view(INT_OF_SIZE[weight.element_size()]).numpy(), idx)
    sampled = torch.from_numpy(product) * torch.from_numpy(bits).view(weight.dtype).abs()
    at = list(bracket_ranks(n, k, SAMPLE))
    picked = np.partition(sampled.numpy(), at)  # NaN sorts last, as in torch.sort
    return float(picked[at[0]]), float(picked[at[1]])


def repair_recut(base: torch.Tensor, ft: torch.Tensor, psi: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                 update_ratio: float) -> tuple[torch.Tensor, int] | None:
    """`where(cut_mask(score_matrix(base, psi, a, w), update_ratio), base, ft)` bit for bit, and the
    number of entries taken from BASE; None if the sampled bracket missed the threshold.

    base, ft: (out, in) tensors of one dtype; ft is overwritten (and returned, unless None: then its
    contents are lost and the caller must use `reference_repair` on a fresh copy). psi (U, out),
    a (U, in), w (U,): the sidecar's statistics (docs/FORMAT.md); update_ratio: the trainable
    fraction rho (scoring.cut_mask's).
    """
    if base.shape != ft.shape or base.dtype != ft.dtype or base.dim() != 2:
        raise ValueError(f"repair_recut needs two matrices of one shape and dtype, got {base.dtype}{list(base.shape)} "
                         f"and {ft.dtype}{list(ft.shape)}")
    n = base.numel()
    k = trainable_count(n, update_ratio)
    if n <= 4 * SAMPLE or k <= 0 or k >= n:
        return reference_repair(base, ft, psi, a, w, update_ratio)
    psiw_t, a = score_factors(psi, a, w)
    lo, hi = _bracket(base, psiw_t, a, k)
    if lo != lo or hi != hi:  # NaN in the sample: leave NaN ordering to the reference path
        return reference_repair(base, ft, psi, a, w, update_ratio)
    as_int = NUMPY_INT[base.element_size()]
    # numpy for the comparisons, counts, index lists and the selection: several times faster than
    # torch's CPU kernels on blocks this size, and bit-exact on integer views.
    base_np = base.view(INT_OF_SIZE[base.element_size()]).view(-1).numpy()
    out_np = ft.view(INT_OF_SIZE[ft.element_size()]).view(-1).numpy()
    cols = base.shape[1]
    scratch = _block_scratch(min(n, max(cols, BLOCK_ENTRIES)), as_int)
    below = 0
    positions, scores, ft_values = [], [], []
    for r0, r1, score in _buffered_blocks(base, psiw_t, a):
        m = (r1 - r0) * cols
        score_np, start = score.view(-1).numpy(), r0 * cols
        base_blk, out_blk = base_np[start : start + m], out_np[start : start + m]
        trainable, inside, keep, diff = (buf[:m] for buf in scratch)
        np.less(score_np, lo, out=trainable)  # NaN: False, so protected, as in scoring.cut_mask
        below += int(np.count_nonzero(trainable))
        np.less_equal(score_np, hi, out=inside)
        np.logical_xor(inside, trainable, out=inside)  # lo <= score <= hi
        where = np.flatnonzero(inside)
        positions.append(where + start)
        scores.append(score_np[where])
        ft_values.append(out_blk[where])
        np.subtract(trainable, 1, out=keep, dtype=as_int, casting="unsafe")  # protected: all ones
        _take_base(out_blk, base_blk, keep, diff)
    scores_np = np.concatenate(scores)
    if not below < k <= below + scores_np.size:
        return None  # the bracket missed the threshold (FT was overwritten: the caller reads it again)
    t = np.partition(scores_np, k - below - 1)[k - below - 1]
    back = scores_np < t
    need = k - below - int(np.count_nonzero(back))
    if need > 0:  # ties at the threshold: the lowest flat indices become trainable (scoring.cut_mask)
        back[np.flatnonzero(scores_np == t)[:need]] = True
    pos, vals = np.concatenate(positions), np.concatenate(ft_values)
    out_np[pos[back]] = vals[back]
    return ft, n - k


def _take_base(out: np.ndarray, base: np.ndarray, take: np.ndarray, diff: np.ndarray) -> None:
    """out = where(take, base, out) on raw bits, in place: out ^ ((out ^ base) & take), with `take`
    all ones (-1) or zero per entry. Three integer passes, faster than numpy's or torch's where."""
    np.bitwise_xor(out, base, out=diff)
    np.bitwise_and(diff, take, out=diff)
    np.bitwise_xor(out, diff, out=out)


def apply_stored(base: torch.Tensor, ft: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`where(mask, base, ft)` for a mask stored bit-packed (docs/FORMAT.md: row-major, most
    significant bit first, 1 = protected), unpacked block by block; ft is overwritten and returned,
    with the number of entries taken from BASE. base, ft: tensors of one shape and dtype."""
    if base.shape != ft.shape or base.dtype != ft.dtype:
        raise ValueError("apply_stored needs two tensors of one shape and dtype")
    n, as_int = base.numel(), NUMPY_INT[base.element_size()]
    base_np = base.view(INT_OF_SIZE[base.element_size()]).reshape(-1).numpy()
    out_np = ft.view(INT_OF_SIZE[ft.element_size()]).view(-1).numpy()
    bits_np = packed.numpy()
    step = BLOCK_ENTRIES  # a multiple of 8: blocks start on byte boundaries
    _, _, take, diff = _block_scratch(min(n, step), as_int)
    restored = 0
    for start in range(0, n, step):
        m = min(step, n - start)
        protected = np.unpackbits(bits_np[start // 8 : (start + m + 7) // 8], count=m)
        restored += int(np.count_nonzero(protected))
        np.negative(protected, out=take[:m], dtype=as_int, casting="unsafe")
        _take_base(out_np[start : start + m], base_np[start : start + m], take[:m], diff[:m])
    return ft, restored


def _block_scratch(entries: int, as_int) -> list[np.ndarray]:
    """This thread's block buffers (trainable, inside, selection mask, bit differences), reused."""
    key = (entries, as_int)
    if getattr(_local, "scratch_key", None) != key:
        _local.scratch_key = key
        _local.scratch = [np.empty(entries, bool), np.empty(entries, bool), np.empty(entries, as_int),
                          np.empty(entries, as_int)]
    return _local.scratch


def reference_repair(base, ft, psi, a, w, update_ratio) -> tuple[torch.Tensor, int]:
    """The reference path, in full: what `repair_recut` must equal."""
    mask = cut_mask(score_matrix(base, psi, a, w), update_ratio)
    as_int = INT_OF_SIZE[base.element_size()]
    out = torch.where(mask, base.view(as_int), ft.view(as_int)).view(base.dtype)
    return out, int(torch.count_nonzero(mask))


class RangeWriter(StreamingWriter):
    """A `StreamingWriter` that can also fill a tensor's slot by a kernel copy from another file."""

    def copy_range(self, name: str, src: str | os.PathLike, start: int, end: int) -> None:
        """Append the next tensor as bytes [start, end) of file `src`, copied by the kernel."""
        exp_name, _dtype, _shape, nbytes = self._order[self._next]
        if name != exp_name:
            raise ValueError(f"expected tensor {exp_name!r} next, got {name!r}")
        if end - start != nbytes:
            raise ValueError(f"{name}: got {end - start} bytes, header says {nbytes}")
        self._file.flush()
        out_fd = self._file.fileno()
        with open(src, "rb") as f:
            offset, left = start, nbytes
            while left:
                done = os.copy_file_range(f.fileno(), out_fd, left, offset)
                if done <= 0:
                    raise OSError(f"{src}: short copy of {name!r}")
                offset += done
                left -= done
        self._next += 1
