"""The same small convolutional network, from scratch in NumPy: the twin.

    python mnist_cnn_numpy.py                 # train 12 epochs, about 99.2%
    python mnist_cnn_numpy.py --help          # the same flags as the Keras twin

Every layer of mnist_cnn_keras.py, rebuilt as arithmetic: a forward pass, a
backward pass (the chain rule, one layer at a time), and Adam. Same flags,
same starting weights, same batches, same report as the Keras twin, and no
TensorFlow anywhere. Read mnist_cnn_keras.py first for *what* the network
is; this file shows *how* each of its lines is computed.

How to read it, top to bottom:
1. The math, in function pairs `x_forward(...) -> out, cache` and
   `x_backward(dout, cache) -> gradients`. Below each fast function sits a
   slow loop version labelled "algorithmic reference": the definition
   written out plainly. Training uses the fast ones; the tests check them
   against the slow ones.
2. The layers: classes with Keras's names and arguments (Conv2D(filters,
   kernel_size, activation)), which hold the weights and call the math; and
   build_model, the network declared once, as in the Keras twin.
3. Training: `loss_and_grads` (forward, loss, backward) and `train_step`
   (that, then Adam) are the whole algorithm, on one screen.

Speed: each fast function says what makes it fast. What concerns the whole
machine rather than the math (one slice of each batch per CPU core, BLAS
thread limits, memory kept for the next batch) lives in speedup.py, and is
called from one marked place in train_step.

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
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import common
import data_utils
import own_digits
import speedup


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
    # Exercise 11. Hint: one row per window, x[n, i:i+K, j:j+K, :] in (a, b, c) order, then a 1.
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
    The cache keeps x, not cols, although the backward pass needs cols
    again: cols holds each pixel of x up to K*K = 9 times (conv2's is 6.5
    times the size of its x), and by the time the backward pass comes, a
    kept cols has left the CPU's caches and must come back from memory.
    Copying it again from x is faster (recomputing instead of storing, as
    frameworks do to save memory).
    """
    # Exercise 12. Hint: im2col, then one product with the kernel as a (K*K*C, F) matrix.
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    Ho, Wo = H - K + 1, W - K + 1
    cols = im2col(x, K)                                       # (N*H'*W', K*K*C + 1)
    weights = np.concatenate([kernel.reshape(K * K * C, F), bias[None]])  # (K*K*C + 1, F)
    out = cols @ weights                                      # (N*H'*W', F)
    return out.reshape(N, Ho, Wo, F), (x, kernel)              # (N, H', W', F)


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
    # Exercise 13. Hint: the chain rule through cols @ weights; every window adds its share of dx.
    x, kernel = cache
    N, H, W, C = x_shape = x.shape
    K, _, _, F = kernel.shape
    Ho, Wo = H - K + 1, W - K + 1
    cols = im2col(x, K)                                       # again (see conv2d_forward)
    dout2d = dout.reshape(-1, F)                              # (N*H'*W', F)
    # np.dot, not @: for a product whose result is small (here (K*K*C + 1) x F,
    # e.g. 10 x 32) NumPy's @ keeps Python's lock (the GIL) while it works,
    # however long the inner dimension; np.dot lets go of it, so the other
    # slice's thread keeps running meanwhile (speedup.py).
    dweights = np.dot(cols.T, dout2d)                         # (K*K*C + 1, F)
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
    # Exercise 3. Hint: the gradient passes where z was positive, which is where out > 0.
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
    # Exercise 9. Hint: the four window positions are four strided views; keep the winner's index.
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
    # Exercise 10. Hint: each output's gradient goes to its window's winner only.
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
    # Exercise 8. Hint: one reshape, in (H, W, C) order; return the shape for the backward pass.
    return x.reshape(len(x), -1), x.shape                     # (N, H*W*C)


def flatten_backward(dout, shape):
    return dout.reshape(shape)                                # (N, H, W, C)


# --- Dense -------------------------------------------------------------------

