"""A gallery of the mistakes learners make in a CNN, each planted and caught.

    python bug_gallery.py             # plant each mistake in turn, run the checks, print them
    python bug_gallery.py --markdown  # the same as one Markdown table

Each mistake below is a small broken variant of one function of the NumPy
twin (or of batchnorm.py, the starting weights in helpers/common.py, or a
speed-up in speedup.py), with one line on what went wrong and why it is
tempting. They come from what people really get wrong when they write these
layers: in issue trackers and Q&A threads about from-scratch CNNs (col2im
assigning instead of adding, the kernel "rotated 180 degrees", max-pool's
gradient routing, a missing 1/N, the flatten order between frameworks,
Adam's epsilon) and in the usual teaching code. The last ones are planted
in the machine's fast drop-ins: a speed-up is checked like the math it
replaces, and its mistakes are caught and named the same way.

This list is the one table of mistakes: the checks (helpers/checks.py) name
a result by the mistake it equals (its `diagnosis`), exercises.py's tests
paste each mistake into a workbook, and docs/practise.md's table is printed from it.

Running it plants each mistake in turn (swapped into the imported module;
the files are never touched), runs the checks, and prints which check
caught it and what it said. It exits with status 1 if any goes uncaught.
Every variant is written only with NumPy and the twin's own names, so it
can also be pasted into an exercises workbook (exercises.py).
"""

import inspect
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import batchnorm
import mnist_cnn_numpy as nt
import speedup
from helpers import checks, common
from mnist_cnn_numpy import col2im, im2col


@dataclass
class Mistake:
    module: object           # where the function lives: mnist_cnn_numpy, speedup, ...
    target: str              # the function it replaces: "conv2d_backward", "Adam.update", ...
    wrong: str               # what went wrong
    tempting: str            # why it is tempting
    caught_by: str           # the check that catches it
    says: str                # words the check's message contains
    diagnosis: str           # or "": what a check says of a result equal to this one's
    variant: Callable

    @property
    def name(self):
        """The target as the checks and the table name it ("speedup." for the machine's)."""
        return f"speedup.{self.target}" if self.module is speedup else self.target


MISTAKES = []


def mistake(module, target, wrong, tempting, caught_by, says="", diagnosis=""):
    def register(variant):
        MISTAKES.append(Mistake(module, target, wrong, tempting, caught_by,
                                says or diagnosis, diagnosis, variant))
        return variant
    return register


# --- Dense ---------------------------------------------------------------------

@mistake(nt, "dense_backward", "computes dkernel as dout.T @ x",
         "both orders multiply the same two arrays; only x.T @ dout has the kernel's "
         "shape (D, U)", "dense_backward", says="transposed")
def dense_dkernel_transposed(dout, cache):
    x, kernel = cache
    return dout @ kernel.T, dout.T @ x, dout.sum(axis=0)


@mistake(nt, "dense_backward", "forgets to sum the bias gradient over the batch",
         "for one example dbias = dout; a batch adds the same bias to every example",
         "dense_backward", says="a sum over an axis is missing")
def dense_dbias_unsummed(dout, cache):
    x, kernel = cache
    return dout @ kernel.T, x.T @ dout, dout


# --- ReLU ----------------------------------------------------------------------

@mistake(nt, "relu_backward", "lets the gradient through where the gradient is positive",
         "the forward pass is max(z, 0), so max(dout, 0) looks like its mirror image",
         "relu_backward", diagnosis="it keeps the gradient where the *gradient* is "
         "positive; the switch is the forward input: pass where z > 0")
def relu_gradient_sign(dout, out):
    return dout * (dout > 0)


@mistake(nt, "relu_backward", "tests the output with >= 0, which lets every gradient through",
         "z >= 0 and z > 0 differ only at 0 for the input, but the output max(z, 0) "
         "is never negative", "relu_backward", diagnosis="it returns the incoming gradient "
         "unchanged: the units that were off (z <= 0) must pass no gradient")
def relu_output_nonnegative(dout, out):
    return dout * (out >= 0)


# --- Softmax and cross-entropy -------------------------------------------------

