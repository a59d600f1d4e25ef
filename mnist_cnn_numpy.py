"""The same small convolutional network, from scratch in NumPy: the twin.

    python mnist_cnn_numpy.py                 # train 12 epochs, about 99.2%
    python mnist_cnn_numpy.py --help          # the same flags as the Keras twin

Every layer of mnist_cnn_keras.py, rebuilt as arithmetic: a forward pass, a
backward pass (the chain rule, one layer at a time), and Adam. Same flags,
same starting weights, same batches, same report as the Keras twin, and no
TensorFlow anywhere. Read mnist_cnn_keras.py first for *what* the network
is; this file shows *how* each of its lines is computed.

How to read it: the math is in function pairs, `x_forward(...) -> out, cache`
and `x_backward(dout, cache) -> gradients`. Below each fast function sits a
slow loop version labelled "algorithmic reference": the definition written
out plainly. Training uses the fast ones; the tests check them against the
slow ones. The classes (Conv2D, Dense, ...) have Keras's names and weight
layouts and only hold weights and caches.

Speed: each fast function says what makes it fast. Two things concern the
whole model, not one layer: each batch is cut into one slice per CPU core,
run on threads (Model.on_slices), and freed memory is kept for the next
batch (keep_freed_memory).

Shape legend:
    N  batch size            H, W  height and width of an image or feature map
    C  input channels        F     filters (output channels) of a conv layer
    K  kernel size (3)       H', W'  output height and width
    D  input features of a dense layer, U its units (outputs)
A name starting with `d` is a gradient of the loss: dx = dLoss/dx.

Writes to --out (default results/): numpy.json (the report),
numpy.weights.npz (the weights, loadable by either twin) and the figures.
"""

# =============================================================================
# Setup
# =============================================================================
import copy
import ctypes
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import ThreadpoolController

import common
import data_utils
import own_digits


# =============================================================================
# Data
# =============================================================================
# Both twins get their data through common.load_splits (from data_utils): the
# same arrays, the same 5,000 validation images, and, in Train below, the same
# batches in the same order for the same seed.


# =============================================================================
# Model: the math, one function pair per layer
# =============================================================================

# --- Conv2D ------------------------------------------------------------------

def im2col(x, K):
    """Every K x K window of x as one row of a matrix, and a 1 after it.

    x: (N, H, W, C)  ->  cols: (N*H'*W', K*K*C + 1)
    Row (n, i, j) holds x[n, i:i+K, j:j+K, :] in (a, b, c) order, then 1 (the
    bias's input, see conv2d_forward). cols is filled in place: no other
    copy of the windows is made.
    """
    N, H, W, C = x.shape
    Ho, Wo = H - K + 1, W - K + 1
    cols = np.empty((N, Ho, Wo, K * K * C + 1), x.dtype)
    cols[..., -1] = 1
    if C == 1:
        # One input channel (the first layer): a row is only K*K numbers.
        # Copying the K*K shifted images x[:, a:a+H', b:b+W'] one at a time,
        # each into its column, is about 4x faster here than the window copy
        # below, which would move K numbers at a time.
        for a in range(K):
            for b in range(K):
                cols[..., a * K + b] = x[:, a:a + Ho, b:b + Wo, 0]
    else:
        # sliding_window_view gives every window without copying; the
        # assignment copies them into cols, C numbers at a time.
        windows = sliding_window_view(x, (K, K), axis=(1, 2))   # (N, H', W', C, K, K)
        windows = windows.transpose(0, 1, 2, 4, 5, 3)            # (N, H', W', K, K, C)
        cols[..., :-1].reshape(N, Ho, Wo, K, K, C)[...] = windows   # a view of cols
    return cols.reshape(N * Ho * Wo, K * K * C + 1)


def im2col_naive(x, K):
    """Algorithmic reference for im2col: one window at a time."""
    N, H, W, C = x.shape
    rows = [np.append(x[n, i:i + K, j:j + K, :].reshape(-1), 1)
            for n in range(N) for i in range(H - K + 1) for j in range(W - K + 1)]
    return np.array(rows, dtype=x.dtype)


def conv2d_forward(x, kernel, bias):
    """Valid 2-D convolution (Keras's "cross-correlation", no kernel flip).

    x:      (N, H, W, C)        kernel: (K, K, C, F)        bias: (F,)
    out:    (N, H', W', F)      H' = H - K + 1, W' = W - K + 1
    out[n, i, j, f] = bias[f] + sum_{a, b, c} x[n, i+a, j+b, c] * kernel[a, b, c, f]

    The trick (im2col): copy every K x K x C window of x into one row of a
    matrix `cols`. Then the whole convolution is a single matrix product,
    which BLAS computes at full speed. The bias rides along as one more
    weight: each row of cols ends in a 1 and the weight matrix ends in the
    bias row, so cols @ weights = (window . kernel) + 1 * bias, with no
    separate pass over the output to add it.
    """
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    Ho, Wo = H - K + 1, W - K + 1
    cols = im2col(x, K)                                       # (N*H'*W', K*K*C + 1)
    weights = np.concatenate([kernel.reshape(K * K * C, F), bias[None]])  # (K*K*C + 1, F)
    out = cols @ weights                                      # (N*H'*W', F)
    return out.reshape(N, Ho, Wo, F), (x.shape, cols, kernel)  # (N, H', W', F)


