"""The same small convolutional network, from scratch in NumPy: the twin.

    python mnist_cnn_numpy.py                 # train 12 epochs (README: Results)
    python mnist_cnn_numpy.py --help          # the same flags as the Keras twin

Every layer of mnist_cnn_keras.py, rebuilt as arithmetic: a forward pass, a
backward pass (the chain rule, one layer at a time), and Adam, with the same
flags, starting weights, batches and report as the Keras twin, and no
TensorFlow. Read mnist_cnn_keras.py first for *what* the network is; this
file shows *how* each of its lines is computed, top to bottom:
1. The math, in function pairs `x_forward(...) -> out, cache` and
   `x_backward(dout, cache) -> gradients`, in the order of the exercises;
   below each pair, a slow loop version (the "algorithmic reference": the
   definition written out plainly, which the checks compare the pair with).
2. The layers, with Keras's names and arguments, which hold the weights and
   call the math; and build_model, the network declared once.
3. Training: `loss_and_grads` (forward, loss, backward) and `train_step`
   (that, then Adam) are the whole algorithm, on one screen.

This file trains by itself. main switches on the machine module beside it,
the second lesson ("how frameworks get fast"): faster drop-ins for some of
these functions, each checked equal to the one it replaces. To train with
this file's code alone: MNIST_TWINS_FAST=0 python mnist_cnn_numpy.py

Shape legend:
    N  batch size            H, W  height and width of an image or feature map
    C  input channels        F     filters (output channels) of a conv layer
    K  kernel size (3)       H', W'  output height and width
    D  input features of a dense layer, U its units (outputs)
A name starting with `d` is a gradient of the loss: dx = dLoss/dx.
"""

# =============================================================================
# Setup
# =============================================================================
import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import data_utils
from helpers import common


# =============================================================================
# Model: the math, one function pair per layer
# =============================================================================

# --- Dense -------------------------------------------------------------------

def dense_forward(x, kernel, bias):
    """out = x @ kernel + bias: each unit sums its inputs, weighted.
    x: (N, D)   kernel: (D, U)   bias: (U,)
    Returns out (N, U) and the cache (x, kernel) that dense_backward needs."""
    # Exercise. Hint: one matrix product, then the bias added to every row; return (out, cache).
    return x @ kernel + bias, (x, kernel)                     # (N, U)

def dense_backward(dout, cache):
    """dout: (N, U), cache (x, kernel) -> dx: (N, D), dkernel: (D, U), dbias: (U,).
    out[n, u] = sum_d x[n, d] * kernel[d, u] + bias[u], so
    dkernel = x.T @ dout, dx = dout @ kernel.T, dbias = sum over the batch."""
    # Exercise. Hint: one expression per gradient; check each shape against the docstring.
    x, kernel = cache
    return dout @ kernel.T, x.T @ dout, dout.sum(axis=0)

def dense_naive(x, kernel, bias, dout):
    """Algorithmic reference for the pair: out, and dx, dkernel, dbias for dout."""
    out, dx, dkernel = np.zeros((len(x), len(bias))), np.zeros_like(x), np.zeros_like(kernel)
    for n in range(x.shape[0]):
        for u in range(kernel.shape[1]):
            out[n, u] = bias[u]
            for d in range(x.shape[1]):
                out[n, u] += x[n, d] * kernel[d, u]
                dx[n, d] += dout[n, u] * kernel[d, u]
                dkernel[d, u] += dout[n, u] * x[n, d]
    return out, dx, dkernel, dout.sum(axis=0)


# --- ReLU --------------------------------------------------------------------

def relu_forward(z):
    """out = max(z, 0), elementwise, any shape; the cache is out itself
    (out > 0 exactly where z > 0). Short enough to be its own reference."""
    out = np.maximum(z, 0)
    return out, out

def relu_backward(dout, out):
    """The slope of max(z, 0) is 1 where z > 0 and 0 elsewhere: the gradient
    passes where the unit was active and stops where it was not."""
    # Exercise. Hint: the gradient passes where z was positive, which is where out > 0.
    return dout * (out > 0)


# --- Softmax and cross-entropy ------------------------------------------------