@mistake(nt, "softmax_cross_entropy", "takes exp() of the raw logits",
         "softmax is exp(z) / sum exp(z) on paper; exp(1000) overflows to infinity",
         "softmax_cross_entropy", says="subtract each row's maximum")
def softmax_overflows(logits, labels):
    e = np.exp(logits)
    probs = e / e.sum(axis=1, keepdims=True)
    return -np.mean(np.log(probs[np.arange(len(labels)), labels])), probs


@mistake(nt, "softmax_cross_entropy_backward", "forgets the 1/N of the mean loss",
         "p - y is the gradient for one example; the loss is the mean over N",
         "softmax_cross_entropy_backward", says="a division by 6 is missing")
def dlogits_without_mean(probs, labels):
    dlogits = probs.copy()
    dlogits[np.arange(len(labels)), labels] -= 1
    return dlogits


# --- Dropout -------------------------------------------------------------------

@mistake(nt, "dropout_mask", "keeps units without scaling them by 1 / (1 - rate)",
         "dropping units looks like all there is to it; without the scaling the "
         "activations are smaller in training than at inference", "dropout_mask",
         says="1 / (1 - rate)")
def dropout_unscaled(shape, rate, rng, dtype):
    return (rng.random(shape, dtype=dtype) >= rate).astype(dtype)


@mistake(nt, "dropout_mask", "keeps each unit with probability rate",
         "rate reads like a keep probability (it is in some frameworks' older APIs); "
         "in Keras it is the fraction dropped", "dropout_mask",
         says="keeps units with probability")
def dropout_keeps_rate(shape, rate, rng, dtype):
    return (rng.random(shape, dtype=dtype) < rate) / dtype(1 - rate)


@mistake(nt, "dropout_backward", "returns the gradient unchanged",
         "dropout has no weights to learn, so its backward looks like nothing to do",
         "dropout_backward", diagnosis="it returns the incoming gradient unchanged; dropped "
         "units must pass no gradient, kept ones dout / (1 - rate): multiply by the same "
         "mask as the forward pass")
def dropout_backward_ignores_mask(dout, mask):
    return dout


# --- Flatten -------------------------------------------------------------------

@mistake(nt, "flatten_forward", "flattens channels first, (C, H, W), as PyTorch lays images out",
         "many tutorials and PyTorch keep images as (N, C, H, W); Keras is channels-last, "
         "so its dense weights expect (H, W, C) order", "flatten_order", says="channels last")
def flatten_channels_first(x):
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1), x.shape


# --- Max-pooling -----------------------------------------------------------------

@mistake(nt, "maxpool2d_forward", "windows move by 1 pixel instead of 2",
         "a convolution's windows move by one pixel; a pooling window moves by its "
         "own size", "maxpool_forward", says="wrong shape")
def maxpool_stride_one(x, pool=2):
    windows = sliding_window_view(x, (pool, pool), axis=(1, 2))   # (N, H-1, W-1, C, 2, 2)
    windows = windows.reshape(windows.shape[:4] + (pool * pool,))
    return windows.max(axis=-1), (x.shape, windows.argmax(axis=-1), pool)


@mistake(nt, "maxpool2d_forward", "sends a tie to the last maximum",
         "any maximum is a valid choice; but TensorFlow gives it to the first, and "
         "the twins must route it the same way", "maxpool_backward", says="only at ties")
def maxpool_ties_to_last(x, pool=2):
    N, H, W, C = x.shape
    Ho, Wo = H // pool, W // pool
    windows = x[:, :Ho * pool, :Wo * pool].reshape(N, Ho, pool, Wo, pool, C)
    windows = windows.transpose(0, 1, 3, 5, 2, 4).reshape(N, Ho, Wo, C, pool * pool)
    winner = pool * pool - 1 - windows[..., ::-1].argmax(axis=-1)   # the mistake: the last
    return windows.max(axis=-1), (x.shape, winner, pool)


@mistake(nt, "maxpool2d_backward", "spreads each gradient evenly over its window",
         "that is average-pooling's backward; only the window's maximum affected the "
         "output, so only it gets the gradient", "maxpool_backward",
         diagnosis="it spreads each gradient evenly over its window (average pooling's "
         "backward); only the maximum affected the output, so it gets all of the gradient")