def dense_forward(x, kernel, bias):
    """out = x @ kernel + bias.
    x: (N, D)   kernel: (D, U)   bias: (U,)   ->   out: (N, U)"""
    # Exercise 1. Hint: one matrix product, then the bias added to every row.
    return x @ kernel + bias, (x, kernel)                     # (N, U)


def dense_backward(dout, cache):
    """dout: (N, U) -> dx: (N, D), dkernel: (D, U), dbias: (U,).
    out[n, u] = sum_d x[n, d] * kernel[d, u] + bias[u], so
    dkernel = x.T @ dout, dx = dout @ kernel.T, dbias = sum over the batch."""
    # Exercise 2. Hint: one expression per gradient; check each shape against the docstring.
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
    # Exercise 6. Hint: rng.random(shape) >= rate keeps a unit with probability 1 - rate.
    scale = np.asarray(1.0 / (1.0 - rate), dtype=dtype)
    return (rng.random(shape, dtype=dtype) >= rate) * scale    # (N, U)


def dropout_forward(x, mask):
    """out = x * mask. (Short enough to be its own reference.)"""
    return x * mask, mask


def dropout_backward(dout, mask):
    """out = x * mask, so dx = dout * mask: dropped units pass no gradient."""
    # Exercise 7. Hint: the forward pass multiplied by the mask.
    return dout * mask


# --- BatchNormalization -------------------------------------------------------

