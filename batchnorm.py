"""Batch normalization for the NumPy twin: a layer a learner adds.

The default network has no batch normalization; this file shows what
adding a layer to the NumPy twin takes: its math as a function pair with a
loop reference below it, and a Keras-named class that holds its weights.
To add it after conv1 and after dense1 (docs/change.md: "Adding batch
normalization"), in mnist_cnn_numpy.py import it,

    from batchnorm import BatchNormalization

and add `BatchNormalization(name="bn1"),` after the conv1 line and
`BatchNormalization(name="bn2"),` after the dense1 line of build_model;
in mnist_cnn_keras.py add `layers.BatchNormalization(name="bn1"),` and
`layers.BatchNormalization(name="bn2"),` at the same places.

Shapes as in mnist_cnn_numpy.py: N batch, H, W height and width, C channels.
"""

import numpy as np


def batchnorm_forward(x, gamma, beta, epsilon=1e-3):
    """Normalise each channel (the last axis) with the batch's statistics.

    x: (N, D) after a dense layer, or (N, H, W, C) after a conv layer (then
    each channel is normalised over N, H and W together). With M the number
    of values per channel (N, or N*H*W):
        mean = sum(x) / M                       (C,)   per channel
        var  = sum((x - mean)^2) / M            (C,)   (divided by M, as Keras)
        xhat = (x - mean) / sqrt(var + epsilon)        mean 0, variance 1
        out  = gamma * xhat + beta                     then scaled and shifted
    Returns out (x's shape), the cache (xhat, gamma, inv_std, M), and the
    batch's mean and var (for the moving statistics).
    """
    axes = tuple(range(x.ndim - 1))                          # all but the channels
    M = x.size // x.shape[-1]
    # The sums are taken in float64, then turned back into x's type: adding
    # up tens of thousands of float32 values one after another would lose
    # about three of float32's seven digits.
    mean = (x.sum(axis=axes, dtype=np.float64) / M).astype(x.dtype)         # (C,)
    centred = x - mean
    var = (np.square(centred).sum(axis=axes, dtype=np.float64) / M).astype(x.dtype)
    inv_std = 1 / np.sqrt(var + epsilon)                     # (C,)
    xhat = centred * inv_std
    return gamma * xhat + beta, (xhat, gamma, inv_std, M), mean, var


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
    is the classic mistake.
    """
    # Exercise. Hint: three terms: directly, through the mean, through the variance.
    xhat, gamma, inv_std, M = cache
    axes = tuple(range(dout.ndim - 1))
    dbeta = dout.sum(axis=axes, dtype=np.float64).astype(dout.dtype)          # (C,)
    dgamma = (dout * xhat).sum(axis=axes, dtype=np.float64).astype(dout.dtype)
    dx = gamma * inv_std / M * (M * dout - dbeta - xhat * dgamma)
    return dx, dgamma, dbeta


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


class BatchNormalization:
    """keras.layers.BatchNormalization(axis=-1, momentum=0.99, epsilon=1e-3):
    batchnorm_forward with the batch's statistics at training time, the
    moving ones at inference. It has what every layer of the NumPy twin has
    (mnist_cnn_numpy.Layer): params, state, build, forward, backward."""
    params = ("gamma", "beta")                         # learned
    state = ("moving_mean", "moving_variance")         # kept, not learned
    activation = None

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, name=None):
        if axis != -1:
            raise ValueError("the NumPy twin normalises the last axis (the channels), "
                             "Keras's default axis=-1")
        self.name, self.momentum, self.epsilon = name, momentum, epsilon

    def build(self, input_shape, dtype):
        C = input_shape[-1]
        self.gamma, self.beta = np.ones(C, dtype), np.zeros(C, dtype)
        self.moving_mean, self.moving_variance = np.zeros(C, dtype), np.ones(C, dtype)
        return input_shape

    def forward(self, x, training=False):
        if not training:       # the moving statistics, as tf.nn.batch_normalization uses them
            scale = self.gamma / np.sqrt(self.moving_variance + self.epsilon)
            self.cache = None, x, scale                # for a backward pass at inference
            return x * scale + (self.beta - self.moving_mean * scale)
        out, cache, mean, var = batchnorm_forward(x, self.gamma, self.beta, self.epsilon)
        self.cache = cache, None, None
        self.update_moving_statistics(mean, var)
        return out

    def update_moving_statistics(self, mean, var):
        """Keras's update of the moving statistics (the variance divided by M)."""
        m = self.momentum
        self.moving_mean = self.moving_mean * m + mean * (1.0 - m)
        self.moving_variance = self.moving_variance * m + var * (1.0 - m)

    def backward(self, dout):
        cache, x, scale = self.cache
        if cache is None:      # after inference: the statistics are constants, out = x*scale + c
            axes = tuple(range(dout.ndim - 1))
            xhat = (x - self.moving_mean) / np.sqrt(self.moving_variance + self.epsilon)
            self.dgamma, self.dbeta = (dout * xhat).sum(axis=axes), dout.sum(axis=axes)
            return dout * scale
        dx, self.dgamma, self.dbeta = batchnorm_backward(dout, cache)
        return dx
