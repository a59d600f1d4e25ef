"""How frameworks get fast: the NumPy twin's machine, beside its lesson.

mnist_cnn_numpy.py is the network as math; it trains by itself. This module
makes the same arithmetic run faster, the way frameworks do, and changes no
number beyond float rounding: every piece below is a drop-in for one lesson
function or layer method, and a named check in helpers/checks.py
(check_fast_...) proves it equal to what it replaces, with a diagnosis, as
the lesson's own functions are checked. Read the lesson first.

    with speedup.switched_on(mnist_cnn_numpy):   # what mnist_cnn_numpy.main does
        ...                                      # loss_and_grads and logits are the fast ones

Switched on, two lesson functions are replaced (and put back afterwards):
loss_and_grads, which then cuts each batch into slices and runs the
lesson's own loss_and_grads on each slice, on one thread per core, with
fast copies of the layers; and logits (evaluation), the same for inference.
MNIST_TWINS_FAST=0 leaves the lesson as it is.

The ideas, each explained where it is used:
1. Use every core (train_in_slices, _run). A matrix product spreads over the
   cores by itself, but NumPy's elementwise work (copying windows, ReLU,
   max-pooling) runs on one, and it is about two thirds of a step. So each
   core's thread takes a slice of the batch through the whole network, and
   BLAS is held to one thread per slice. NumPy lets go of Python's lock
   (the GIL) inside its operations, so the threads really run at once.
2. Do less work: ReLU after max-pooling instead of before (4x fewer
   numbers), no input gradient for the first layer (nothing uses it), the
   bias folded into the convolution's matrix product.
3. Touch memory less: ReLU in place; max-pool winners as one byte each;
   the im2col matrix made again in the backward pass instead of kept (it is
   up to 9 times its input, and would have left the CPU's caches); slices
   small enough to stay in the caches; freed memory kept for the next batch
   (keep_freed_memory).
4. Keep the lock free: NumPy's @ holds the GIL for small results, np.dot
   does not (conv2d_backward).
"""

import copy
import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Examples per slice (see slices), and the fewest worth a slice of their own.
SLICE = 32
MIN_SLICE = 16
_POOLS = {}
_BLAS = []


# =============================================================================
# Switching it on
# =============================================================================

@contextmanager
def switched_on(lesson):
    """The lesson module (mnist_cnn_numpy, or a learner's edited copy) with
    its loss_and_grads and logits replaced by the fast ones below."""
    if os.environ.get("MNIST_TWINS_FAST", "1") == "0":
        yield lesson
        return
    keep_freed_memory()
    saved = {name: getattr(lesson, name) for name in ("loss_and_grads", "logits", "forward")}
    lesson.lesson_functions = saved           # what the drop-ins call on
    lesson.loss_and_grads = lambda layers, x, y: train_in_slices(lesson, layers, x, y)
    lesson.logits = lambda model, x: logits_in_slices(lesson, model, x)
    try:
        yield lesson
    finally:
        for name, function in saved.items():
            setattr(lesson, name, function)
        del lesson.lesson_functions