def batchnorm_forward(x, gamma, beta, epsilon=1e-3, total=None):
    """Normalise each channel (the last axis) with the batch's statistics.

    x: (N, D) after a dense layer, or (N, H, W, C) after a conv layer (then
    each channel is normalised over N, H and W together). With M the number
    of values per channel (N, or N*H*W):
        mean = sum(x) / M                       (C,)   per channel
        var  = sum((x - mean)^2) / M            (C,)   (divided by M, as Keras)
        xhat = (x - mean) / sqrt(var + epsilon)        mean 0, variance 1
        out  = gamma * xhat + beta                     then scaled and shifted
    Returns out (x's shape), the cache, and the batch's mean and var (for the
    moving statistics). total(s) adds up per-channel sums over the whole
    batch; it is None here except when the speed-up cuts a batch into
    slices (speedup.py), when it adds the slices' sums, so that every slice
    normalises with the whole batch's statistics.
    """
    add = total or (lambda sums: sums)
    axes = tuple(range(x.ndim - 1))                          # all but the channels
    # The sums are taken in float64, then turned back into x's type: adding
    # up tens of thousands of float32 values one after another would lose
    # about three of float32's seven digits.
    M = add(np.float64(x.size // x.shape[-1]))
    mean = (add(x.sum(axis=axes, dtype=np.float64)) / M).astype(x.dtype)       # (C,)
    centred = x - mean
    var = (add(np.square(centred).sum(axis=axes, dtype=np.float64)) / M).astype(x.dtype)
    inv_std = 1 / np.sqrt(var + epsilon)                     # (C,)
    xhat = centred * inv_std
    return gamma * xhat + beta, (xhat, gamma, inv_std, x.dtype.type(M), total), mean, var


def batchnorm_backward(dout, cache):
    """Gradients of batch normalisation: dout (x's shape) -> dx, dgamma, dbeta.

    out = gamma * xhat + beta, so dbeta = sum(dout) and dgamma =
    sum(dout * xhat), per channel. dx has three terms, because each x
    reaches the output three ways (for one channel, sums over its M values):
      1. directly, through its own xhat = (x - mean) * inv_std:
             gamma * inv_std * dout
      2. through the mean, which every x moves by 1/M (and xhat moves
         against it):
             - gamma * inv_std * sum(dout) / M
      3. through the variance, which every x moves by 2 (x - mean) / M,
         and which scales every xhat down:
             - gamma * inv_std * xhat * sum(dout * xhat) / M
    so dx = gamma * inv_std / M * (M * dout - sum(dout) - xhat * sum(dout * xhat)).
    Forgetting terms 2 and 3 (treating the batch statistics as constants)
    is the classic mistake. Sums over the whole batch use the forward's
    total (see batchnorm_forward); dgamma and dbeta are this x's own share.
    """
    # Exercise 16. Hint: three terms: directly, through the mean, through the variance.
    xhat, gamma, inv_std, M, total = cache
    axes = tuple(range(dout.ndim - 1))
    dbeta = dout.sum(axis=axes, dtype=np.float64)            # (C,), in float64 as forward
    dgamma = (dout * xhat).sum(axis=axes, dtype=np.float64)  # (C,)
    sums = total(np.stack([dbeta, dgamma])) if total else np.stack([dbeta, dgamma])
    sum_dout, sum_dout_xhat = sums.astype(dout.dtype)
    dx = gamma * inv_std / M * (M * dout - sum_dout - xhat * sum_dout_xhat)
    return dx, dgamma.astype(dout.dtype), dbeta.astype(dout.dtype)


def batchnorm_forward_naive(x, gamma, beta, epsilon=1e-3):
    """Algorithmic reference for batchnorm_forward: one channel at a time."""
    out = np.zeros_like(x)
    for c in range(x.shape[-1]):
        values = x[..., c]
        mean = values.sum() / values.size
        var = ((values - mean) ** 2).sum() / values.size
        out[..., c] = gamma[c] * (values - mean) / np.sqrt(var + epsilon) + beta[c]
    return out


def batchnorm_backward_naive(dout, x, gamma, epsilon=1e-3):
    """Algorithmic reference for batchnorm_backward: the chain rule written
    out for each pair of values (i, j) of a channel, from
        d xhat_j / d x_i = inv_std * ([i == j] - 1/M - xhat_i * xhat_j / M)."""
    dx, dgamma, dbeta = np.zeros_like(x), np.zeros_like(gamma), np.zeros_like(gamma)
    for c in range(x.shape[-1]):
        values, grads = x[..., c].ravel(), dout[..., c].ravel()
        M = values.size
        mean = values.sum() / M
        inv_std = 1 / np.sqrt(((values - mean) ** 2).sum() / M + epsilon)
        xhat = (values - mean) * inv_std
        d = np.zeros(M)
        for i in range(M):
            for j in range(M):
                dxhat_j = inv_std * ((i == j) - 1 / M - xhat[i] * xhat[j] / M)
                d[i] += grads[j] * gamma[c] * dxhat_j
        dx[..., c] = d.reshape(x.shape[:-1])
        dgamma[c] = (grads * xhat).sum()
        dbeta[c] = grads.sum()
    return dx, dgamma, dbeta


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
    # Exercise 4. Hint: subtract each row's max before exp(); log of the sum minus the true logit.
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
    # Exercise 5. Hint: p - y with y one-hot, then divide by N (batch_size when given).
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
# Each layer takes Keras's constructor arguments and no input sizes: like
# Keras, it learns the shape of its input when the model is built (build,
# below) and makes its weights to fit. `params` names its learned weights in
# Keras's order; their gradients are "d" + the name (dkernel, dbias).

class Layer:
    params = ()          # learned weights, in Keras's order: ("kernel", "bias")
    state = ()           # weights kept but not learned (none in this network)
    first = False        # True for the network's first layer: no dx needed

    def __init__(self, name=None):
        self.name = name

    def build(self, input_shape, dtype):
        """Make the weights for this input shape; return the output shape."""
        return input_shape


def _activation(name):
    if name not in (None, "relu", "softmax"):
        raise ValueError(f"activation={name!r}: the NumPy twin has relu and "
                         "softmax (write its forward and backward to add another)")
    return name


class Conv2D(Layer):
    """keras.layers.Conv2D(filters, kernel_size, activation): conv2d_forward,
    then relu_forward if activation="relu". "valid" padding, stride 1."""
    params = ("kernel", "bias")

    def __init__(self, filters, kernel_size, activation=None, name=None):
        super().__init__(name)
        if isinstance(kernel_size, (tuple, list)):
            if len(set(kernel_size)) != 1:
                raise ValueError("the NumPy twin's Conv2D takes square kernels")
            kernel_size = kernel_size[0]
        self.filters, self.kernel_size = filters, kernel_size
        self.activation = _activation(activation)

    def build(self, input_shape, dtype):                 # (H, W, C) -> (H', W', F)
        H, W, C = input_shape
        K, F = self.kernel_size, self.filters
        self.kernel = np.zeros((K, K, C, F), dtype)       # Keras's layout
        self.bias = np.zeros(F, dtype)
        return (H - K + 1, W - K + 1, F)

    relu_after_pool = False     # True: the next layer, a max-pool, applies the ReLU

    def forward(self, x, training=False):
        out, self.cache = conv2d_forward(x, self.kernel, self.bias)
        if self.activation == "relu" and not self.relu_after_pool:
            # out is the product's fresh array, read by nothing else: ReLU
            # overwrites it instead of making a second one.
            out, self.relu_cache = relu_forward(out, in_place=True)
        return out

    def backward(self, dout):
        if self.activation == "relu" and not self.relu_after_pool:
            # dout is the next layer's fresh dx, read by nothing else.
            dout = relu_backward(dout, self.relu_cache, in_place=True)
        dx, self.dkernel, self.dbias = conv2d_backward(dout, self.cache,
                                                       need_dx=not self.first)
        return dx


class MaxPooling2D(Layer):
    """keras.layers.MaxPooling2D(pool_size): maxpool2d_forward.

    A speed-up that is also a lesson: ReLU and max-pooling commute. ReLU
    never changes which of two numbers is larger, so the largest of four
    ReLU outputs is the ReLU of the largest input:
        max(relu(a), relu(b), relu(c), relu(d)) = relu(max(a, b, c, d)).
    So when a Conv2D(activation="relu") comes right before this layer (as
    both do in this network), its ReLU runs here, after the pooling, on an
    output four times smaller (Sequential sets relu_after_conv). The
    gradients agree too: where the window's maximum is positive, both orders
    send the gradient to the first input holding it; where it is not, ReLU
    stops it either way. The same numbers, less work.
    """
    relu_after_conv = False

    def __init__(self, pool_size=2, name=None):
        super().__init__(name)
        if pool_size not in (2, (2, 2)):
            raise ValueError("the NumPy twin's fast max-pool is written for 2 x 2 windows")
        self.pool_size = 2

    def build(self, input_shape, dtype):                 # (H, W, C) -> (H // 2, W // 2, C)
        H, W, C = input_shape
        return (H // 2, W // 2, C)

    def forward(self, x, training=False):
        out, self.cache = maxpool2d_forward(x, self.pool_size)
        if self.relu_after_conv:                      # the conv layer's ReLU, moved here
            out, self.relu_cache = relu_forward(out, in_place=True)
        return out

    def backward(self, dout):
        if self.relu_after_conv:
            dout = relu_backward(dout, self.relu_cache, in_place=True)
        return maxpool2d_backward(dout, self.cache)


class Flatten(Layer):
    """keras.layers.Flatten(): flatten_forward."""

    def build(self, input_shape, dtype):                 # (H, W, C) -> (H*W*C,)
        return (int(np.prod(input_shape)),)

    def forward(self, x, training=False):
        out, self.shape = flatten_forward(x)
        return out

    def backward(self, dout):
        return flatten_backward(dout, self.shape)


class Dense(Layer):
    """keras.layers.Dense(units, activation): dense_forward, then relu_forward
    if activation="relu". "softmax" is applied by the loss (from the logits)
    and by predict."""
    params = ("kernel", "bias")

    def __init__(self, units, activation=None, name=None):
        super().__init__(name)
        self.units, self.activation = units, _activation(activation)

    def build(self, input_shape, dtype):                 # (D,) -> (U,)
        if len(input_shape) != 1:
            raise ValueError(f"Dense {self.name} gets input of shape {input_shape}: "
                             "put Flatten() before it (the twins' Dense takes vectors)")
        self.kernel = np.zeros((input_shape[0], self.units), dtype)   # (D, U)
        self.bias = np.zeros(self.units, dtype)
        return (self.units,)

    def forward(self, x, training=False):
        out, self.cache = dense_forward(x, self.kernel, self.bias)
        if self.activation == "relu":                 # in place, as in Conv2D
            out, self.relu_cache = relu_forward(out, in_place=True)
        return out

    def backward(self, dout):
        if self.activation == "relu":                 # in place, as in Conv2D
            dout = relu_backward(dout, self.relu_cache, in_place=True)
        dx, self.dkernel, self.dbias = dense_backward(dout, self.cache)
        return dx


class Dropout(Layer):
    """keras.layers.Dropout(rate): dropout_mask and dropout_forward at
    training time, nothing at inference."""

    def __init__(self, rate, name=None):
        super().__init__(name)
        self.rate = rate
        self.rng = None          # the model's dropout random stream, given at build
        self.batch_mask = None   # or a mask handed in for this batch (speedup.py)

    def build(self, input_shape, dtype):
        self.dtype = dtype
        return input_shape

    def draw_mask(self, shape):
        return dropout_mask(shape, self.rate, self.rng, self.dtype)

    def forward(self, x, training=False):
        mask, self.batch_mask = self.batch_mask, None  # a handed-in mask serves once
        if not training:
            self.mask = None
            return x                                   # identity at inference
        if mask is None:
            mask = self.draw_mask(x.shape)             # (N, U)
        out, self.mask = dropout_forward(x, mask)
        return out

    def backward(self, dout):
        return dout if self.mask is None else dropout_backward(dout, self.mask)


class BatchNormalization(Layer):
    """keras.layers.BatchNormalization(axis=-1, momentum=0.99, epsilon=1e-3):
    batchnorm_forward with the batch's statistics at training time, the
    moving ones at inference. Not in the default network; README "Change
    the network" shows how to add it to both twins."""
    params = ("gamma", "beta")                         # learned
    state = ("moving_mean", "moving_variance")         # kept, not learned

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, name=None):
        super().__init__(name)
        if axis != -1:
            raise ValueError("the NumPy twin normalises the last axis (the channels), "
                             "Keras's default axis=-1")
        self.momentum, self.epsilon = momentum, epsilon
        self.total = None          # sums over the whole batch when it is cut (speedup.py)

    def build(self, input_shape, dtype):
        C = input_shape[-1]
        self.gamma, self.beta = np.ones(C, dtype), np.zeros(C, dtype)
        self.moving_mean, self.moving_variance = np.zeros(C, dtype), np.ones(C, dtype)
        return input_shape

    def forward(self, x, training=False):
        if not training:       # the moving statistics, as tf.nn.batch_normalization uses them
            scale = self.gamma / np.sqrt(self.moving_variance + self.epsilon)
            return x * scale + (self.beta - self.moving_mean * scale)
        out, self.cache, mean, var = batchnorm_forward(x, self.gamma, self.beta,
                                                       self.epsilon, self.total)
        # Keras's update of the moving statistics, with the batch's variance
        # divided by M (new arrays, not in place: see speedup.py).
        m = self.momentum
        self.moving_mean = self.moving_mean * m + mean * (1.0 - m)
        self.moving_variance = self.moving_variance * m + var * (1.0 - m)
        return out

    def backward(self, dout):
        dx, self.dgamma, self.dbeta = batchnorm_backward(dout, self.cache)
        return dx


class Input:
    """keras.Input(shape): the shape of one example, without the batch axis."""

    def __init__(self, shape):
        self.shape = tuple(shape)


class Sequential:
    """keras.Sequential for the layers above: builds them in order, each on
    the shape the one before it gives, then sets the starting weights.

    seed: the starting weights (common.initial_weights) and the dropout masks.
    threads: how many threads speedup.py runs a batch's slices on (default:
    one per core).
    """

    def __init__(self, layers, seed=0, dtype="float32", threads=None):
        (self.input, *self.layers), self.dtype = layers, np.dtype(dtype)
        self.threads = threads or speedup.cores()
        rng = common.random_streams(seed)["dropout"]
        shape, taken = self.input.shape, set()
        for layer in self.layers:
            layer.name = layer.name or _unique_name(type(layer).__name__, taken)
            taken.add(layer.name)
            layer.input_shape = shape
            shape = layer.output_shape = layer.build(shape, self.dtype)
            if isinstance(layer, Dropout):
                layer.rng = rng
        self.layers[0].first = True
        for layer, after in zip(self.layers, self.layers[1:]):
            if isinstance(layer, Conv2D) and layer.activation == "relu" and \
                    isinstance(after, MaxPooling2D):
                layer.relu_after_pool = after.relu_after_conv = True   # see MaxPooling2D
        last = self.layers[-1]
        if not (isinstance(last, Dense) and last.activation == "softmax") or any(
                getattr(layer, "activation", None) == "softmax" for layer in self.layers[:-1]):
            raise ValueError("end the network with Dense(classes, activation=\"softmax\"), "
                             "and use softmax nowhere else: the loss is computed from "
                             "the last layer's logits, as in the Keras twin")
        self.set_weights(common.initial_weights(self.weight_shapes(), seed, self.dtype))

    def weight_shapes(self):
        """{"conv1/kernel": (3, 3, 1, 32), ...}, layer by layer in Keras's order."""
        return {f"{layer.name}/{part}": getattr(layer, part).shape
                for layer in self.layers for part in layer.params + layer.state}

    def set_weights(self, weights, source="The weights given"):
        """Take {"conv1/kernel": array, ...} in Keras's layouts, as is."""
        common.check_weights(weights, self.weight_shapes(), source)
        for layer in self.layers:
            for part in layer.params + layer.state:
                setattr(layer, part, np.array(weights[f"{layer.name}/{part}"], self.dtype))

    def get_weights(self):
        return {f"{layer.name}/{part}": getattr(layer, part).copy()
                for layer in self.layers for part in layer.params + layer.state}

    def trainable_weights(self):
        """[(key, weight, its gradient), ...] for the optimizer."""
        return [(f"{layer.name}/{part}", getattr(layer, part), getattr(layer, "d" + part))
                for layer in self.layers for part in layer.params]

    def count_params(self):
        return sum(int(np.prod(shape)) for shape in self.weight_shapes().values())

    def summary(self):
        """The same table as Keras's model.summary()."""
        rows = [("Layer (type)", "Output Shape", "Param #")]
        for layer in self.layers:
            params = sum(getattr(layer, part).size for part in layer.params + layer.state)
            rows.append((f"{layer.name} ({type(layer).__name__})",
                         str((None,) + layer.output_shape), f"{params:,}"))
        widths = (33, 24, 15)
        print('Model: "sequential"')
        print("┏" + "┳".join("━" * w for w in widths) + "┓")
        for i, (a, b, c) in enumerate(rows):
            bar = "┃" if i == 0 else "│"
            print(f"{bar} {a:<{widths[0] - 2}} {bar} {b:<{widths[1] - 2}} "
                  f"{bar} {c:>{widths[2] - 2}} {bar}")
            left, mid, right, dash = ("┡", "╇", "┩", "━") if i == 0 else ("├", "┼", "┤", "─")
            if i < len(rows) - 1:
                print(left + mid.join(dash * w for w in widths) + right)
        print("└" + "┴".join("─" * w for w in widths) + "┘")
        learned = sum(getattr(layer, part).size
                      for layer in self.layers for part in layer.params)
        total = self.count_params()
        for label, n in (("Total", total), ("Trainable", learned),
                         ("Non-trainable", total - learned)):
            print(f" {label} params: {n:,} ({_memory(n * self.dtype.itemsize)})")


def _unique_name(class_name, taken):
    """Keras's default layer name: the class name in snake_case (Conv2D ->
    conv2d, BatchNormalization -> batch_normalization), then _1, _2, ..."""
    base = "".join("_" + c.lower() if c.isupper() and i and not class_name[i - 1].isupper()
                   else c.lower() for i, c in enumerate(class_name))
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _memory(size):
    """Bytes as Keras's summary writes them: 879.04 KB."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.2f} {unit}"
        size /= 1024


def build_model(dropout=0.5, seed=0, dtype="float32"):
    """The twins' network, declared once. Compare mnist_cnn_keras.build_model:
    the same layers, in the same words. Edit both the same way to change the
    network (README: "Change the network"): every shape follows from these
    lines, and model.summary() prints them."""
    return Sequential([
        Input(shape=(28, 28, 1)),
        Conv2D(32, 3, activation="relu", name="conv1"),
        MaxPooling2D(2, name="pool1"),
        Conv2D(64, 3, activation="relu", name="conv2"),
        MaxPooling2D(2, name="pool2"),
        Flatten(name="flatten"),
        Dense(128, activation="relu", name="dense1"),
        Dropout(dropout, name="dropout"),
        Dense(10, activation="softmax", name="dense2"),
    ], seed=seed, dtype=dtype)


# =============================================================================
# Train: forward, loss, backward, Adam
# =============================================================================

def forward(layers, x, training=False):
    """Run x through the layers in order: (N, 28, 28, 1) -> logits (N, 10)."""
    out = x
    for layer in layers:
        out = layer.forward(out, training)
    return out


def loss_and_grads(layers, x, y, batch_size):
    """The whole of backpropagation: forward, loss, backward.

    x: (N, 28, 28, 1), y: (N,)  ->  the mean loss and the probs (N, 10); each
    layer keeps the gradients of its weights (dkernel, dbias). batch_size is
    the N the loss is averaged over: len(x), unless x is one slice of a
    bigger batch (speedup.py).
    """
    logits = forward(layers, x, training=True)                     # (N, 10)
    loss, probs = softmax_cross_entropy(logits, y)
    dout = softmax_cross_entropy_backward(probs, y, batch_size)    # dlogits (N, 10)
    for layer in reversed(layers):
        # The chain rule, one layer at a time from the loss back to the
        # input: dout becomes dLoss/d(this layer's input), and the layer
        # keeps dLoss/d(its weights).
        dout = layer.backward(dout)
    return loss, probs


def train_step(model, optimizer, x, y):
    """One step of training on one batch; returns the batch's (loss, probs)."""
    # --- The speed-up, in this one place -----------------------------------
    # On one core this line is loss_and_grads(model.layers, x, y, len(x)).
    # train_in_slices cuts the batch into slices, runs it on them with one
    # thread per core at the same time, and adds the slices' gradients up:
    # the same numbers (up to rounding), sooner.
    loss, probs = speedup.train_in_slices(model, loss_and_grads, x, y)
    # ---------------------------------------------------------------------------
    optimizer.update(model.trainable_weights())
    return loss, probs


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
        # Exercise 15. Hint: running means m, v; bias correction in alpha; epsilon added to sqrt(v).
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


def train_epoch(model, optimizer, x, y, args, epoch, rng):
    """One pass over (x, y) in the batch order shared with the Keras twin.

    Returns (bar, loss, accuracy): the epoch's progress bar, for train() to
    close with the validation figures, and the running loss and accuracy,
    averaged over examples as Keras reports them. A loss that stops being a
    number ends training with a message (as Keras's TerminateOnNaN would).
    """
    bar = common.ProgressBar(-(-len(x) // args.batch_size))
    loss_sum = correct = seen = 0
    for step, (xb, yb) in enumerate(
            data_utils.iterate_minibatches(x, y, args.batch_size, rng), start=1):
        loss, probs = train_step(model, optimizer, xb, yb)
        if not np.isfinite(loss):
            raise common.diverged(epoch, step, f"the loss became {loss}", args.lr)
        loss_sum += float(loss) * len(yb)
        correct += int((probs.argmax(axis=1) == yb).sum())
        seen += len(yb)
        bar.update(step, {"accuracy": correct / seen, "loss": loss_sum / seen})
    return bar, loss_sum / seen, correct / seen


def train(model, train_set, val_set, args):
    """args.epochs epochs of Adam, validating after each, as model.fit does.
    Returns the history (per-epoch metrics) and each epoch's seconds.

    Training that blows up (a learning rate far too large) stops with one
    message: the loss is checked after every step, the validation loss and
    the weights after every epoch. NumPy's own overflow warnings are
    silenced here, since that message says more.
    """
    (x, y), rng = train_set, common.random_streams(args.seed)["batches"]
    speedup.keep_freed_memory()
    optimizer = Adam(args.lr)
    history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    epoch_seconds = []
    for epoch in range(1, args.epochs + 1):
        print(f"Epoch {epoch}/{args.epochs}", flush=True)
        start = time.perf_counter()
        with np.errstate(over="ignore", invalid="ignore"):
            bar, loss, acc = train_epoch(model, optimizer, x, y, args, epoch, rng)
            val_loss, val_acc, _ = evaluate(model, *val_set)
        epoch_seconds.append(time.perf_counter() - start)
        for key, value in zip(history, (loss, acc, val_loss, val_acc)):
            history[key].append(value)
        bar.close({"accuracy": acc, "loss": loss,
                   "val_accuracy": val_acc, "val_loss": val_loss})
        problem = common.not_finite(history, model.get_weights())
        if problem:
            raise common.diverged(epoch, None, problem, args.lr)
    return history, epoch_seconds


# =============================================================================
# Evaluate: the network at inference (no dropout), a batch at a time
# =============================================================================

def logits(model, x):
    """forward(model.layers, x): the logits (N, 10), in slices, on one thread per core."""
    return speedup.forward_in_slices(model, forward, x.astype(model.dtype, copy=False))


def predict(model, x, batch_size=256):
    """Class probabilities (N, 10), a batch at a time (bounded memory)."""
    return np.concatenate([softmax(logits(model, x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])


def evaluate(model, x, y, batch_size=256):
    """(mean loss, accuracy, probs) over all of x, a batch at a time."""
    loss_sum, probs = 0.0, []
    for i in range(0, len(x), batch_size):
        loss, p = softmax_cross_entropy(logits(model, x[i:i + batch_size]),
                                        y[i:i + batch_size])
        loss_sum += float(loss) * len(p)
        probs.append(p)
    probs = np.concatenate(probs)
    return loss_sum / len(x), float((probs.argmax(axis=1) == y).mean()), probs


def feature_maps(model, image):
    """What each conv and pool layer (each layer with an (H, W, C) output)
    makes of one image, for the figure: [(layer name, (H, W, C)), ...]."""
    out, maps = image[None].astype(model.dtype), []
    for layer in model.layers:
        out = layer.forward(out)
        if len(layer.output_shape) == 3:
            shown = out[0]
            if getattr(layer, "relu_after_pool", False):  # its ReLU runs in the pool layer
                shown = np.maximum(shown, 0)
            maps.append((layer.name, shown))
    return maps


# =============================================================================
# main: the same steps, files and printed lines as the Keras twin
# =============================================================================

def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    out = common.prepare_out_dir(args.out)
    spec = data_utils.DATASETS[args.dataset]
    title = f"NumPy twin, {spec['title']}"

    # Model: the shared starting weights for the seed, or a weights file
    # written by either twin (checked against this network before any work).
    model = build_model(seed=args.seed)
    if args.load_weights:
        model.set_weights(common.load_weights(args.load_weights, model.weight_shapes()))
        if args.predict:                          # only classify the user's images
            return own_digits.report(args.predict, lambda x: predict(model, x),
                                     spec["classes"], out, "numpy", title)

    # Data: the same arrays, split and batches as the Keras twin.
    train_set, val_set, (x_test, y_test) = common.load_splits(args)
    model.summary()

    # Train
    history, epoch_seconds = {}, []
    if not args.eval_only:
        print(f"Training on {len(train_set[0]):,} {spec['title']} images, "
              f"validating on {len(val_set[0]):,}.")
        history, epoch_seconds = train(model, train_set, val_set, args)

    # Evaluate
    test_loss, test_accuracy, probs = evaluate(model, x_test, y_test)

    # Report: the same files and the same last line as the Keras twin.
    report = common.make_report("numpy", args, model.count_params(), len(train_set[0]),
                                test_accuracy, test_loss, epoch_seconds, history)
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
                                     feature_maps(model, x_test[0]))
    print("Wrote " + ", ".join(str(p) for p in written))
    print(common.summary_line(report))
    if args.predict:
        return own_digits.report(args.predict, lambda x: predict(model, x),
                                 spec["classes"], out, "numpy", title)
    return 0


if __name__ == "__main__":
    common.run(main)
