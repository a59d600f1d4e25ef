"""A gallery of the mistakes learners make in a CNN, each planted and caught.

    python bug_gallery.py             # plant each mistake in turn, run the checks, print them
    python bug_gallery.py --markdown  # the same as one Markdown table (the README's)

Each mistake below is a small broken variant of one function of the NumPy
twin (or of the starting weights in common.py), with one line on what the
learner did wrong and why it is tempting. They come from what people really
get wrong when they write these layers: in issue trackers and Q&A threads
about from-scratch CNNs (col2im assigning instead of adding, the kernel
"rotated 180 degrees", max-pool's gradient routing, a missing 1/N, the
flatten order between frameworks, Adam's epsilon) and in the usual
teaching code.

Running it plants each mistake in turn (the function is swapped in the
imported module, mnist_cnn_numpy.py itself is never touched), runs the
checks of checks.py, and prints which check caught it and what it said.
It exits with status 1 if any mistake goes uncaught.

Every variant is written only with NumPy and the twin's own function
names, so it can also be pasted into an exercises workbook (exercises.py).
"""

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import checks
import common
import mnist_cnn_numpy as nt
from mnist_cnn_numpy import im2col


@dataclass
class Mistake:
    target: str              # the function it replaces: "conv2d_backward", "Adam.update", ...
    wrong: str               # what the learner did
    tempting: str            # why it is tempting
    caught_by: str           # the check that should catch it
    says: str                # words the check's message must contain
    variant: Callable

    @property
    def module(self):
        return common if self.target == "glorot_uniform" else nt


MISTAKES = []


def mistake(target, wrong, tempting, caught_by, says):
    def register(variant):
        MISTAKES.append(Mistake(target, wrong, tempting, caught_by, says, variant))
        return variant
    return register


# --- Convolution ---------------------------------------------------------------

@mistake("conv2d_forward", "slides the kernel rotated by 180 degrees",
         "the textbook convolution flips the kernel; Keras's Conv2D computes "
         "cross-correlation, no flip", "conv2d_forward", "rotated 180 degrees")
def conv_flipped_kernel(x, kernel, bias):
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    cols = im2col(x, K)
    flipped = kernel[::-1, ::-1]                                   # the mistake
    weights = np.concatenate([flipped.reshape(K * K * C, F), bias[None]])
    out = cols @ weights
    return out.reshape(N, H - K + 1, W - K + 1, F), (x, kernel)


@mistake("im2col", "copies each window channel by channel, (C, K, K), not (K, K, C)",
         "sliding_window_view hands the window as (C, K, K); reshaping it straight into "
         "a row does not match the kernel's (K, K, C) layout", "im2col",
         "channel by channel")
def im2col_channel_major(x, K):
    N, H, W, C = x.shape
    windows = sliding_window_view(x, (K, K), axis=(1, 2))         # (N, H', W', C, K, K)
    rows = windows.reshape(-1, C * K * K)                          # the mistake: no transpose
    return np.concatenate([rows, np.ones((len(rows), 1), x.dtype)], axis=1)


@mistake("conv2d_backward", "col2im assigns each window's gradient instead of adding it",
         "in im2col every window is copied out once, so writing the gradients back "
         "looks like copying too; but a pixel in several windows collects from each",
         "conv2d_backward", "where windows overlap")
def col2im_assigns(dout, cache, need_dx=True):
    x, kernel = cache
    N, H, W, C = x_shape = x.shape
    K, _, _, F = kernel.shape
    Ho, Wo = H - K + 1, W - K + 1
    cols = im2col(x, K)
    dout2d = dout.reshape(-1, F)
    dweights = cols.T @ dout2d
    dkernel, dbias = dweights[:-1].reshape(K, K, C, F), dweights[-1]
    dx = np.zeros(x_shape, dtype=dout.dtype)
    for a in range(K):
        for b in range(K):
            dx[:, a:a + Ho, b:b + Wo, :] = (dout2d @ kernel[a, b].T).reshape(N, Ho, Wo, C)
    return dx, dkernel, dbias