def softmax(logits):
    """p[n, k] = exp(z[n, k]) / sum_j exp(z[n, j]). Subtracting each row's
    maximum first changes nothing (it cancels in the ratio) but keeps exp()
    from overflowing: the largest term becomes exp(0) = 1."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))    # (N, 10)
    return e / e.sum(axis=1, keepdims=True)

def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels.
    logits: (N, 10)   labels: (N,)   ->   loss: scalar, probs: (N, 10)
    loss = mean_n [ log(sum_k exp(z[n, k])) - z[n, labels[n]] ], from the
    logits, as Keras computes it when a Dense layer ends in softmax."""
    # Exercise. Hint: subtract each row's max before exp(); log of the sum minus the true logit.
    z = logits - logits.max(axis=1, keepdims=True)            # (N, 10)
    log_sum = np.log(np.exp(z).sum(axis=1))                   # (N,)
    loss = np.mean(log_sum - z[np.arange(len(z)), labels])
    return loss, np.exp(z - log_sum[:, None])                 # probs (N, 10)

def softmax_cross_entropy_backward(probs, labels):
    """dlogits = (p - y) / N, y the one-hot labels: (N, 10) -> (N, 10).
    For one example, loss = -z_y + log sum_k exp(z_k), so dloss/dz_k =
    -[k == y] + exp(z_k) / sum_j exp(z_j) = p_k - y_k: the softmax's own
    Jacobian cancels against the log. The 1/N is from the batch's mean."""
    # Exercise. Hint: p - y with y one-hot, then divide by N.
    dlogits = probs.copy()                                    # (N, 10)
    dlogits[np.arange(len(labels)), labels] -= 1
    return dlogits / len(labels)

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


# --- Dropout -----------------------------------------------------------------

def dropout_mask(shape, rate, rng, dtype):
    """Inverted dropout, as Keras does it: each unit is kept with probability
    1 - rate and scaled by 1 / (1 - rate), so its expected value stays the
    same and inference needs no rescaling. Returns the mask (shape): 0 for
    a dropped unit, 1 / (1 - rate) for a kept one."""
    # Exercise. Hint: rng.random(shape) >= rate keeps a unit with probability 1 - rate.
    scale = np.asarray(1.0 / (1.0 - rate), dtype=dtype)
    return (rng.random(shape, dtype=dtype) >= rate) * scale    # (N, U)

def dropout_forward(x, mask):
    """out = x * mask; the cache is the mask. Its own reference."""
    return x * mask, mask

def dropout_backward(dout, mask):
    """out = x * mask, so dx = dout * mask: dropped units pass no gradient."""
    # Exercise. Hint: the forward pass multiplied by the mask.
    return dout * mask


# --- Flatten -----------------------------------------------------------------

def flatten_forward(x):
    """(N, H, W, C) -> out (N, H*W*C) in channels-last order, as Keras
    flattens; the cache is x's shape, for flatten_backward."""
    # Exercise. Hint: one reshape, in (H, W, C) order; return the shape for the backward pass.
    return x.reshape(len(x), -1), x.shape                     # (N, H*W*C)

def flatten_backward(dout, shape):
    return dout.reshape(shape)                                # (N, H, W, C)


# --- MaxPooling2D --------------------------------------------------------------

def maxpool2d_forward(x, pool=2):
    """Max over each pool x pool window, windows side by side (stride pool).
    x: (N, H, W, C)  ->  out: (N, H', W', C),  H' = H // pool, W' = W // pool
    (an odd last row or column is dropped, as Keras's "valid" padding does).
    The trick: one reshape gives each window's numbers an axis of their own,
    in reading order (0 1 / 2 3). The cache keeps only *which* one won
    (argmax: the first maximum if several are equal), and x's shape."""
    # Exercise. Hint: reshape so each window's numbers lie on one axis; keep the argmax.
    N, H, W, C = x.shape
    Ho, Wo = H // pool, W // pool
    windows = x[:, :Ho * pool, :Wo * pool].reshape(N, Ho, pool, Wo, pool, C)
    windows = windows.transpose(0, 1, 3, 5, 2, 4).reshape(N, Ho, Wo, C, pool * pool)
    winner = windows.argmax(axis=-1)                          # (N, H', W', C)
    return windows.max(axis=-1), (x.shape, winner, pool)      # (N, H', W', C)