def maxpool_spreads(dout, cache):
    x_shape, winner, pool = cache
    N, Ho, Wo, C = dout.shape
    dx = np.zeros(x_shape, dtype=dout.dtype)
    for a in range(pool):
        for b in range(pool):
            dx[:, a:Ho * pool:pool, b:Wo * pool:pool] = dout / pool ** 2
    return dx


# --- Convolution ---------------------------------------------------------------

@mistake(nt, "im2col", "copies each window channel by channel, (C, K, K), not (K, K, C)",
         "sliding_window_view hands the window as (C, K, K); reshaping it straight into "
         "a row does not match the kernel's (K, K, C) layout", "im2col",
         diagnosis="each row holds its window channel by channel, (C, K, K); the kernel "
         "is flattened as (K, K, C), so the row must be too (transpose the window first)")
def im2col_channel_major(x, K):
    N, H, W, C = x.shape
    windows = sliding_window_view(x, (K, K), axis=(1, 2))         # (N, H', W', C, K, K)
    return windows.reshape(-1, C * K * K)                          # the mistake: no transpose


@mistake(nt, "col2im", "assigns each window's gradient instead of adding it",
         "in im2col every window is copied out once, so writing the gradients back "
         "looks like copying too; but a pixel in several windows collects from each",
         "col2im", says="where windows overlap")
def col2im_assigns(dcols, x_shape, K):
    N, H, W, C = x_shape
    Ho, Wo = H - K + 1, W - K + 1
    dwindows = dcols.reshape(N, Ho, Wo, K, K, C)
    dx = np.zeros(x_shape, dcols.dtype)
    for a in range(K):
        for b in range(K):
            dx[:, a:a + Ho, b:b + Wo, :] = dwindows[:, :, :, a, b, :]      # the mistake: =
    return dx


@mistake(nt, "conv2d_forward", "slides the kernel rotated by 180 degrees",
         "the textbook convolution flips the kernel; Keras's Conv2D computes "
         "cross-correlation, no flip", "conv2d_forward",
         diagnosis="the output is the convolution with the kernel rotated 180 degrees. "
         "Keras's Conv2D (and the twin) slide the kernel without flipping it "
         "(cross-correlation)")
def conv_flipped_kernel(x, kernel, bias):
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    cols = im2col(x, K)
    out = cols @ kernel[::-1, ::-1].reshape(K * K * C, F) + bias   # the mistake: flipped
    return out.reshape(N, H - K + 1, W - K + 1, F), (x.shape, cols, kernel)


@mistake(nt, "conv2d_backward", "sums the bias gradient over the batch only",
         "dbias = dout.sum(axis=0) is right for a dense layer; a conv bias is also added "
         "at every output position", "conv2d_backward", says="a sum over an axis is missing")
def conv_dbias_batch_only(dout, cache):
    x_shape, cols, kernel = cache
    K, _, C, F = kernel.shape
    dout2d = dout.reshape(-1, F)
    dkernel = (cols.T @ dout2d).reshape(K, K, C, F)
    dcols = dout2d @ kernel.reshape(K * K * C, F).T
    return col2im(dcols, x_shape, K), dkernel, dout.sum(axis=0)    # the mistake: axis=0


# --- Batch normalisation -------------------------------------------------------

@mistake(batchnorm, "batchnorm_backward", "treats the batch mean and variance as constants",
         "in the forward pass they look like two numbers computed once; but every x "
         "moved them, so the gradient flows back through them too (three terms, not one)",
         "batchnorm_backward", diagnosis="it has only the first of its three terms: the "
         "gradient also flows through the batch mean and variance, which every x moves")
def batchnorm_statistics_as_constants(dout, cache):
    xhat, gamma, inv_std, M = cache
    axes = tuple(range(dout.ndim - 1))
    return gamma * inv_std * dout, (dout * xhat).sum(axis=axes), dout.sum(axis=axes)


@mistake(batchnorm, "batchnorm_backward", "leaves out the gradient through the variance",
         "the mean's term is easy to see (every x moves the mean by 1/M); the variance "
         "depends on every x too, and scales every xhat", "batchnorm_backward",
         diagnosis="it has the gradient through the mean but not through the variance "
         "(the xhat term)")