@mistake("conv2d_backward", "sums the bias gradient over the batch only",
         "dbias = dout.sum(axis=0) is right for a dense layer; a conv bias is also added "
         "at every output position", "conv2d_backward", "a sum over an axis is missing")
def conv_dbias_batch_only(dout, cache, need_dx=True):
    x, kernel = cache
    N, H, W, C = x_shape = x.shape
    K, _, _, F = kernel.shape
    Ho, Wo = H - K + 1, W - K + 1
    cols = im2col(x, K)
    dout2d = dout.reshape(-1, F)
    dkernel = (cols[:, :-1].T @ dout2d).reshape(K, K, C, F)
    dbias = dout.sum(axis=0)                                       # the mistake
    dx = np.zeros(x_shape, dtype=dout.dtype)
    for a in range(K):
        for b in range(K):
            dx[:, a:a + Ho, b:b + Wo, :] += (dout2d @ kernel[a, b].T).reshape(N, Ho, Wo, C)
    return dx, dkernel, dbias


# --- ReLU ----------------------------------------------------------------------

@mistake("relu_backward", "lets the gradient through where the gradient is positive",
         "the forward pass is max(z, 0), so max(dout, 0) looks like its mirror image",
         "relu_backward", "the switch is the forward input")
def relu_gradient_sign(dout, out, in_place=False):
    return dout * (dout > 0)


@mistake("relu_backward", "tests the output with >= 0, which lets every gradient through",
         "z >= 0 and z > 0 differ only at 0 for the input, but the output max(z, 0) "
         "is never negative", "relu_backward", "incoming gradient unchanged")
def relu_output_nonnegative(dout, out, in_place=False):
    return dout * (out >= 0)


# --- Max-pooling -----------------------------------------------------------------

@mistake("maxpool2d_forward", "windows move by 1 pixel instead of 2",
         "a convolution's windows move by one pixel; a pooling window moves by its "
         "own size", "maxpool_forward", "wrong shape")
def maxpool_stride_one(x, pool=2):
    windows = sliding_window_view(x, (2, 2), axis=(1, 2))         # (N, H-1, W-1, C, 2, 2)
    out = windows.max(axis=(4, 5))
    winner = windows.reshape(windows.shape[:4] + (4,)).argmax(axis=-1)
    return out, (x.shape, winner)


@mistake("maxpool2d_forward", "sends a tie to the last maximum (>= where > belongs)",
         "any maximum is a valid choice; but TensorFlow gives it to the first, and "
         "the twins must route it the same way", "maxpool_backward", "only at ties")
def maxpool_ties_to_last(x, pool=2):
    N, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    tl, tr = x[:, 0:2 * Ho:2, 0:2 * Wo:2], x[:, 0:2 * Ho:2, 1:2 * Wo:2]
    bl, br = x[:, 1:2 * Ho:2, 0:2 * Wo:2], x[:, 1:2 * Ho:2, 1:2 * Wo:2]
    top, bottom = np.maximum(tl, tr), np.maximum(bl, br)
    out = np.maximum(top, bottom)
    down = bottom >= top                                           # the mistake: >=
    right = (down & (br >= bl)) | (~down & (tr >= tl))
    winner = 2 * down.astype(np.uint8) + right.astype(np.uint8)
    return out, (x.shape, winner)


@mistake("maxpool2d_backward", "spreads each gradient evenly over its window",
         "that is average-pooling's backward; only the window's maximum affected the "
         "output, so only it gets the gradient", "maxpool_backward", "average pooling")
def maxpool_spreads(dout, cache):
    x_shape, winner = cache
    Ho, Wo = dout.shape[1:3]
    dx = np.zeros(x_shape, dtype=dout.dtype)
    for a in range(2):
        for b in range(2):
            dx[:, a:2 * Ho:2, b:2 * Wo:2] = dout / 4
    return dx


# --- Flatten -------------------------------------------------------------------