def maxpool2d_backward(dout, cache):
    """dout: (N, H', W', C) -> dx: (N, H, W, C). The max is a switch: only
    the winning input affects the output, so it gets all of dout and the
    window's other inputs get 0. With a tie (common: ReLU makes many zeros)
    the *first* maximum in reading order gets it, as in TensorFlow;
    splitting it among the tied inputs would not be Keras's gradient."""
    # Exercise. Hint: each output's gradient goes to its window's winner only.
    x_shape, winner, pool = cache
    N, Ho, Wo, C = dout.shape
    dwindows = np.zeros((N, Ho, Wo, C, pool * pool), dout.dtype)
    np.put_along_axis(dwindows, winner[..., None], dout[..., None], axis=-1)
    dwindows = dwindows.reshape(N, Ho, Wo, C, pool, pool).transpose(0, 1, 4, 2, 5, 3)
    dx = np.zeros(x_shape, dout.dtype)                        # a dropped row/column gets 0
    dx[:, :Ho * pool, :Wo * pool] = dwindows.reshape(N, Ho * pool, Wo * pool, C)
    return dx

def maxpool2d_naive(x, dout, pool=2):
    """Algorithmic reference for the pair: out, and dx for dout, one window
    at a time; the first maximum of each window (row-major) gets the gradient."""
    N, H, W, C = x.shape
    out, dx = np.zeros((N, H // pool, W // pool, C), x.dtype), np.zeros_like(x)
    for n in range(N):
        for i in range(H // pool):
            for j in range(W // pool):
                for c in range(C):
                    window = x[n, i * pool:(i + 1) * pool, j * pool:(j + 1) * pool, c]
                    out[n, i, j, c] = window.max()
                    a, b = divmod(int(np.argmax(window)), pool)
                    dx[n, i * pool + a, j * pool + b, c] += dout[n, i, j, c]
    return out, dx


# --- Conv2D ------------------------------------------------------------------

def im2col(x, K):
    """Every K x K window of x as one row of a matrix.
    x: (N, H, W, C)  ->  cols: (N*H'*W', K*K*C),  H' = H - K + 1, W' = W - K + 1
    Row (n, i, j) holds x[n, i:i+K, j:j+K, :] in (a, b, c) order, the order
    of the kernel's own numbers: one row times the kernel as a (K*K*C, F)
    matrix is that window's dot product with every filter."""
    # Exercise. Hint: one row per window, x[n, i:i+K, j:j+K, :] in (a, b, c) order.
    N, H, W, C = x.shape
    windows = sliding_window_view(x, (K, K), axis=(1, 2))    # (N, H', W', C, K, K), no copy
    windows = windows.transpose(0, 1, 2, 4, 5, 3)             # (N, H', W', K, K, C)
    return windows.reshape(N * (H - K + 1) * (W - K + 1), K * K * C)   # the copy

def im2col_naive(x, K):
    """Algorithmic reference for im2col: one window at a time."""
    N, H, W, C = x.shape
    rows = [x[n, i:i + K, j:j + K, :].reshape(-1)
            for n in range(N) for i in range(H - K + 1) for j in range(W - K + 1)]
    return np.array(rows, dtype=x.dtype)

def col2im(dcols, x_shape, K):
    """The way back, for gradients: dcols (N*H'*W', K*K*C) -> dx (x_shape).
    Each row of dcols belongs to one window of x, and a pixel sat in up to
    K*K windows, so it collects (adds) the gradient of each; one kernel
    offset (a, b) at a time, for all windows at once. col2im is im2col's
    transpose: sum(im2col(x) * dcols) = sum(x * col2im(dcols))."""
    # Exercise. Hint: the window of row (n, i, j) starts at x[n, i, j]; add, do not assign.
    N, H, W, C = x_shape
    Ho, Wo = H - K + 1, W - K + 1
    dwindows = dcols.reshape(N, Ho, Wo, K, K, C)
    dx = np.zeros(x_shape, dcols.dtype)                       # (N, H, W, C)
    for a in range(K):
        for b in range(K):
            dx[:, a:a + Ho, b:b + Wo, :] += dwindows[:, :, :, a, b, :]
    return dx

def conv2d_forward(x, kernel, bias):
    """Valid 2-D convolution (Keras's "cross-correlation", no kernel flip).
    x: (N, H, W, C)   kernel: (K, K, C, F)   bias: (F,)   ->   out: (N, H', W', F)
    out[n, i, j, f] = bias[f] + sum_{a, b, c} x[n, i+a, j+b, c] * kernel[a, b, c, f]
    The trick (im2col): copy every K x K x C window of x into one row of a
    matrix; then the whole convolution is one matrix product, which BLAS
    computes at full speed. The cache: x's shape, cols and the kernel."""
    # Exercise. Hint: im2col, then one product with the kernel as a (K*K*C, F) matrix.
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    cols = im2col(x, K)                                       # (N*H'*W', K*K*C)
    out = cols @ kernel.reshape(K * K * C, F) + bias          # (N*H'*W', F)
    return out.reshape(N, H - K + 1, W - K + 1, F), (x.shape, cols, kernel)

def conv2d_backward(dout, cache):
    """dout: (N, H', W', F) -> dx: (N, H, W, C), dkernel: (K, K, C, F), dbias: (F,).
    In im2col form the layer is out = cols @ kernel2d + bias, so the chain
    rule gives dkernel2d = cols.T @ dout2d (each weight saw every window),
    dcols = dout2d @ kernel2d.T (each window's share, folded back onto the
    image by col2im), and dbias = the sum of dout over N, H' and W'."""
    # Exercise. Hint: the chain rule through cols @ kernel2d, then col2im for dx.
    x_shape, cols, kernel = cache
    K, _, C, F = kernel.shape
    dout2d = dout.reshape(-1, F)                              # (N*H'*W', F)
    dkernel = (cols.T @ dout2d).reshape(K, K, C, F)
    dcols = dout2d @ kernel.reshape(K * K * C, F).T           # (N*H'*W', K*K*C)
    return col2im(dcols, x_shape, K), dkernel, dout2d.sum(axis=0)

def conv2d_naive(x, kernel, bias, dout):
    """Algorithmic reference for the pair: the definition, in loops. Each
    output is a window's dot product with a filter; its gradient g flows
    back to that window (through the filter) and to the filter (through the
    window). Returns out, and dx, dkernel, dbias for dout."""
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    out, dx, dkernel = np.zeros(dout.shape), np.zeros_like(x), np.zeros_like(kernel)
    for n in range(N):
        for i in range(H - K + 1):
            for j in range(W - K + 1):
                for f in range(F):
                    window, g = x[n, i:i + K, j:j + K, :], dout[n, i, j, f]   # (K, K, C)
                    out[n, i, j, f] = np.sum(window * kernel[:, :, :, f]) + bias[f]
                    dx[n, i:i + K, j:j + K, :] += g * kernel[:, :, :, f]
                    dkernel[:, :, :, f] += g * window
    return out, dx, dkernel, dout.sum(axis=(0, 1, 2))


# =============================================================================
# Model: Keras-named layers that hold weights and call the functions above
# =============================================================================

class Layer:
    """What every layer has. Like Keras's, a layer takes no input sizes: it
    learns its input's shape when the model is built (build) and makes its
    weights to fit. `params` names its learned weights in Keras's order;
    their gradients are "d" + the name (dkernel, dbias)."""
    params = ()          # learned weights: ("kernel", "bias")
    state = ()           # weights kept but not learned (none in this network)

    def __init__(self, name=None, activation=None):
        if activation not in (None, "relu", "softmax"):
            raise ValueError(f"activation={activation!r}: the NumPy twin has relu and "
                             "softmax (write its forward and backward to add another)")
        self.name, self.activation = name, activation

    def build(self, input_shape, dtype):
        """Make the weights for this input shape; return the output shape."""
        return input_shape

    def activate(self, out):
        """ReLU after the layer's own arithmetic, for activation="relu"
        ("softmax" is applied by the loss, from the logits, and by predict)."""
        if self.activation == "relu":
            out, self.relu_cache = relu_forward(out)
        return out

    def activate_backward(self, dout):
        return relu_backward(dout, self.relu_cache) if self.activation == "relu" else dout


class Conv2D(Layer):
    """keras.layers.Conv2D(filters, kernel_size, activation): conv2d_forward,
    then relu_forward for activation="relu". Square kernels, stride 1, "valid"."""
    params = ("kernel", "bias")

    def __init__(self, filters, kernel_size, activation=None, name=None):
        super().__init__(name, activation)
        self.filters, self.kernel_size = filters, kernel_size

    def build(self, input_shape, dtype):                 # (H, W, C) -> (H', W', F)
        H, W, C = input_shape
        K, F = self.kernel_size, self.filters
        self.kernel, self.bias = np.zeros((K, K, C, F), dtype), np.zeros(F, dtype)
        return (H - K + 1, W - K + 1, F)

    def forward(self, x, training=False):
        out, self.cache = conv2d_forward(x, self.kernel, self.bias)
        return self.activate(out)

    def backward(self, dout):
        dx, self.dkernel, self.dbias = conv2d_backward(self.activate_backward(dout),
                                                       self.cache)
        return dx


class MaxPooling2D(Layer):
    """keras.layers.MaxPooling2D(pool_size): maxpool2d_forward; square
    windows, side by side (Keras's default strides)."""

    def __init__(self, pool_size=2, name=None):
        super().__init__(name)
        self.pool_size = pool_size

    def build(self, input_shape, dtype):                 # (H, W, C) -> (H // p, W // p, C)
        H, W, C = input_shape
        return (H // self.pool_size, W // self.pool_size, C)

    def forward(self, x, training=False):
        out, self.cache = maxpool2d_forward(x, self.pool_size)
        return out

    def backward(self, dout):
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
    """keras.layers.Dense(units, activation): dense_forward, then
    relu_forward for activation="relu"."""
    params = ("kernel", "bias")

    def __init__(self, units, activation=None, name=None):
        super().__init__(name, activation)
        self.units = units

    def build(self, input_shape, dtype):                 # (D,) -> (U,)
        if len(input_shape) != 1:
            raise ValueError(f"Dense {self.name} gets input of shape {input_shape}: "
                             "put Flatten() before it (the twins' Dense takes vectors)")
        self.kernel = np.zeros((input_shape[0], self.units), dtype)   # (D, U)
        self.bias = np.zeros(self.units, dtype)
        return (self.units,)

    def forward(self, x, training=False):
        out, self.cache = dense_forward(x, self.kernel, self.bias)
        return self.activate(out)

    def backward(self, dout):
        dx, self.dkernel, self.dbias = dense_backward(self.activate_backward(dout),
                                                      self.cache)
        return dx


class Dropout(Layer):
    """keras.layers.Dropout(rate): dropout_mask and dropout_forward in
    training, nothing at inference. The masks are drawn from the model's
    dropout random stream, which Sequential hands every layer as `rng`."""

    def __init__(self, rate, name=None):
        super().__init__(name)
        self.rate = rate

    def forward(self, x, training=False):
        self.mask = dropout_mask(x.shape, self.rate, self.rng, x.dtype) if training else None
        return dropout_forward(x, self.mask)[0] if training else x

    def backward(self, dout):
        return dout if self.mask is None else dropout_backward(dout, self.mask)


class Input:
    """keras.Input(shape): the shape of one example, without the batch axis."""

    def __init__(self, shape):
        self.shape = tuple(shape)


class Sequential(common.WeightsOfLayers):
    """keras.Sequential for the layers above: builds them in order, each on
    the shape the one before it gives, then sets the starting weights
    (common.initial_weights: the Keras twin's numbers for the same seed).
    The weights file's bookkeeping (weight_shapes, get_weights,
    set_weights, count_params, summary) comes from common.WeightsOfLayers."""

    def __init__(self, layers, seed=0, dtype="float32"):
        (self.input, *self.layers), self.dtype = layers, np.dtype(dtype)
        rng, shape, taken = common.random_streams(seed)["dropout"], self.input.shape, set()
        for layer in self.layers:
            layer.name = layer.name or common.default_layer_name(type(layer).__name__, taken)
            taken.add(layer.name)
            layer.input_shape, layer.rng = shape, rng
            shape = layer.output_shape = layer.build(shape, self.dtype)
        if self.layers[-1].activation != "softmax" or any(
                layer.activation == "softmax" for layer in self.layers[:-1]):
            raise ValueError("end the network with Dense(classes, activation=\"softmax\"), "
                             "and use softmax nowhere else: the loss is computed from "
                             "the last layer's logits, as in the Keras twin")
        self.set_weights(common.initial_weights(self.weight_shapes(), seed, self.dtype))

    def trainable_weights(self):
        """[(key, weight, its gradient), ...] for the optimizer: "conv1/kernel"
        is conv1.kernel, whose gradient is conv1.dkernel."""
        return [(f"{layer.name}/{part}", getattr(layer, part), getattr(layer, "d" + part))
                for layer in self.layers for part in layer.params]


def build_model(dropout=0.5, seed=0, dtype="float32"):
    """The twins' network, declared once. Compare mnist_cnn_keras.build_model:
    the same layers, in the same words. Edit both the same way to change the
    network (docs/change.md: "Change the network"): every shape follows from these
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


def loss_and_grads(layers, x, y):
    """The whole of backpropagation: forward, loss, backward. x: (N, 28, 28,
    1), y: (N,) -> the mean loss and the probs (N, 10); each layer keeps the
    gradients of its weights (dkernel, dbias)."""
    logits = forward(layers, x, training=True)                     # (N, 10)
    loss, probs = softmax_cross_entropy(logits, y)
    dout = softmax_cross_entropy_backward(probs, y)                # dlogits (N, 10)
    for layer in reversed(layers):
        # The chain rule, a layer at a time from the loss back to the input:
        # dout becomes dLoss/d(layer's input); the layer keeps dLoss/d(its weights).
        dout = layer.backward(dout)
    return loss, probs


def train_step(model, optimizer, x, y):
    """One step of training on one batch; returns the batch's (loss, probs)."""
    loss, probs = loss_and_grads(model.layers, x, y)
    optimizer.update(model.trainable_weights())
    return loss, probs


class Adam:
    """Adam with Keras's defaults and Keras's exact update rule. For each
    weight w with gradient g, at step t = 1, 2, ...:
        m = m + (g - m) * (1 - beta_1)            running mean of g
        v = v + (g*g - v) * (1 - beta_2)          running mean of g^2
        alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
        w = w - m * alpha / (sqrt(v) + epsilon)
    The bias correction (the beta^t terms, which undo m and v starting at 0)
    is folded into alpha, and epsilon is added to sqrt(v), both where Keras
    puts them; as in Keras, lr and the betas pass through float32 first
    (float32(0.9) = 0.899999976...), which decides agreement in float64."""

    def __init__(self, lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.lr, self.beta_1, self.beta_2, self.epsilon = lr, beta_1, beta_2, epsilon
        self.iterations, self.m, self.v = 0, {}, {}

    def update(self, params):
        """params: [(key, weight array, gradient array), ...]; the weights
        change in place, and nothing is returned."""
        # Exercise. Hint: running means m, v; bias correction in alpha; epsilon added to sqrt(v).
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


def train(model, train_set, val_set, args):
    """model.fit, written out: each epoch, one train_step per batch in the
    batch order shared with the Keras twin, then a validation pass. Returns
    the history (per-epoch metrics) and each epoch's seconds. The log keeps
    the books: progress bar, metrics, times, and one message if training
    blows up (a learning rate far too large)."""
    (x, y), rng = train_set, common.random_streams(args.seed)["batches"]
    optimizer, log = Adam(args.lr), common.TrainingLog(args, len(x))
    for epoch in log.epochs():                                # "Epoch 1/12", ...
        for xb, yb in data_utils.iterate_minibatches(x, y, args.batch_size, rng):
            loss, probs = train_step(model, optimizer, xb, yb)
            log.batch(loss, probs, yb)
        val_loss, val_accuracy, _ = evaluate(model, *val_set)
        log.end_epoch(val_loss, val_accuracy, model.get_weights())
    return log.history, log.epoch_seconds


# =============================================================================
# Evaluate: the network at inference (no dropout), a batch at a time
# =============================================================================

def logits(model, x):
    """The logits (N, 10) of a batch x at inference: forward, dropout off."""
    return forward(model.layers, x.astype(model.dtype, copy=False))


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
    """[(layer name, its output (H, W, C)), ...] for one image, each layer
    with an image-shaped output (conv and pool): for the figures."""
    out, maps = image[None].astype(model.dtype), []
    for layer in model.layers:
        out = layer.forward(out)
        if len(layer.output_shape) == 3:
            maps.append((layer.name, out[0]))
    return maps


# =============================================================================
# main: the steps, files and printed lines both twins share (common.main)
# =============================================================================

TWIN = common.Twin(
    name="numpy", title="NumPy twin", description=__doc__.splitlines()[0],
    build=lambda args: build_model(seed=args.seed),
    weight_shapes=Sequential.weight_shapes, set_weights=Sequential.set_weights,
    get_weights=Sequential.get_weights, train=train, evaluate=evaluate, predict=predict,
    first_kernel=lambda model: model.layers[0].kernel, feature_maps=feature_maps,
    layers=lambda model: [(layer.name, type(layer).__name__, layer.output_shape)
                          for layer in model.layers])


def main(argv=None):
    import speedup                            # the fast path: drop-ins for functions above
    with speedup.switched_on(sys.modules[__name__]):
        return common.main(TWIN, argv)


if __name__ == "__main__":
    common.run(main)