def cores():
    """The CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# =============================================================================
# 1. Every core: a batch in slices, one thread per core
# =============================================================================

def slices(n, threads, size=None):
    """Cut a batch of n into slices of about `size` examples (default SLICE,
    at least MIN_SLICE), as many for each of the `threads` threads.

    Why slices of 32, not one slice per core: a slice's feature maps, im2col
    matrix and gradients are what its core reads and writes over and over;
    for 32 images they are half as big as for 64 and more of them are still
    in the CPU's caches when the next operation needs them (two slices of 32
    one after the other took 9% less time than one of 64; benchmarks/README.md).
    """
    count = threads * max(1, round(n / (threads * (size or SLICE))))
    cuts = np.linspace(0, n, min(count, n // MIN_SLICE) + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])] or [slice(0, n)]


def training_slices(layers, n, threads):
    """The slices train_in_slices cuts a batch of n into. Batch
    normalization's slices wait for each other (SumOverSlices), so they must
    all run at once: then one slice per thread."""
    together = any(hasattr(layer, "moving_mean") for layer in layers)
    return slices(n, threads, size=-(-n // threads) if together else None)


def train_in_slices(lesson, layers, x, y, threads=None):
    """Drop-in for lesson.loss_and_grads(layers, x, y): the same loss, probs
    and gradients (left on each layer as dkernel, dbias, ...), to rounding.

    The loss is a mean over the batch's N examples, so the batch's gradient
    is the sum of the slices' gradients if each slice's counts as its share
    (n_slice / N) of the mean: a last layer, ShareOfBatch, scales each
    slice's gradient so. Dropout's random numbers for the whole batch are
    drawn here, before the batch is cut, and each slice gets its rows: the
    masks, and so the results, are the lesson's whatever the slices.
    """
    n, threads = len(x), threads or cores()
    parts = training_slices(layers, n, threads)
    if len(parts) == 1:
        return lesson_function(lesson, "loss_and_grads")(layers, x, y)
    copies, sums = fast_copies(layers, parts, training=True, x=x)
    for layers_s, rows in zip(copies, parts):
        layers_s.append(ShareOfBatch((rows.stop - rows.start) / n))
    loss_and_grads = lesson_function(lesson, "loss_and_grads")

    def work(layers_s, rows):
        try:
            return loss_and_grads(layers_s, x[rows], y[rows])
        except BaseException:
            for total in sums:                # do not leave the other slices waiting
                total.barrier.abort()
            raise

    results = _run(work, copies, parts, threads)
    for i, layer in enumerate(layers):
        for name in layer.params:             # the batch's gradient: the sum
            setattr(layer, "d" + name, _add_up([getattr(c[i], "d" + name) for c in copies]))
        for name in layer.state:              # the same in every slice's copy
            setattr(layer, name, getattr(copies[0][i], name))
    loss = sum(part_loss * (rows.stop - rows.start) / n
               for (part_loss, _), rows in zip(results, parts))
    return loss, np.concatenate([probs for _, probs in results])


def logits_in_slices(lesson, model, x, threads=None):
    """Drop-in for lesson.logits(model, x): inference on slices, on threads."""
    threads = threads or cores()
    parts = slices(len(x), threads)
    if len(parts) == 1:
        return lesson_function(lesson, "logits")(model, x)
    copies, _ = fast_copies(model.layers, parts, training=False)
    forward = lesson_function(lesson, "forward")
    x = x.astype(model.dtype, copy=False)
    return np.concatenate(_run(lambda layers_s, rows: forward(layers_s, x[rows]),
                               copies, parts, threads))


def lesson_function(lesson, name):
    """The lesson's own function, also while switched_on has replaced it."""
    return getattr(lesson, "lesson_functions", {}).get(name) or getattr(lesson, name)


def fast_copies(layers, parts, training, x=None):
    """For each slice, shallow copies of the layers (they share the weight
    arrays, nothing is copied, but keep their own caches), each of a fast
    class where one is known (FAST, below). Returns (copies, the batch
    normalization sums shared between the slices)."""
    copies = [[_fast_copy(layer) for layer in layers] for _ in parts]
    for layers_s in copies:
        if hasattr(layers_s[0], "first"):
            layers_s[0].first = True          # its input gradient is never needed
        for layer, after in zip(layers_s, layers_s[1:]):
            if getattr(layer, "activation", None) == "relu" and hasattr(layer, "relu_later") \
                    and getattr(after, "pool_size", None) == 2 and hasattr(after, "relu_here"):
                layer.relu_later = after.relu_here = True
    sums = []
    for i, layer in enumerate(layers):
        if training and hasattr(layer, "rate"):              # Dropout: the batch's draws
            dtype = np.result_type(x.dtype, *[getattr(w, part) for w in layers
                                              for part in w.params][:1])
            uniform = layer.rng.random((len(x),) + layer.input_shape, dtype=dtype)
            for layers_s, rows in zip(copies, parts):
                layers_s[i].rng = DrawnAlready(uniform[rows])
        if training and hasattr(layer, "moving_mean"):       # BatchNormalization
            sums.append(SumOverSlices(len(parts)))
            for s, layers_s in enumerate(copies):
                layers_s[i].total = sums[-1].for_slice(s)
    return copies, sums


class DrawnAlready:
    """Stands in for a slice's random generator: it hands out the slice's
    rows of numbers drawn for the whole batch at once."""

    def __init__(self, numbers):
        self.numbers = numbers

    def random(self, shape, dtype=None):
        assert tuple(shape) == self.numbers.shape, (shape, self.numbers.shape)
        return self.numbers


class ShareOfBatch:
    """A last layer for one slice: the forward pass goes through unchanged;
    the gradient, which the loss gave as the mean over the slice's own
    examples, is scaled to the slice's share of the batch's mean."""
    params = state = ()
    activation = None

    def __init__(self, share):
        self.share = float(share)         # a Python float keeps float32 gradients float32

    def forward(self, x, training=False):
        return x

    def backward(self, dout):
        return dout * self.share


def _add_up(arrays):
    """sum(arrays), into one new array (sum() would make one per addition)."""
    total = arrays[0] + arrays[1]
    for more in arrays[2:]:
        total += more
    return total