@mistake("flatten_forward", "flattens channels first, (C, H, W), as PyTorch lays images out",
         "many tutorials and PyTorch keep images as (N, C, H, W); Keras is channels-last, "
         "so its dense weights expect (H, W, C) order", "flatten_order", "channels last")
def flatten_channels_first(x):
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1), x.shape


# --- Dense ---------------------------------------------------------------------

@mistake("dense_backward", "computes dkernel as dout.T @ x",
         "both orders multiply the same two arrays; only x.T @ dout has the kernel's "
         "shape (D, U)", "dense_backward", "transposed")
def dense_dkernel_transposed(dout, cache):
    x, kernel = cache
    return dout @ kernel.T, dout.T @ x, dout.sum(axis=0)


@mistake("dense_backward", "forgets to sum the bias gradient over the batch",
         "for one example dbias = dout; a batch adds the same bias to every example",
         "dense_backward", "a sum over an axis is missing")
def dense_dbias_unsummed(dout, cache):
    x, kernel = cache
    return dout @ kernel.T, x.T @ dout, dout


# --- Softmax and cross-entropy -------------------------------------------------

@mistake("softmax_cross_entropy", "takes exp() of the raw logits",
         "softmax is exp(z) / sum exp(z) on paper; exp(1000) overflows to infinity",
         "softmax_cross_entropy", "subtract each row's maximum")
def softmax_overflows(logits, labels):
    e = np.exp(logits)
    probs = e / e.sum(axis=1, keepdims=True)
    return -np.mean(np.log(probs[np.arange(len(labels)), labels])), probs


@mistake("softmax_cross_entropy_backward", "forgets the 1/N of the mean loss",
         "p - y is the gradient for one example; the loss is the mean over N",
         "softmax_cross_entropy_backward", "a division by 6 is missing")
def dlogits_without_mean(probs, labels, batch_size=None):
    dlogits = probs.copy()
    dlogits[np.arange(len(labels)), labels] -= 1
    return dlogits


# --- Dropout -------------------------------------------------------------------

@mistake("dropout_backward", "returns the gradient unchanged",
         "dropout has no weights to learn, so its backward looks like nothing to do",
         "dropout_backward", "incoming gradient unchanged")
def dropout_backward_ignores_mask(dout, mask):
    return dout


@mistake("dropout_mask", "keeps units without scaling them by 1 / (1 - rate)",
         "dropping units looks like all there is to it; without the scaling the "
         "activations are smaller in training than at inference", "dropout_mask",
         "1 / (1 - rate)")
def dropout_unscaled(shape, rate, rng, dtype):
    return (rng.random(shape, dtype=dtype) >= rate).astype(dtype)


@mistake("dropout_mask", "keeps each unit with probability rate",
         "rate reads like a keep probability (it is in some frameworks' older APIs); "
         "in Keras it is the fraction dropped", "dropout_mask", "keeps units with probability")
def dropout_keeps_rate(shape, rate, rng, dtype):
    return (rng.random(shape, dtype=dtype) < rate) / dtype(1 - rate)


# --- Batch normalisation -------------------------------------------------------

@mistake("batchnorm_backward", "treats the batch mean and variance as constants",
         "in the forward pass they look like two numbers computed once; but every x "
         "moved them, so the gradient flows back through them too (three terms, not one)",
         "batchnorm_backward", "only the first of its three terms")
def batchnorm_statistics_as_constants(dout, cache):
    xhat, gamma, inv_std, M, total = cache
    axes = tuple(range(dout.ndim - 1))
    return gamma * inv_std * dout, (dout * xhat).sum(axis=axes), dout.sum(axis=axes)


# --- Adam ----------------------------------------------------------------------

@mistake("Adam.update", "leaves out the bias correction",
         "m and v look like plain running averages; they start at 0, and without the "
         "correction the first steps are about 3 times too large", "adam",
         "the bias correction?")