def conv2d_backward(dout, cache, need_dx=True):
    """Gradients of a convolution.

    dout: (N, H', W', F)   ->   dx: (N, H, W, C) (None if not need_dx),
                                dkernel: (K, K, C, F), dbias: (F,)
    In im2col form the layer is out = cols @ weights, a matrix product, so
    the chain rule gives
        dweights = cols.T @ dout2d       (each weight saw every window)
        dcols    = dout2d @ weights.T    (each window's share of dx; the
                                          ones column's share is not needed)
    The last row of dweights is dbias: its input was the column of ones, so
    it is the sum of dout over N, H', W'. dx is dcols folded back ("col2im"):
    each input pixel sat in up to K*K windows, so it collects the gradient
    from each of them.
    The first layer skips dx (need_dx=False): nothing before it learns.
    """
    x_shape, cols, kernel = cache
    N, H, W, C = x_shape
    K, _, _, F = kernel.shape
    Ho, Wo = H - K + 1, W - K + 1
    dout2d = dout.reshape(-1, F)                              # (N*H'*W', F)
    dweights = cols.T @ dout2d                                # (K*K*C + 1, F)
    dkernel, dbias = dweights[:-1].reshape(K, K, C, F), dweights[-1]
    if not need_dx:
        return None, dkernel, dbias
    # col2im, one kernel offset (a, b) at a time: the columns of dcols for
    # offset (a, b) are dout2d @ kernel[a, b].T, and they belong to the input
    # pixels x[:, a:a+H', b:b+W', :]. Nine matrix products, each giving a
    # ready (N, H', W', C) block to add, are faster than one big dcols whose
    # pieces are scattered in memory.
    kernel_t = np.ascontiguousarray(kernel.transpose(0, 1, 3, 2))  # (K, K, F, C)
    dx = np.zeros(x_shape, dtype=dout.dtype)                  # (N, H, W, C)
    for a in range(K):
        for b in range(K):
            dx[:, a:a + Ho, b:b + Wo, :] += (dout2d @ kernel_t[a, b]).reshape(N, Ho, Wo, C)
    return dx, dkernel, dbias


def conv2d_forward_naive(x, kernel, bias):
    """Algorithmic reference for conv2d_forward: the definition, in loops."""
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    out = np.zeros((N, H - K + 1, W - K + 1, F), dtype=x.dtype)
    for n in range(N):
        for i in range(H - K + 1):
            for j in range(W - K + 1):
                for f in range(F):
                    window = x[n, i:i + K, j:j + K, :]          # (K, K, C)
                    out[n, i, j, f] = np.sum(window * kernel[:, :, :, f]) + bias[f]
    return out


def conv2d_backward_naive(dout, x, kernel):
    """Algorithmic reference for conv2d_backward: each output's gradient
    flows back to the K*K*C inputs and weights that made it."""
    N, Ho, Wo, F = dout.shape
    K = kernel.shape[0]
    dx, dkernel = np.zeros_like(x), np.zeros_like(kernel)
    dbias = np.zeros(F, dtype=dout.dtype)
    for n in range(N):
        for i in range(Ho):
            for j in range(Wo):
                for f in range(F):
                    g = dout[n, i, j, f]
                    dx[n, i:i + K, j:j + K, :] += g * kernel[:, :, :, f]
                    dkernel[:, :, :, f] += g * x[n, i:i + K, j:j + K, :]
                    dbias[f] += g
    return dx, dkernel, dbias


# --- ReLU --------------------------------------------------------------------

def relu_forward(z, in_place=False):
    """out = max(z, 0), elementwise; any shape. (Short enough to be its own
    reference.) in_place=True overwrites z with the result: no new array,
    for a z that nothing else will read (see Conv2D.forward)."""
    out = np.maximum(z, 0, out=z if in_place else None)
    return out, out


def relu_backward(dout, out, in_place=False):
    """The slope of max(z, 0) is 1 where z > 0 and 0 elsewhere, so the
    gradient passes where the unit was active and stops where it was not.
    in_place=True overwrites dout with the result."""
    return np.multiply(dout, out > 0, out=dout if in_place else None)


# --- MaxPooling2D --------------------------------------------------------------