def batchnorm_no_variance_term(dout, cache):
    xhat, gamma, inv_std, M = cache
    axes = tuple(range(dout.ndim - 1))
    dbeta = dout.sum(axis=axes)
    return gamma * inv_std / M * (M * dout - dbeta), (dout * xhat).sum(axis=axes), dbeta


# --- Adam ----------------------------------------------------------------------

@mistake(nt, "Adam.update", "leaves out the bias correction",
         "m and v look like plain running averages; they start at 0, and without the "
         "correction the first steps are about 3 times too large", "adam",
         says="the bias correction?")
def adam_no_bias_correction(self, params):
    t = self.iterations + 1
    for key, w, g in params:
        if key not in self.m:
            self.m[key], self.v[key] = np.zeros_like(w), np.zeros_like(w)
        m, v = self.m[key], self.v[key]
        m += (g - m) * (1 - self.beta_1)
        v += (g * g - v) * (1 - self.beta_2)
        w -= self.lr * m / (np.sqrt(v) + self.epsilon)             # the mistake: no alpha
    self.iterations = t


@mistake(nt, "Adam.update", "adds epsilon inside the square root",
         "sqrt(v + eps) and sqrt(v) + eps both avoid a division by 0; but with small "
         "gradients they give very different steps", "adam",
         diagnosis="epsilon is added inside the square root, sqrt(v + eps); Keras adds it "
         "outside, sqrt(v) + eps, which matters when gradients are small")
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
        w -= alpha * m / np.sqrt(v + self.epsilon)                 # the mistake: inside
    self.iterations = t


# --- The starting weights --------------------------------------------------------

@mistake(common, "glorot_uniform", "counts only the channels in a conv kernel's fan-in and "
         "fan-out", "for a dense kernel fan_in is its number of inputs; a conv unit sees "
         "K*K*C inputs", "initial_weights", says="GlorotUniform gives")
def glorot_without_receptive_field(rng, shape, dtype=np.float32):
    fan_in, fan_out = shape[-2], shape[-1]
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


# --- In the machine: mistakes in speedup.py's drop-ins ----------------------------

@mistake(speedup, "im2col_with_ones", "copies each window channel by channel, (C, K, K)",
         "the fast im2col fills a preallocated matrix through a view; the view's axes "
         "must be in the kernel's (K, K, C) order too", "fast_im2col",
         diagnosis="the fast im2col copies each window channel by channel, (C, K, K), "
         "where the lesson's im2col (and the kernel) use (K, K, C)")
def fast_im2col_channel_major(x, K):
    N, H, W, C = x.shape
    Ho, Wo = H - K + 1, W - K + 1
    cols = np.empty((N, Ho, Wo, K * K * C + 1), x.dtype)
    cols[..., -1] = 1
    windows = sliding_window_view(x, (K, K), axis=(1, 2))        # (N, H', W', C, K, K)
    cols[..., :-1].reshape(N, Ho, Wo, C, K, K)[...] = windows     # the mistake: no transpose
    return cols.reshape(N * Ho * Wo, K * K * C + 1)


@mistake(speedup, "conv2d_backward", "adds the nine blocks of dx with = instead of +=",
         "nine matrix products, each a ready block of dx: each looks like the block's "
         "value, but the blocks overlap", "fast_conv2d", says="where windows overlap")
def fast_col2im_assigns(dout, cache, need_dx=True):
    x, kernel = cache
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    Ho, Wo = H - K + 1, W - K + 1
    dout2d = dout.reshape(-1, F)
    dweights = np.dot(speedup.im2col_with_ones(x, K).T, dout2d)
    dkernel, dbias = dweights[:-1].reshape(K, K, C, F), dweights[-1]
    if not need_dx:
        return None, dkernel, dbias
    dx = np.zeros(x.shape, dtype=dout.dtype)
    for a in range(K):
        for b in range(K):
            dx[:, a:a + Ho, b:b + Wo, :] = (dout2d @ kernel[a, b].T).reshape(N, Ho, Wo, C)
    return dx, dkernel, dbias


@mistake(speedup, "maxpool2d_forward", "chooses the winner with >= where > belongs",
         "a maximum of four strided views needs a winner too; with >= a tie goes to the "
         "last maximum, not the first as in the lesson and TensorFlow", "fast_maxpool2d",
         says="only at ties")