def adam_no_bias_correction(self, params):
    t = self.iterations + 1
    for key, w, g in params:
        if key not in self.m:
            self.m[key], self.v[key] = np.zeros_like(w), np.zeros_like(w)
        m, v = self.m[key], self.v[key]
        m += (g - m) * (1 - self.beta_1)
        v += (g * g - v) * (1 - self.beta_2)
        w -= self.lr * m / (np.sqrt(v) + self.epsilon)
    self.iterations = t


@mistake("Adam.update", "adds epsilon inside the square root",
         "sqrt(v + eps) and sqrt(v) + eps both avoid a division by 0; but with small "
         "gradients they give very different steps", "adam", "inside the square root")
def adam_epsilon_inside(self, params):
    t = self.iterations + 1
    b1, b2 = np.float32(self.beta_1), np.float32(self.beta_2)
    alpha = self.lr * np.sqrt(1 - float(b2) ** t) / (1 - float(b1) ** t)
    for key, w, g in params:
        if key not in self.m:
            self.m[key], self.v[key] = np.zeros_like(w), np.zeros_like(w)
        m, v = self.m[key], self.v[key]
        m += (g - m) * (1 - self.beta_1)
        v += (g * g - v) * (1 - self.beta_2)
        w -= alpha * m / np.sqrt(v + self.epsilon)
    self.iterations = t


# --- The starting weights --------------------------------------------------------

@mistake("glorot_uniform", "counts only the channels in a conv kernel's fan-in and fan-out",
         "for a dense kernel fan_in is its number of inputs; a conv unit sees K*K*C "
         "inputs", "initial_weights", "GlorotUniform gives")
def glorot_without_receptive_field(rng, shape, dtype=np.float32):
    fan_in, fan_out = shape[-2], shape[-1]
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


# -----------------------------------------------------------------------------
# Planting and running
# -----------------------------------------------------------------------------

@contextmanager
def planted(m):
    """m's variant in place of its target, in the imported module only."""
    owner, attribute = m.module, m.target
    if "." in m.target:
        class_name, attribute = m.target.split(".")
        owner = getattr(m.module, class_name)
    original = getattr(owner, attribute)
    setattr(owner, attribute, m.variant)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def source(m):
    """The variant's code, renamed to its target, for a workbook."""
    text = inspect.getsource(m.variant)
    text = text[text.index("def "):]                       # without the decorator
    return text.replace(f"def {m.variant.__name__}(", f"def {m.target.split('.')[-1]}(", 1)


def run():
    """Plant each mistake, run the checks; return [(mistake, check, message)]
    with check None when nothing caught it."""
    rows = []
    for m in MISTAKES:
        with planted(m):
            failed = [(name, message) for name, message in checks.run() if message]
        rows.append((m,) + (failed[0] if failed else (None, None)))
    return rows


def main(argv=None):
    markdown = "--markdown" in (sys.argv[1:] if argv is None else argv)
    rows = run()
    if markdown:
        print("| # | the mistake | caught by | what the check says |")
        print("| --- | --- | --- | --- |")
    else:
        print(f"{len(rows)} classic mistakes, each planted in the NumPy twin and checked.\n")
    width = 74
    for i, (m, check, message) in enumerate(rows, start=1):
        if markdown:
            print(f"| {i} | `{m.target}` {m.wrong} | `{check or 'NOT CAUGHT'}` | "
                  f"{(message or '').replace('|', '/')} |")
            continue
        print(f"{i:2d}. {m.target}: {m.wrong}")
        for line in _wrap(f"Tempting because {m.tempting}.", width + 2):
            print(f"    {line}")
        if check:
            print(f"    Caught by check {check}:")
            for line in _wrap(message, width):
                print(f"      {line}")
        else:
            print("    NOT CAUGHT by any check.")
        print()
    missed = [m for m, check, _ in rows if check is None]
    if not markdown:
        print(f"{len(rows) - len(missed)} of {len(rows)} caught.")
    return 1 if missed else 0


def _wrap(text, width):
    import textwrap
    return textwrap.wrap(text, width) or [""]


if __name__ == "__main__":
    sys.exit(main())