def maxpool2d_forward(x, pool=2):
    """Max over each non-overlapping 2 x 2 window (stride 2).

    x: (N, H, W, C)  ->  out: (N, H', W', C),  H' = H // 2, W' = W // 2
    (an odd last row or column is dropped, as Keras's "valid" padding does).
    The trick: the four positions of every window are four strided views of
    x (no copies): top-left x[:, 0::2, 0::2], top-right x[:, 0::2, 1::2], and
    so on. The output is the elementwise max of the four views.
    The cache keeps only *which* position won, as one small integer per
    output (0 1 / 2 3 in reading order), not a mask the size of the input.
    Only pool = 2 (this network's) has a fast version; the naive reference
    below takes any size.
    """
    if pool != 2:
        raise ValueError("the fast max-pool is written for 2 x 2 windows")
    N, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    tl, tr = x[:, 0:2 * Ho:2, 0:2 * Wo:2], x[:, 0:2 * Ho:2, 1:2 * Wo:2]  # (N, H', W', C)
    bl, br = x[:, 1:2 * Ho:2, 0:2 * Wo:2], x[:, 1:2 * Ho:2, 1:2 * Wo:2]
    top, bottom = np.maximum(tl, tr), np.maximum(bl, br)
    out = np.maximum(top, bottom)                             # (N, H', W', C)
    # The winner, with ties going to the first maximum in reading order:
    # the bottom row only if it is strictly larger, then within the chosen
    # row the right column only if it is strictly larger.
    down = bottom > top
    right = (down & (br > bl)) | (~down & (tr > tl))          # (np.where is slower here)
    winner = 2 * down.view(np.uint8) + right.view(np.uint8)  # (N, H', W', C) in 0..3
    return out, (x.shape, winner)


def maxpool2d_backward(dout, cache):
    """Route each output's gradient to the one input that was the maximum.

    The max is a switch: only the winning input affects the output, so it
    gets all of dout and the other three inputs of the window get 0. With a
    tie (equal maxima: common, as ReLU makes many zeros and blank regions
    give equal values) the gradient goes to the *first* maximum in reading
    order, which is also what TensorFlow does. Splitting it among the tied
    inputs would be another valid subgradient, but not Keras's.
    dout: (N, H', W', C)  ->  dx: (N, H, W, C)
    """
    x_shape, winner = cache
    Ho, Wo = dout.shape[1:3]
    dx = np.empty(x_shape, dtype=dout.dtype)                  # (N, H, W, C)
    dx[:, 2 * Ho:], dx[:, :, 2 * Wo:] = 0, 0                  # a dropped odd row/column
    for k, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        # Every input is in exactly one window position, so the four views
        # fill dx completely; out= writes each product straight into its view.
        np.multiply(dout, winner == k, out=dx[:, a:2 * Ho:2, b:2 * Wo:2])
    return dx