def _run(work, copies, parts, threads):
    """work(layers, rows) for every slice, on `threads` threads (each takes
    the next slice when it is done with one), with BLAS held to one thread
    (threadpoolctl finds the BLAS library NumPy loaded). The threads get
    the caller's np.errstate (it does not pass to threads by itself)."""
    if not _BLAS:
        from threadpoolctl import ThreadpoolController   # needed only here
        _BLAS.append(ThreadpoolController())
    threads = min(threads, len(parts))
    if threads not in _POOLS:                 # started once, reused
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="slice")
    errors = np.geterr()

    def run(layers, rows):
        with np.errstate(**errors):
            return work(layers, rows)

    with _BLAS[0].limit(limits=1, user_api="blas"):
        return list(_POOLS[threads].map(run, copies, parts))


class SumOverSlices:
    """Sums over a whole batch whose slices run on separate threads: what
    batch normalization needs, since each example is normalised with the
    mean and variance of the *whole* batch (frameworks call this
    synchronised batch normalization).

    Each slice's thread calls for_slice(s)(its per-channel sums); all wait at
    a barrier until every slice has handed its part in, then each adds the
    parts up in the same order (so every thread gets the very same numbers)
    and waits again before the parts are replaced by the next sum.
    """

    def __init__(self, count):
        self.parts = [None] * count
        self.barrier = threading.Barrier(count)

    def for_slice(self, s):
        def total(part):
            self.parts[s] = part
            self.barrier.wait()               # every slice has handed in its part
            result = sum(self.parts[1:], self.parts[0])
            self.barrier.wait()               # every slice has read the parts
            return result
        return total


def keep_freed_memory():
    """Memory reuse across batches. Every training step makes the same big
    arrays again (im2col matrices, feature maps and their gradients, tens of
    MB for a batch of 128) and drops them when the step ends. By default the
    C allocator NumPy uses (glibc's malloc) hands blocks this large back to
    the operating system when they are freed, so the next step gets fresh
    ones, which the OS zero-fills page by page on first touch. Raising two
    of glibc's thresholds (mallopt) makes it keep freed memory for the next
    batch instead. Only glibc (Linux) has mallopt; elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):             # another C library
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)   # blocks up to 32 MB come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)    # and free heap memory is kept (up to 1 GB)


# =============================================================================
# 2-4. Fast layers: each method a drop-in for the lesson layer's
# =============================================================================
# A slice's copy of a lesson layer gets a class made of the lesson's and one
# of these (FastConv2D + Conv2D, ...): its methods replace the lesson's, and
# whatever they do not replace is the lesson's. A layer the machine does not
# know (one a learner added) runs as the lesson wrote it.

class InPlaceReLU:
    """Drop-in for Layer.activate / activate_backward: ReLU overwrites the
    array it is given instead of making a new one. Safe because that array
    is fresh and read by nothing else: forward, the layer's own product;
    backward, the next layer's new input gradient. relu_later: the ReLU
    moves to the max-pooling after this layer (FastMaxPooling2D)."""
    first = relu_later = False

    def activate(self, out):
        if self.activation == "relu" and not self.relu_later:
            self.relu_cache = np.maximum(out, 0, out=out)
        return out

    def activate_backward(self, dout):
        if self.activation == "relu" and not self.relu_later:
            return np.multiply(dout, self.relu_cache > 0, out=dout)
        return dout


class FastConv2D(InPlaceReLU):
    """Drop-in for Conv2D.forward / backward: the fast conv2d pair below, no
    dx for the network's first layer (first: nothing before it learns)."""

    def forward(self, x, training=False):
        out, self.cache = conv2d_forward(x, self.kernel, self.bias)
        return self.activate(out)

    def backward(self, dout):
        dx, self.dkernel, self.dbias = conv2d_backward(self.activate_backward(dout),
                                                       self.cache, need_dx=not self.first)
        return dx


class FastDense(InPlaceReLU):
    """Dense with its ReLU in place (its products are already one BLAS call)."""


class FastMaxPooling2D:
    """Drop-in for MaxPooling2D.forward / backward, for 2 x 2 windows (the
    fast pair below). relu_here: the previous Conv2D's ReLU runs here,
    after the pooling. ReLU never changes which of two numbers is larger,
    so the largest of four ReLU outputs is the ReLU of the largest input:
        max(relu(a), relu(b), relu(c), relu(d)) = relu(max(a, b, c, d)),
    on an output four times smaller. The gradients agree too: where the
    window's maximum is positive, both orders send the gradient to the
    first input holding it; where it is not, ReLU stops it either way."""
    relu_here = False

    def forward(self, x, training=False):
        if self.pool_size != 2:
            return super().forward(x, training)
        out, self.cache = maxpool2d_forward(x)
        if self.relu_here:
            self.relu_cache = np.maximum(out, 0, out=out)
        return out

    def backward(self, dout):
        if self.pool_size != 2:
            return super().backward(dout)
        if self.relu_here:
            dout = np.multiply(dout, self.relu_cache > 0, out=dout)
        return maxpool2d_backward(dout, self.cache)