def fast_maxpool_ties_to_last(x):
    N, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    tl, tr = x[:, 0:2 * Ho:2, 0:2 * Wo:2], x[:, 0:2 * Ho:2, 1:2 * Wo:2]
    bl, br = x[:, 1:2 * Ho:2, 0:2 * Wo:2], x[:, 1:2 * Ho:2, 1:2 * Wo:2]
    top, bottom = np.maximum(tl, tr), np.maximum(bl, br)
    down = bottom >= top                                           # the mistake: >=
    right = (down & (br >= bl)) | (~down & (tr >= tl))
    winner = 2 * down.view(np.uint8) + right.view(np.uint8)
    return np.maximum(top, bottom), (x.shape, winner)


@mistake(speedup, "conv_pool_backward", "sends each window's gradient to its top-left corner",
         "the four corners are four contiguous blocks now, and the first is the easy one to "
         "write to; but only the corner that held the maximum made the output",
         "fast_conv_pool", diagnosis="it sends every window's gradient to its top-left "
         "corner; the winner (the corner that held the maximum) must get it")
def fused_pool_to_top_left(dout, cache, need_dx=True):
    x_shape, kernel, tiles, winner, out = cache
    N, H, W, C = x_shape
    K, _, _, F = kernel.shape
    P = N * ((H - K + 1) // 2) * ((W - K + 1) // 2)
    dpool = dout.reshape(P, F) if out is None else dout.reshape(P, F) * (out > 0)
    droutes = np.zeros((4, P, F), dout.dtype)
    droutes[0] = dpool                                             # the mistake: always corner 0
    dx = (speedup.winograd_backward(droutes, tiles, kernel, x_shape)[0]
          if need_dx and K == 3 and C > 1 else None)
    return dx, np.zeros_like(kernel), dpool.sum(axis=0)


@mistake(speedup, "ShareOfBatch.backward", "lets each slice's gradient through unscaled",
         "each slice runs the lesson's own loss_and_grads, whose loss is the mean over "
         "its examples; the batch's mean counts each slice only by its share",
         "fast_slices", diagnosis="each slice's gradient is the mean over its own "
         "examples; in the batch's gradient it counts as its share of the batch's mean, "
         "n_slice / N (ShareOfBatch)")
def share_of_batch_ignored(self, dout):
    return dout


# -----------------------------------------------------------------------------
# Planting and running
# -----------------------------------------------------------------------------

@contextmanager
def planted(m):
    """m's variant in place of its target, in the imported module only."""
    owner, *classes, attribute = [m.module] + m.target.split(".")
    for class_name in classes:
        owner = getattr(owner, class_name)
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
            failed = [(name, message) for name, message in checks.run(until_one_fails=True)
                      if message]
        rows.append((m,) + (failed[0] if failed else (None, None)))
    return rows


def markdown_table(rows):
    """The gallery as a Markdown table (docs/practise.md's)."""
    lines = ["| # | the mistake | caught by | what the check says |", "| --- | --- | --- | --- |"]
    for i, (m, check, message) in enumerate(rows, start=1):
        lines.append(f"| {i} | `{m.name}` {m.wrong} | `{check or 'NOT CAUGHT'}` | "
                     f"{(message or '').replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--markdown"]):
        print("usage: python bug_gallery.py [--markdown]", file=sys.stderr)
        return 2
    rows = run()
    missed = [m for m, check, _ in rows if check is None]
    if argv:
        print(markdown_table(rows))
        return 1 if missed else 0
    print(f"{len(rows)} classic mistakes, each planted in the NumPy twin and checked.\n")
    for i, (m, check, message) in enumerate(rows, start=1):
        print(f"{i:2d}. {m.name}: {m.wrong}")
        for line in textwrap.wrap(f"Tempting because {m.tempting}.", 76):
            print(f"    {line}")
        if check:
            print(f"    Caught by check {check}:")
            for line in textwrap.wrap(message, 74):
                print(f"      {line}")
        else:
            print("    NOT CAUGHT by any check.")
        print()
    print(f"{len(rows) - len(missed)} of {len(rows)} caught.")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