def maxpool2d_forward_naive(x, pool=2):
    """Algorithmic reference for maxpool2d_forward."""
    N, H, W, C = x.shape
    out = np.zeros((N, H // pool, W // pool, C), dtype=x.dtype)
    for n in range(N):
        for i in range(H // pool):
            for j in range(W // pool):
                for c in range(C):
                    out[n, i, j, c] = x[n, i * pool:(i + 1) * pool,
                                        j * pool:(j + 1) * pool, c].max()
    return out


def maxpool2d_backward_naive(dout, x, pool=2):
    """Algorithmic reference for maxpool2d_backward: the first maximum of
    each window (row-major) receives the gradient."""
    dx = np.zeros_like(x)
    N, Ho, Wo, C = dout.shape
    for n in range(N):
        for i in range(Ho):
            for j in range(Wo):
                for c in range(C):
                    window = x[n, i * pool:(i + 1) * pool, j * pool:(j + 1) * pool, c]
                    a, b = divmod(int(np.argmax(window)), pool)
                    dx[n, i * pool + a, j * pool + b, c] += dout[n, i, j, c]
    return dx


# --- Flatten -----------------------------------------------------------------

def flatten_forward(x):
    """(N, H, W, C) -> (N, H*W*C), channels-last order, as Keras flattens."""
    return x.reshape(len(x), -1), x.shape                     # (N, H*W*C)


def flatten_backward(dout, shape):
    return dout.reshape(shape)                                # (N, H, W, C)


# --- Dense -------------------------------------------------------------------

def dense_forward(x, kernel, bias):
    """out = x @ kernel + bias.
    x: (N, D)   kernel: (D, U)   bias: (U,)   ->   out: (N, U)"""
    return x @ kernel + bias, (x, kernel)                     # (N, U)


def dense_backward(dout, cache):
    """dout: (N, U) -> dx: (N, D), dkernel: (D, U), dbias: (U,).
    out[n, u] = sum_d x[n, d] * kernel[d, u] + bias[u], so
    dkernel = x.T @ dout, dx = dout @ kernel.T, dbias = sum over the batch."""
    x, kernel = cache
    return dout @ kernel.T, x.T @ dout, dout.sum(axis=0)


def dense_forward_naive(x, kernel, bias):
    """Algorithmic reference for dense_forward."""
    N, D = x.shape
    out = np.zeros((N, kernel.shape[1]), dtype=x.dtype)
    for n in range(N):
        for u in range(kernel.shape[1]):
            out[n, u] = bias[u] + sum(x[n, d] * kernel[d, u] for d in range(D))
    return out


def dense_backward_naive(dout, x, kernel):
    """Algorithmic reference for dense_backward."""
    dx, dkernel = np.zeros_like(x), np.zeros_like(kernel)
    for n in range(x.shape[0]):
        for d in range(x.shape[1]):
            for u in range(kernel.shape[1]):
                dx[n, d] += dout[n, u] * kernel[d, u]
                dkernel[d, u] += dout[n, u] * x[n, d]
    return dx, dkernel, dout.sum(axis=0)


# --- Dropout -----------------------------------------------------------------

def dropout_mask(shape, rate, rng, dtype):
    """Inverted dropout, as Keras does it: at training time each unit is
    kept with probability 1 - rate and scaled by 1 / (1 - rate), so the
    expected value is unchanged and inference needs no rescaling at all.
    The mask holds 0 for a dropped unit and 1 / (1 - rate) for a kept one."""
    scale = np.asarray(1.0 / (1.0 - rate), dtype=dtype)
    return (rng.random(shape, dtype=dtype) >= rate) * scale    # (N, U)


def dropout_forward(x, mask):
    """out = x * mask. (Short enough to be its own reference.)"""
    return x * mask, mask


def dropout_backward(dout, mask):
    """out = x * mask, so dx = dout * mask: dropped units pass no gradient."""
    return dout * mask


# --- Softmax and cross-entropy ------------------------------------------------

def softmax(logits):
    """p[n, k] = exp(z[n, k]) / sum_j exp(z[n, j]).
    Subtracting each row's maximum first changes nothing mathematically (it
    cancels in the ratio) but keeps exp() from overflowing: the largest term
    becomes exp(0) = 1."""
    z = logits - logits.max(axis=1, keepdims=True)            # (N, 10)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels.

    logits: (N, 10)   labels: (N,)   ->   loss: scalar, probs: (N, 10)
    loss = mean_n [ log(sum_k exp(z[n, k])) - z[n, labels[n]] ], computed from
    the logits as Keras does when a Dense layer ends in softmax (more exact
    than taking the log of a rounded probability).
    """
    z = logits - logits.max(axis=1, keepdims=True)            # (N, 10)
    log_sum = np.log(np.exp(z).sum(axis=1))                   # (N,)
    loss = np.mean(log_sum - z[np.arange(len(z)), labels])
    return loss, np.exp(z - log_sum[:, None])                 # probs (N, 10)


def softmax_cross_entropy_backward(probs, labels, batch_size=None):
    """dlogits = (p - y) / N, y the one-hot labels.

    Why so simple: for one example, loss = -z_y + log sum_k exp(z_k), so
    dloss/dz_k = -[k == y] + exp(z_k) / sum_j exp(z_j) = p_k - y_k. The
    softmax's own complicated Jacobian cancels against the log. The 1/N is
    from averaging the loss over the batch; when probs and labels are one
    slice of a batch, batch_size gives the whole batch's N.
    """
    dlogits = probs.copy()                                    # (N, 10)
    dlogits[np.arange(len(labels)), labels] -= 1
    return dlogits / (batch_size or len(labels))


def softmax_cross_entropy_naive(logits, labels):
    """Algorithmic reference: loss and dlogits, one example at a time."""
    N = len(labels)
    loss, dlogits = 0.0, np.zeros_like(logits)
    for n in range(N):
        p = np.exp(logits[n] - logits[n].max())
        p /= p.sum()
        loss -= np.log(p[labels[n]]) / N
        for k in range(logits.shape[1]):
            dlogits[n, k] = (p[k] - (k == labels[n])) / N
    return loss, dlogits


# =============================================================================
# Model: Keras-named layers that hold weights and call the functions above
# =============================================================================

class Conv2D:
    def __init__(self, filters, kernel_size, activation=None, name=None,
                 input_channels=None):
        self.name, self.activation = name, activation
        self.kernel = np.zeros((kernel_size, kernel_size, input_channels, filters),
                               np.float32)
        self.bias = np.zeros(filters, np.float32)
        self.first = False           # set for the input layer: no dx needed

    def forward(self, x, training=False):
        out, self.cache = conv2d_forward(x, self.kernel, self.bias)
        if self.activation == "relu":
            # out is the product's fresh array, read by nothing else: ReLU
            # overwrites it instead of making a second one.
            out, self.relu_cache = relu_forward(out, in_place=True)
        return out

    def backward(self, dout):
        if self.activation == "relu":
            # dout is the next layer's fresh dx, read by nothing else.
            dout = relu_backward(dout, self.relu_cache, in_place=True)
        dx, self.dkernel, self.dbias = conv2d_backward(dout, self.cache,
                                                       need_dx=not self.first)
        return dx


class MaxPooling2D:
    def __init__(self, pool_size=2, name=None):
        self.pool_size, self.name = pool_size, name

    def forward(self, x, training=False):
        out, self.cache = maxpool2d_forward(x, self.pool_size)
        return out

    def backward(self, dout):
        return maxpool2d_backward(dout, self.cache)


class Flatten:
    def __init__(self, name=None):
        self.name = name

    def forward(self, x, training=False):
        out, self.shape = flatten_forward(x)
        return out

    def backward(self, dout):
        return flatten_backward(dout, self.shape)


class Dense:
    def __init__(self, units, activation=None, name=None, input_dim=None):
        self.name, self.activation = name, activation
        self.kernel = np.zeros((input_dim, units), np.float32)
        self.bias = np.zeros(units, np.float32)

    def forward(self, x, training=False):
        out, self.cache = dense_forward(x, self.kernel, self.bias)
        if self.activation == "relu":                 # in place, as in Conv2D
            out, self.relu_cache = relu_forward(out, in_place=True)
        # "softmax" is applied by the loss (from the logits) and by predict.
        return out

    def backward(self, dout):
        if self.activation == "relu":                 # in place, as in Conv2D
            dout = relu_backward(dout, self.relu_cache, in_place=True)
        dx, self.dkernel, self.dbias = dense_backward(dout, self.cache)
        return dx


class Dropout:
    """At training time the mask of the whole batch is drawn first (by
    Model.loss_and_grads, with draw_mask) and each slice of the batch gets its
    rows as batch_mask: the random numbers do not depend on how the batch is
    split across threads."""

    def __init__(self, rate, rng, name=None):
        self.rate, self.rng, self.name = rate, rng, name
        self.batch_mask = None

    def draw_mask(self, shape, dtype):
        return dropout_mask(shape, self.rate, self.rng, dtype)

    def forward(self, x, training=False):
        if not training or self.rate == 0:
            self.mask = None
            return x                                   # identity at inference
        if self.batch_mask is None:                    # used on its own
            self.batch_mask = self.draw_mask(x.shape, x.dtype)
        out, self.mask = dropout_forward(x, self.batch_mask)
        self.batch_mask = None                         # one mask, one batch
        return out

    def backward(self, dout):
        return dout if self.mask is None else dropout_backward(dout, self.mask)


def forward(layers, x, dtype, training=False):
    """Run x through the layers in order: (N, 28, 28, 1) -> logits (N, 10)."""
    out = x.astype(dtype, copy=False)
    for layer in layers:
        out = layer.forward(out, training)
    return out


# --- The whole machine: threads and memory ------------------------------------

# Threads (see Model.on_slices). A slice of fewer examples than this is not
# worth a thread of its own.
MIN_SLICE = 16
_POOL = {}
_BLAS = None


def _pool(threads):
    """One pool of worker threads per size, started once and reused."""
    if threads not in _POOL:
        _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="slice")
    return _POOL[threads]


def _blas_threads(limit):
    """A `with` block in which BLAS (NumPy's matrix products) uses at most
    `limit` threads. threadpoolctl finds the BLAS library NumPy loaded."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=limit, user_api="blas")


def keep_freed_memory():
    """Memory reuse across batches.

    Every training step makes the same big arrays again (im2col matrices,
    feature maps and their gradients, tens of MB for a batch of 128) and
    drops them when the step ends. By default the C allocator that NumPy uses
    (glibc's malloc) hands blocks this large back to the operating system
    when they are freed, so the next step must get fresh ones: the OS then
    zero-fills every new page on first touch, one page fault at a time.
    Raising two of glibc's thresholds makes it keep freed memory for the next
    batch instead: on the machine the README's numbers come from, a threaded
    step took about 40 ms without this and about 30 ms with it. Only glibc
    (Linux) has mallopt; elsewhere this does nothing.
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


def cores():
    """The CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Model:
    """The twins' network, layer by layer as in mnist_cnn_keras.build_model.

    threads: how many slices a batch is cut into (default: one per core).
    """

    def __init__(self, seed=0, dropout=0.5, dtype=np.float32, threads=None):
        self.dtype = np.dtype(dtype)
        self.threads = threads or cores()
        rng = common.random_streams(seed)["dropout"]
        self.layers = [
            Conv2D(32, 3, activation="relu", name="conv1", input_channels=1),
            MaxPooling2D(2, name="pool1"),
            Conv2D(64, 3, activation="relu", name="conv2", input_channels=32),
            MaxPooling2D(2, name="pool2"),
            Flatten(name="flatten"),
            Dense(128, activation="relu", name="dense1", input_dim=1600),
            Dropout(dropout, rng, name="dropout"),
            Dense(10, activation="softmax", name="dense2", input_dim=128),
        ]
        self.layers[0].first = True
        self.set_weights(common.initial_weights(seed, self.dtype))

    def trainable(self):
        return [layer for layer in self.layers if hasattr(layer, "kernel")]

    def set_weights(self, weights):
        """Take {"conv1/kernel": array, ...} in Keras's layouts, as is."""
        for layer in self.trainable():
            layer.kernel = np.array(weights[f"{layer.name}/kernel"], self.dtype)
            layer.bias = np.array(weights[f"{layer.name}/bias"], self.dtype)

    def get_weights(self):
        weights = {}
        for layer in self.trainable():
            weights[f"{layer.name}/kernel"] = layer.kernel.copy()
            weights[f"{layer.name}/bias"] = layer.bias.copy()
        return weights

    def logits(self, x):
        """The forward pass (inference) up to the last Dense layer's output z, (N, 10)."""
        return np.concatenate(self.on_slices(
            len(x), lambda layers, rows: forward(layers, x[rows], self.dtype)))

    def loss_and_grads(self, x, y, training=True):
        """Forward, loss, then backward through every layer in reverse.

        Returns (loss, probs) of the batch; each layer with weights keeps the
        batch's dkernel and dbias. The batch is cut into one slice per core
        (see on_slices): the loss is a mean over examples, so the batch's
        gradient is the sum of the slices' gradients when each slice divides
        by the whole batch's N.
        """
        n = len(x)
        d = next(i for i, layer in enumerate(self.layers) if isinstance(layer, Dropout))
        dropout = self.layers[d]
        mask = (dropout.draw_mask((n,) + common.LAYERS[d][2], self.dtype)
                if training and dropout.rate > 0 else None)   # (N, 128)

        def work(layers, rows):
            if mask is not None:
                layers[d].batch_mask = mask[rows]
            logits = forward(layers, x[rows], self.dtype, training)
            loss, probs = softmax_cross_entropy(logits, y[rows])
            dout = softmax_cross_entropy_backward(probs, y[rows], n)   # (rows, 10)
            for layer in reversed(layers):
                dout = layer.backward(dout)
            grads = [(layer.dkernel, layer.dbias) for layer in layers
                     if hasattr(layer, "kernel")]
            return loss * len(probs) / n, probs, grads

        results = self.on_slices(n, work)
        for i, layer in enumerate(self.trainable()):
            layer.dkernel = sum(grads[i][0] for _, _, grads in results)
            layer.dbias = sum(grads[i][1] for _, _, grads in results)
        loss = sum(part_loss for part_loss, _, _ in results)
        return loss, np.concatenate([probs for _, probs, _ in results])

    def on_slices(self, n, work):
        """Run work(layers, rows) on each slice of a batch of n, one thread each.

        Why threads: a matrix product (BLAS) uses every core, but NumPy's
        elementwise operations (im2col copies, ReLU, max-pool, ...) use one,
        and they took about two thirds of a training step. So each core gets a
        slice of the batch and runs the whole network on it, with BLAS held
        to one thread per slice: now both kinds of work use every core.
        NumPy releases Python's lock (the GIL) inside its operations, so the
        threads really run at the same time. Each slice gets a shallow copy
        of the layers: the copies share the weight arrays (nothing is copied)
        but keep their own caches. Batches too small to be worth it run as
        one slice, on the layers themselves. Returns work's results in order.
        """
        cuts = np.linspace(0, n, min(self.threads, n // MIN_SLICE) + 1).astype(int)
        slices = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])] or [slice(0, n)]
        if len(slices) == 1:
            return [work(self.layers, slices[0])]
        copies = [[copy.copy(layer) for layer in self.layers] for _ in slices]
        with _blas_threads(1):
            return list(_pool(len(slices)).map(work, copies, slices))

    def predict(self, x, batch_size=256):
        """Class probabilities, a batch at a time (bounded memory)."""
        return np.concatenate([softmax(self.logits(x[i:i + batch_size]))
                               for i in range(0, len(x), batch_size)])

    def evaluate(self, x, y, batch_size=256):
        """(mean loss, accuracy, probs) over all of x, a batch at a time."""
        loss_sum, probs = 0.0, []
        for i in range(0, len(x), batch_size):
            loss, p = softmax_cross_entropy(self.logits(x[i:i + batch_size]),
                                            y[i:i + batch_size])
            loss_sum += float(loss) * len(p)
            probs.append(p)
        probs = np.concatenate(probs)
        return loss_sum / len(x), float((probs.argmax(axis=1) == y).mean()), probs

    def feature_maps(self, image):
        """The outputs of the conv and pool layers for one image, for the figure."""
        out, maps = image[None].astype(self.dtype), []
        for layer in self.layers:
            out = layer.forward(out)
            if layer.name in common.FEATURE_LAYERS:
                maps.append((layer.name, out[0]))
        return maps

    def summary(self):
        """The same table as Keras's model.summary()."""
        rows = [("Layer (type)", "Output Shape", "Param #")]
        for layer, (name, _, shape) in zip(self.layers, common.LAYERS):
            params = (layer.kernel.size + layer.bias.size
                      if hasattr(layer, "kernel") else 0)
            rows.append((f"{name} ({type(layer).__name__})",
                         str((None,) + shape), f"{params:,}"))
        widths = (33, 24, 15)
        line = "".join(("┏", "┳".join("━" * w for w in widths), "┓"))
        print('Model: "sequential"')
        print(line)
        for i, (a, b, c) in enumerate(rows):
            print(f"┃ {a:<{widths[0] - 2}} ┃ {b:<{widths[1] - 2}} ┃ {c:>{widths[2] - 2}} ┃"
                  if i == 0 else
                  f"│ {a:<{widths[0] - 2}} │ {b:<{widths[1] - 2}} │ {c:>{widths[2] - 2}} │")
            sep = ("┡", "╇", "┩", "━") if i == 0 else ("├", "┼", "┤", "─")
            if i < len(rows) - 1:
                print(sep[0] + sep[1].join(sep[3] * w for w in widths) + sep[2])
        print("└" + "┴".join("─" * w for w in widths) + "┘")
        kb = common.PARAMS * self.dtype.itemsize / 1024
        print(f" Total params: {common.PARAMS:,} ({kb:.2f} KB)")
        print(f" Trainable params: {common.PARAMS:,} ({kb:.2f} KB)")
        print(" Non-trainable params: 0 (0.00 B)")


# =============================================================================
# Train: Adam, exactly as Keras updates
# =============================================================================

class Adam:
    """Adam with Keras's defaults and Keras's exact update rule.

    For each weight w with gradient g, at step t = 1, 2, ...:
        m = m + (g - m) * (1 - beta_1)            running mean of g
        v = v + (g*g - v) * (1 - beta_2)          running mean of g^2
        alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
        w = w - m * alpha / (sqrt(v) + epsilon)
    The bias correction (the beta^t terms, which undo m and v starting at 0)
    is folded into the step size alpha, and epsilon is added to sqrt(v),
    not to the corrected v: both exactly where Keras puts them.

    One detail decides bit-for-bit agreement in float64: Keras turns beta_1,
    beta_2 and the learning rate into float32 tensors before casting them to
    the weights' dtype, so its beta^t is computed from float32(0.9) =
    0.899999976..., not from 0.9. We round them the same way; in float32 this
    changes nothing.
    """

    def __init__(self, lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.lr, self.beta_1, self.beta_2, self.epsilon = lr, beta_1, beta_2, epsilon
        self.iterations = 0
        self.m, self.v = {}, {}

    def update(self, params):
        """params: list of (key, weight array, gradient array); in place."""
        t = self.iterations + 1
        for key, w, g in params:
            dt = w.dtype.type
            lr, b1, b2 = (dt(np.float32(v)) for v in (self.lr, self.beta_1, self.beta_2))
            alpha = lr * np.sqrt(1 - b2 ** dt(t)) / (1 - b1 ** dt(t))
            if key not in self.m:
                self.m[key], self.v[key] = np.zeros_like(w), np.zeros_like(w)
            m, v = self.m[key], self.v[key]
            m += (g - m) * dt(1 - self.beta_1)
            v += (g * g - v) * dt(1 - self.beta_2)
            w -= (m * alpha) / (np.sqrt(v) + dt(self.epsilon))
        self.iterations = t


def adam_step(model, optimizer):
    params = []
    for layer in model.trainable():
        params.append((f"{layer.name}/kernel", layer.kernel, layer.dkernel))
        params.append((f"{layer.name}/bias", layer.bias, layer.dbias))
    optimizer.update(params)


class ProgressBar:
    """A per-epoch bar like Keras's: step/total, time, ETA, running metrics.
    When the output is not a terminal, one line per epoch (Keras verbose=2)."""

    def __init__(self, total):
        self.total, self.start, self.tty = total, time.perf_counter(), sys.stdout.isatty()
        self.last = 0.0

    def update(self, step, metrics):
        now = time.perf_counter()
        if not self.tty or (now - self.last < 0.1 and step < self.total):
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / step * (self.total - step)
        bar = "━" * int(20 * step / self.total)
        print(f"\r{step:>{len(str(self.total))}}/{self.total} {bar:<20} "
              f"{elapsed:.0f}s (ETA {eta:.0f}s) - {_metrics(metrics)}",
              end="", flush=True)

    def close(self, metrics):
        elapsed = time.perf_counter() - self.start
        line = (f"{self.total}/{self.total} - {elapsed:.0f}s - "
                f"{1000 * elapsed / self.total:.0f}ms/step - {_metrics(metrics)}")
        print("\r" + line + "\033[K" if self.tty else line, flush=True)


def _metrics(metrics):
    return " - ".join(f"{k}: {v:.4f}" for k, v in metrics.items())


def train_epoch(model, optimizer, x, y, batch_size, rng):
    """One pass over (x, y) in the shared batch order; returns (loss, acc).

    Running loss and accuracy are averaged over examples, as Keras reports.
    """
    steps = -(-len(x) // batch_size)
    bar = ProgressBar(steps)
    loss_sum = correct = seen = 0
    for step, (xb, yb) in enumerate(
            data_utils.iterate_minibatches(x, y, batch_size, rng), start=1):
        loss, probs = model.loss_and_grads(xb, yb, training=True)
        adam_step(model, optimizer)
        loss_sum += float(loss) * len(yb)
        correct += int((probs.argmax(axis=1) == yb).sum())
        seen += len(yb)
        bar.update(step, {"accuracy": correct / seen, "loss": loss_sum / seen})
    return bar, loss_sum / seen, correct / seen


def train(model, train_set, val_set, args):
    (x, y), rng = train_set, common.random_streams(args.seed)["batches"]
    keep_freed_memory()
    optimizer = Adam(args.lr)
    history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    epoch_seconds = []
    for epoch in range(args.epochs):
        print(f"Epoch {epoch + 1}/{args.epochs}", flush=True)
        start = time.perf_counter()
        bar, loss, acc = train_epoch(model, optimizer, x, y, args.batch_size, rng)
        val_loss, val_acc, _ = model.evaluate(*val_set)
        epoch_seconds.append(time.perf_counter() - start)
        for key, value in zip(history, (loss, acc, val_loss, val_acc)):
            history[key].append(value)
        bar.close({"accuracy": acc, "loss": loss,
                   "val_accuracy": val_acc, "val_loss": val_loss})
    return history, epoch_seconds


# =============================================================================
# Evaluate and report: Model.evaluate, Model.predict and Model.feature_maps
# (above) run the network in batches; the files are the Keras twin's.
# =============================================================================


# =============================================================================
# main
# =============================================================================

def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    out = common.prepare_out_dir(args.out)
    start_weights = (common.load_weights(args.load_weights) if args.load_weights
                     else common.initial_weights(args.seed))

    spec = data_utils.DATASETS[args.dataset]
    title = f"NumPy twin, {spec['title']}"
    if args.predict and args.load_weights:       # only classify the user's images
        model = Model(args.seed)
        model.set_weights(start_weights)
        return own_digits.report(args.predict, model.predict, spec["classes"],
                                 out, "numpy", title)

    # Data: the same arrays, split and batches as the Keras twin.
    train_set, val_set, (x_test, y_test) = common.load_splits(args)

    # Model: the shared starting weights (or a weights file of either twin).
    model = Model(args.seed)
    model.set_weights(start_weights)
    model.summary()

    # Train
    history, epoch_seconds = {}, []
    if not args.eval_only:
        print(f"Training on {len(train_set[0]):,} {spec['title']} images, "
              f"validating on {len(val_set[0]):,}.")
        history, epoch_seconds = train(model, train_set, val_set, args)

    # Evaluate
    test_loss, test_accuracy, probs = model.evaluate(x_test, y_test)

    # Report
    report = common.make_report("numpy", args, len(train_set[0]), test_accuracy,
                                test_loss, epoch_seconds, history)
    written = [out / ("numpy.eval.json" if args.eval_only else "numpy.json")]
    common.write_report(written[0], report)
    if not args.eval_only:
        written.append(out / "numpy.weights.npz")
        common.save_weights(written[-1], model.get_weights())
    if not args.no_plots:
        import plots
        written += plots.all_figures("numpy", out, report["history"], x_test,
                                     y_test, probs, spec["classes"], title,
                                     model.layers[0].kernel,
                                     model.feature_maps(x_test[0]))
    print("Wrote " + ", ".join(str(p) for p in written))
    print(common.summary_line(report))
    if args.predict:
        return own_digits.report(args.predict, model.predict, spec["classes"],
                                 out, "numpy", title)
    return 0


if __name__ == "__main__":
    common.run(main)