class BatchNormOverSlices:
    """Drop-in for BatchNormalization.forward / backward in training, when
    the batch is cut into slices: the sums over the batch come from all the
    slices (total, a SumOverSlices), so that every slice normalises with the
    whole batch's statistics. Each slice's copy computes the same new moving
    statistics; train_in_slices keeps the first slice's."""

    def forward(self, x, training=False):
        if not training:
            return super().forward(x, training)
        out, cache, mean, var = batchnorm_forward(x, self.gamma, self.beta, self.epsilon,
                                                  self.total)
        self.cache = cache, None, None
        self.update_moving_statistics(mean, var)
        return out

    def backward(self, dout):
        if self.cache[0] is None:
            return super().backward(dout)
        dx, self.dgamma, self.dbeta = batchnorm_backward(dout, self.cache[0])
        return dx


FAST = {"Conv2D": FastConv2D, "Dense": FastDense, "MaxPooling2D": FastMaxPooling2D,
        "BatchNormalization": BatchNormOverSlices}
_CLASSES = {}


def _fast_copy(layer):
    copied, cls = copy.copy(layer), type(layer)
    if cls.__name__ in FAST:
        if cls not in _CLASSES:
            _CLASSES[cls] = type("Fast" + cls.__name__, (FAST[cls.__name__], cls), {})
        copied.__class__ = _CLASSES[cls]
    return copied


# =============================================================================
# Fast functions: each a drop-in for the lesson function of its name
# =============================================================================

def im2col_with_ones(x, K):
    """The lesson's im2col(x, K) with a column of ones after it: (N*H'*W',
    K*K*C + 1). The ones are the bias's input: with the bias as the last
    row of the weights, cols @ weights = window . kernel + 1 * bias, with no
    separate pass over the output to add it. cols is filled in place: no
    other copy of the windows is made.
    """
    N, H, W, C = x.shape
    Ho, Wo = H - K + 1, W - K + 1
    cols = np.empty((N, Ho, Wo, K * K * C + 1), x.dtype)
    cols[..., -1] = 1
    if C == 1:
        # One input channel (the first layer): a row is only K*K numbers.
        # Copying the K*K shifted images x[:, a:a+H', b:b+W'] one at a time,
        # each into its column, is about 4x faster than the window copy
        # below, which would move K numbers at a time.
        for a in range(K):
            for b in range(K):
                cols[..., a * K + b] = x[:, a:a + Ho, b:b + Wo, 0]
    else:
        windows = sliding_window_view(x, (K, K), axis=(1, 2))   # (N, H', W', C, K, K)
        windows = windows.transpose(0, 1, 2, 4, 5, 3)            # (N, H', W', K, K, C)
        cols[..., :-1].reshape(N, Ho, Wo, K, K, C)[...] = windows   # a view of cols
    return cols.reshape(N * Ho * Wo, K * K * C + 1)


def conv2d_forward(x, kernel, bias):
    """Drop-in for the lesson's conv2d_forward: the bias rides in the matrix
    product (im2col_with_ones), and the cache keeps x, not cols: cols holds
    each pixel up to K*K = 9 times (conv2's is 6.5 times its x), and by the
    backward pass a kept cols has left the CPU's caches and must come back
    from memory. Copying it again from x is faster (recomputing instead of
    storing, as frameworks do to save memory)."""
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    cols = im2col_with_ones(x, K)                                         # (N*H'*W', K*K*C + 1)
    weights = np.concatenate([kernel.reshape(K * K * C, F), bias[None]])  # (K*K*C + 1, F)
    return (cols @ weights).reshape(N, H - K + 1, W - K + 1, F), (x, kernel)


def conv2d_backward(dout, cache, need_dx=True):
    """Drop-in for the lesson's conv2d_backward (need_dx=False: dx is None).

    dkernel and dbias together: the last row of cols.T @ dout2d is dbias,
    because its column of cols holds ones. np.dot, not @: for a product whose
    result is small ((K*K*C + 1) x F, e.g. 10 x 32) NumPy's @ keeps Python's
    lock (the GIL) while it works, however long the sums; np.dot lets go of
    it, so the other slice's thread keeps running. col2im, one kernel offset
    (a, b) at a time, as nine matrix products dout2d @ kernel[a, b].T, each
    a ready block of dx: faster than one big dcols whose pieces are
    scattered in memory.
    """
    x, kernel = cache
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    Ho, Wo = H - K + 1, W - K + 1
    dout2d = dout.reshape(-1, F)                              # (N*H'*W', F)
    dweights = np.dot(im2col_with_ones(x, K).T, dout2d)       # (K*K*C + 1, F)
    dkernel, dbias = dweights[:-1].reshape(K, K, C, F), dweights[-1]
    if not need_dx:
        return None, dkernel, dbias
    kernel_t = np.ascontiguousarray(kernel.transpose(0, 1, 3, 2))  # (K, K, F, C)
    dx = np.zeros(x.shape, dtype=dout.dtype)                  # (N, H, W, C)
    for a in range(K):
        for b in range(K):
            dx[:, a:a + Ho, b:b + Wo, :] += (dout2d @ kernel_t[a, b]).reshape(N, Ho, Wo, C)
    return dx, dkernel, dbias


def maxpool2d_forward(x):
    """Drop-in for the lesson's maxpool2d_forward(x, 2). The four positions
    of every window are four strided views of x (no copies): top-left
    x[:, 0::2, 0::2], top-right x[:, 0::2, 1::2], and so on; the output is
    their elementwise maximum. The winner, with ties to the first maximum
    in reading order as in the lesson, is one byte per output (0..3)."""
    N, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    tl, tr = x[:, 0:2 * Ho:2, 0:2 * Wo:2], x[:, 0:2 * Ho:2, 1:2 * Wo:2]  # (N, H', W', C)
    bl, br = x[:, 1:2 * Ho:2, 0:2 * Wo:2], x[:, 1:2 * Ho:2, 1:2 * Wo:2]
    top, bottom = np.maximum(tl, tr), np.maximum(bl, br)
    # The bottom row wins only if it is strictly larger, then within the
    # chosen row the right column only if it is strictly larger.
    down = bottom > top
    right = (down & (br > bl)) | (~down & (tr > tl))          # (np.where is slower here)
    winner = 2 * down.view(np.uint8) + right.view(np.uint8)  # bools viewed as bytes: 0..3
    return np.maximum(top, bottom), (x.shape, winner)


def maxpool2d_backward(dout, cache):
    """Drop-in for the lesson's maxpool2d_backward. Every input is in
    exactly one window position, so the four strided views fill dx
    completely; out= writes each product straight into its view."""
    x_shape, winner = cache
    Ho, Wo = dout.shape[1:3]
    dx = np.empty(x_shape, dtype=dout.dtype)                  # (N, H, W, C)
    dx[:, 2 * Ho:], dx[:, :, 2 * Wo:] = 0, 0                  # a dropped odd row/column
    for k, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        np.multiply(dout, winner == k, out=dx[:, a:2 * Ho:2, b:2 * Wo:2])
    return dx


def batchnorm_forward(x, gamma, beta, epsilon, total):
    """Drop-in for batchnorm.batchnorm_forward on one slice of a batch:
    total(per-channel sums) adds them up over all the slices (SumOverSlices),
    so M, the mean and the variance are the whole batch's."""
    axes = tuple(range(x.ndim - 1))
    M = total(np.float64(x.size // x.shape[-1]))
    mean = (total(x.sum(axis=axes, dtype=np.float64)) / M).astype(x.dtype)
    centred = x - mean
    var = (total(np.square(centred).sum(axis=axes, dtype=np.float64)) / M).astype(x.dtype)
    inv_std = 1 / np.sqrt(var + epsilon)
    xhat = centred * inv_std
    return gamma * xhat + beta, (xhat, gamma, inv_std, x.dtype.type(M), total), mean, var


def batchnorm_backward(dout, cache):
    """Drop-in for batchnorm.batchnorm_backward on one slice: the two sums in
    dx are over the whole batch (total); dgamma and dbeta are this slice's
    share, which train_in_slices adds up."""
    xhat, gamma, inv_std, M, total = cache
    axes = tuple(range(dout.ndim - 1))
    dbeta = dout.sum(axis=axes, dtype=np.float64)
    dgamma = (dout * xhat).sum(axis=axes, dtype=np.float64)
    sum_dout, sum_dout_xhat = total(np.stack([dbeta, dgamma])).astype(dout.dtype)
    dx = gamma * inv_std / M * (M * dout - sum_dout - xhat * sum_dout_xhat)
    return dx, dgamma.astype(dout.dtype), dbeta.astype(dout.dtype)
