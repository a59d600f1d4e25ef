"""Named checks of the NumPy twin's math, each with a message a learner reads.

Every check runs one piece of mnist_cnn_numpy.py (or common.py) on small
random inputs and compares it with something written independently of it:
the slow loop version beside it (the algorithmic reference), centred finite
differences (float64), the definition in the docstring, statistics of what
Keras does, or Adam written out from the paper. A check that fails raises
CheckFailed with where it happened (function, tensor) and what kind of
difference it is (shape, sign, scale, only where windows overlap, only at
ties, ...), not just "arrays differ".

Checks look the functions up in the module when they run, so whatever is in
mnist_cnn_numpy at that moment is what gets checked: the twin's own code in
the tests, a planted mistake in bug_gallery.py, a learner's function in
exercises.py.

    python -m pytest tests/test_checks.py   # every check passes on the twin
    python bug_gallery.py                   # every classic mistake is caught
"""

import numpy as np

import common
import mnist_cnn_numpy as nt

DTYPE = np.float64         # checks run in float64: rounding stays near 1e-15


class CheckFailed(AssertionError):
    """A check found a difference; the message says where and what kind."""


# -----------------------------------------------------------------------------
# Comparing arrays, with a diagnosis
# -----------------------------------------------------------------------------

def compare(where, got, want, tol=1e-9, patterns=(), lookalikes=()):
    """Raise CheckFailed unless got equals want (relative tolerance tol).

    where: what is compared, e.g. "conv2d_backward: dx".
    patterns: [(mask, words)]: if every wrong entry lies where mask is True,
    the message says words (e.g. "only where windows overlap").
    lookalikes: [(array, words)]: if got equals that array instead, the
    message says words (e.g. "it is the incoming gradient, unchanged").
    """
    got = np.asarray(got) if got is not None else None
    want = np.asarray(want)
    if got is None:
        raise CheckFailed(f"{where}: returned None, expected an array of shape {want.shape}")
    if got.shape != want.shape:
        hint = ""
        if got.shape == want.shape[::-1] and got.ndim == 2:
            hint = " (transposed?)"
        elif got.size == want.size:
            hint = " (the right numbers of entries in another shape: a reshape or order mistake?)"
        elif got.ndim > want.ndim:
            hint = " (a sum over an axis is missing?)"
        raise CheckFailed(f"{where}: wrong shape: {got.shape}, expected {want.shape}{hint}")
    if not np.all(np.isfinite(got)):
        bad = int(np.sum(~np.isfinite(got)))
        raise CheckFailed(f"{where}: {bad} entries are NaN or infinite (overflow?)")
    scale = max(float(np.max(np.abs(want))), 1e-300)
    wrong = np.abs(got - want) > tol * scale
    if not wrong.any():
        return
    for other, words in lookalikes:           # as close to it as got should be to want
        if np.shape(other) == got.shape and not np.any(np.abs(got - other) > tol * scale):
            raise CheckFailed(f"{where}: {words}")
    raise CheckFailed(f"{where}: {diagnose(got, want, wrong, patterns)}")


def diagnose(got, want, wrong, patterns=()):
    """Words for the kind of difference between got and want."""
    g, w = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    for mask, words in patterns:
        if not np.any(wrong & ~mask):
            return f"right shape, wrong values only {words} ({int(wrong.sum())} of {wrong.size})"
    if np.allclose(g, -w, rtol=1e-6, atol=1e-12 * max(np.abs(w).max(), 1e-300)):
        return "the sign is flipped: every value is the negative of the expected one"
    if np.dot(w, w) > 0:
        s = float(np.dot(g, w) / np.dot(w, w))
        if abs(s) > 1e-12 and np.allclose(g, s * w, rtol=1e-6,
                                          atol=1e-9 * max(np.abs(w).max(), 1e-300)):
            hint = ""
            if abs(s - round(s)) < 1e-6 and round(s) > 1:
                hint = f" (a division by {round(s)} is missing?)"
            elif abs(1 / s - round(1 / s)) < 1e-6 and round(1 / s) > 1:
                hint = f" (divided by {round(1 / s)} once too often?)"
            if abs(s - (1 - 0.9) / np.sqrt(1 - 0.999)) < 1e-3 * s:   # Adam's first step
                hint = (" (Adam's first step without sqrt(1 - beta_2) / (1 - beta_1) = "
                        "0.316: the bias correction?)")
            return f"the scale is off: every value is {s:.6g} times the expected one{hint}"
    if not np.any(g):
        return "all zeros: nothing reaches this output"
    i = np.unravel_index(int(np.argmax(np.abs(got - want))), got.shape)
    return (f"wrong values at {int(wrong.sum())} of {wrong.size} entries; the largest "
            f"difference is at index {tuple(int(k) for k in i)}: got {got[i]:.6g}, "
            f"expected {want[i]:.6g}")


def numeric_grad(f, x, h=1e-5):
    """Centred finite differences of the scalar f() with respect to x (in place)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        plus = f()
        x[i] = old - h
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


def _against_finite_differences(function, grads, inputs, loss,
                                names=("dx", "dkernel", "dbias")):
    """Each gradient against centred finite differences of loss() with
    respect to its input (float64, h = 1e-5: truncation error about 1e-10,
    rounding about 1e-11, so 1e-6 relative catches any real mistake).
    loss() uses the naive forward, so this checks the backward pass against
    the definition of the forward one."""
    for name, grad, x in zip(names, grads, inputs):
        compare(f"{function}: {name} against finite differences", grad,
                numeric_grad(lambda: float(loss()), x), tol=1e-6)


def overlap_mask(x_shape, K):
    """True for each input pixel that K x K windows (stride 1) share with
    other windows: the pixels col2im must *add* several gradients into."""
    N, H, W, C = x_shape
    count = np.zeros((H, W))
    for i in range(H - K + 1):
        for j in range(W - K + 1):
            count[i:i + K, j:j + K] += 1
    return np.broadcast_to((count > 1)[None, :, :, None], x_shape)


# -----------------------------------------------------------------------------
# The checks, one per function or idea
# -----------------------------------------------------------------------------
# Each takes no arguments, draws its own inputs from a fixed seed, and
# returns nothing when all is well.

def _rng():
    return np.random.default_rng(20)


def check_dense_forward():
    rng = _rng()
    x, kernel, bias = rng.normal(size=(4, 6)), rng.normal(size=(6, 3)), rng.normal(size=3)
    out, _ = nt.dense_forward(x, kernel, bias)
    compare("dense_forward: out", out, nt.dense_forward_naive(x, kernel, bias))


def check_dense_backward():
    rng = _rng()
    x, kernel, bias = rng.normal(size=(4, 6)), rng.normal(size=(6, 3)), rng.normal(size=3)
    _, cache = nt.dense_forward(x, kernel, bias)
    dout = rng.normal(size=(4, 3))
    got = nt.dense_backward(dout, cache)
    for name, g, w in zip(("dx", "dkernel", "dbias"), got,
                          nt.dense_backward_naive(dout, x, kernel)):
        compare(f"dense_backward: {name}", g, w)
    _against_finite_differences("dense_backward", got, (x, kernel, bias),
                                lambda: np.sum(nt.dense_forward_naive(x, kernel, bias) * dout))


def check_relu_backward():
    rng = _rng()
    z = rng.normal(size=(5, 7))
    z[np.abs(z) < 0.01] = 0.5                    # clear of the kink
    dout = rng.normal(size=z.shape)
    out, cache = nt.relu_forward(z.copy())
    got = nt.relu_backward(dout.copy(), cache)
    off = z <= 0
    compare("relu_backward: dz", got, dout * (z > 0),
            lookalikes=[(dout, "it returns the incoming gradient unchanged: the units that "
                               "were off (z <= 0) must pass no gradient"),
                        (dout * (dout > 0), "it keeps the gradient where the *gradient* is "
                                            "positive; the switch is the forward input: "
                                            "pass where z > 0")],
            patterns=[(off, "where the unit was off (z <= 0): no gradient may pass there"),
                      (~off, "where the unit was on (z > 0): the gradient passes unchanged")])
    _against_finite_differences("relu_backward", [got], [z],
                                lambda: np.sum(np.maximum(z, 0) * dout), names=["dz"])


def check_softmax_cross_entropy():
    """The loss and probabilities, for ordinary logits and for logits of
    size 1000, where exp() overflows unless each row's maximum is taken out.
    The expected loss is log-sum-exp minus the true class's logit, from
    NumPy's overflow-safe np.logaddexp (the naive loop version would itself
    overflow to infinity there)."""
    rng = _rng()
    labels = rng.integers(0, 10, 6)
    for scale, words in ((3.0, "logits of size 3"), (1000.0, "logits of size 1000")):
        logits = rng.normal(size=(6, 10)) * scale
        loss, probs = nt.softmax_cross_entropy(logits, labels)
        if not np.isfinite(loss) or not np.all(np.isfinite(probs)):
            raise CheckFailed(f"softmax_cross_entropy: NaN or infinite for {words}: exp() "
                              "overflows; subtract each row's maximum first")
        log_sum = np.logaddexp.reduce(logits, axis=1)                  # (N,)
        compare(f"softmax_cross_entropy: loss ({words})", loss,
                np.mean(log_sum - logits[np.arange(6), labels]))
        compare(f"softmax_cross_entropy: probs ({words})", probs,
                np.exp(logits - log_sum[:, None]))


def check_softmax_cross_entropy_backward():
    rng = _rng()
    logits, labels = rng.normal(size=(6, 10)), rng.integers(0, 10, 6)
    _, probs = nt.softmax_cross_entropy(logits, labels)
    got = nt.softmax_cross_entropy_backward(probs, labels)
    label = np.zeros(probs.shape, bool)
    label[np.arange(6), labels] = True
    compare("softmax_cross_entropy_backward: dlogits", got,
            nt.softmax_cross_entropy_naive(logits, labels)[1],
            patterns=[(label, "at each example's true class: subtract 1 there (p - y)")])
    numeric = numeric_grad(lambda: nt.softmax_cross_entropy(logits, labels)[0], logits)
    compare("softmax_cross_entropy_backward: dlogits against finite differences",
            got, numeric, tol=1e-6)


def check_dropout_mask():
    """The mask's statistics against what Keras's Dropout does: each unit is
    dropped with probability `rate`, a kept one is scaled by 1 / (1 - rate),
    so its expected value is 1 (Keras's documentation: "Inputs not set to 0
    are scaled up by 1 / (1 - rate)")."""
    for rate in (0.2, 0.5):
        shape = (400, 250)
        mask = np.asarray(nt.dropout_mask(shape, rate, np.random.default_rng(1), DTYPE))
        where = f"dropout_mask (rate {rate})"
        if mask.shape != shape:
            raise CheckFailed(f"{where}: wrong shape: {mask.shape}, expected {shape}")
        values = np.unique(mask)
        kept_value = 1 / (1 - rate)
        if not set(values.tolist()) <= {0.0, kept_value}:
            shown = ", ".join(f"{v:.4g}" for v in values[:4])
            raise CheckFailed(f"{where}: holds {shown}; expected only 0 (dropped) and "
                              f"{kept_value:.4g} = 1 / (1 - rate) (kept, scaled up)")
        dropped = float(np.mean(mask == 0))
        spread = 4 * np.sqrt(rate * (1 - rate) / mask.size)       # 4 standard deviations
        if abs(dropped - rate) > spread:
            hint = (" (it keeps units with probability rate: dropped should be rate)"
                    if abs(dropped - (1 - rate)) <= spread else "")
            raise CheckFailed(f"{where}: drops {dropped:.1%} of units, expected {rate:.0%}"
                              f"{hint}")
    rows = nt.dropout_mask((50, 10), 0.5, np.random.default_rng(2), DTYPE)
    if np.all(rows == rows[:1]):
        raise CheckFailed("dropout_mask: every example got the same mask; each example "
                          "(row) needs its own random draws")


def check_dropout_backward():
    rng = _rng()
    x = rng.normal(size=(6, 8))
    mask = nt.dropout_mask(x.shape, 0.5, np.random.default_rng(3), DTYPE)
    dout = rng.normal(size=x.shape)
    got = nt.dropout_backward(dout.copy(), mask)
    dropped = mask == 0
    compare("dropout_backward: dx", got, dout * mask,
            lookalikes=[(dout, "it returns the incoming gradient unchanged; dropped units "
                               "must pass no gradient, kept ones dout / (1 - rate): "
                               "multiply by the same mask as the forward pass")],
            patterns=[(dropped, "where units were dropped: the mask stops their gradient too"),
                      (~dropped, "where units were kept: multiply by the mask's 1/(1 - rate)")])


def check_dropout_layer_at_inference():
    x = _rng().normal(size=(4, 8))
    layer = nt.Dropout(0.5)
    layer.build(x.shape[1:], DTYPE)
    layer.rng = np.random.default_rng(0)
    out = layer.forward(x.copy(), training=False)
    compare("Dropout.forward(training=False)", out, x,
            patterns=[(np.ones(x.shape, bool), "at inference: dropout must do nothing then")])


def check_flatten_order():
    """Keras flattens channels-last: x[n, h, w, c] goes to column
    (h * W + w) * C + c. Another order makes a Keras weights file useless."""
    N, H, W, C = 2, 3, 4, 5
    x = np.arange(N * H * W * C, dtype=DTYPE).reshape(N, H, W, C)
    out, shape = nt.flatten_forward(x)
    want = np.stack([[x[n, h, w, c] for h in range(H) for w in range(W) for c in range(C)]
                     for n in range(N)])
    if np.shape(out) == want.shape and not np.array_equal(out, want):
        first = np.flatnonzero(np.asarray(out)[0] != want[0])[0]
        raise CheckFailed(
            f"flatten_forward: column {first} holds x{_index(out[0][first], x)}, expected "
            f"x{_index(want[0][first], x)}: Keras flattens in (H, W, C) order, channels last")
    compare("flatten_forward: out", out, want)
    dout = np.arange(out.size, dtype=DTYPE).reshape(out.shape)
    compare("flatten_backward: dx", nt.flatten_backward(dout, shape), dout.reshape(x.shape))


def _index(value, x):
    return "[" + ", ".join(str(int(i)) for i in np.argwhere(x == value)[0]) + "]"


def _pool_inputs(ties):
    rng = _rng()
    if ties:                        # after ReLU, whole windows of equal values are common
        return rng.integers(0, 2, size=(2, 6, 6, 3)).astype(DTYPE)
    return rng.normal(size=(2, 5, 7, 3))      # odd sizes: a dropped row and column


def check_maxpool_forward():
    for ties in (False, True):
        x = _pool_inputs(ties)
        out, _ = nt.maxpool2d_forward(x)
        compare("maxpool2d_forward: out", out, nt.maxpool2d_forward_naive(x))


def check_maxpool_backward():
    for ties in (False, True):
        x = _pool_inputs(ties)
        out, cache = nt.maxpool2d_forward(x)
        dout = _rng().normal(size=np.shape(out))
        got = nt.maxpool2d_backward(dout, cache)
        want = nt.maxpool2d_backward_naive(dout, x)
        Ho, Wo = dout.shape[1:3]
        windows = x[:, :2 * Ho, :2 * Wo].reshape(x.shape[0], Ho, 2, Wo, 2, x.shape[3])
        tied = (windows == windows.max(axis=(2, 4), keepdims=True)).sum(axis=(2, 4)) > 1
        at_ties = np.zeros(x.shape, bool)
        at_ties[:, :2 * Ho, :2 * Wo] = np.repeat(np.repeat(tied, 2, axis=1), 2, axis=2)
        spread = np.zeros(x.shape)
        for a in range(2):
            for b in range(2):
                spread[:, a:2 * Ho:2, b:2 * Wo:2] = dout / 4
        compare("maxpool2d_backward: dx" + (" (windows with equal maxima)" if ties else ""),
                got, want, lookalikes=[
                    (spread, "it spreads each gradient evenly over its window (average "
                             "pooling's backward); only the maximum affected the output, "
                             "so it gets all of the gradient")],
                patterns=[(at_ties, "at ties (windows with several equal maxima): "
                                               "only the first maximum in reading order gets "
                                               "the gradient, as in TensorFlow (which one "
                                               "won is decided in maxpool2d_forward)")])
        if not ties:                  # finite differences need one clear maximum per window
            _against_finite_differences(
                "maxpool2d_backward", [got], [x], names=["dx"],
                loss=lambda: np.sum(nt.maxpool2d_forward_naive(x) * dout))


def check_im2col():
    rng = _rng()
    for C in (1, 3):
        x = rng.normal(size=(2, 5, 6, C))
        want = nt.im2col_naive(x, 3)
        # The same windows, each copied channel by channel: (c, a, b) order.
        windows = want[:, :-1].reshape(-1, 3, 3, C)                      # (rows, a, b, c)
        channel_major = np.concatenate(
            [windows.transpose(0, 3, 1, 2).reshape(len(want), -1), want[:, -1:]], axis=1)
        compare(f"im2col: cols (C = {C})", nt.im2col(x, 3), want, lookalikes=[
            (channel_major, "each row holds its window channel by channel, (C, K, K); "
                            "the kernel is flattened as (K, K, C), so the row must be too "
                            "(transpose the window before copying)")])


def check_conv2d_forward():
    rng = _rng()
    for C in (1, 3):
        x = rng.normal(size=(2, 6, 5, C))
        kernel, bias = rng.normal(size=(3, 3, C, 4)), rng.normal(size=4)
        out, _ = nt.conv2d_forward(x, kernel, bias)
        want = nt.conv2d_forward_naive(x, kernel, bias)
        flipped = nt.conv2d_forward_naive(x, kernel[::-1, ::-1], bias)
        if np.shape(out) == want.shape and np.allclose(out, flipped) \
                and not np.allclose(out, want):
            raise CheckFailed("conv2d_forward: the output is the convolution with the kernel "
                              "rotated 180 degrees. Keras's Conv2D (and the twin) slide the "
                              "kernel without flipping it (cross-correlation)")
        compare(f"conv2d_forward: out (C = {C})", out, want)


def check_conv2d_backward():
    rng = _rng()
    x = rng.normal(size=(2, 6, 5, 3))
    kernel, bias = rng.normal(size=(3, 3, 3, 4)), rng.normal(size=4)
    out, cache = nt.conv2d_forward(x, kernel, bias)
    dout = rng.normal(size=np.shape(out))
    got = nt.conv2d_backward(dout, cache)
    want = nt.conv2d_backward_naive(dout, x, kernel)
    patterns = {"dx": [(overlap_mask(x.shape, 3), "where windows overlap: col2im must add "
                                                  "each window's share, not assign it")]}
    for name, g, w in zip(("dx", "dkernel", "dbias"), got, want):
        compare(f"conv2d_backward: {name}", g, w, patterns=patterns.get(name, ()))
    _against_finite_differences(
        "conv2d_backward", got, (x, kernel, bias),
        lambda: np.sum(nt.conv2d_forward_naive(x, kernel, bias) * dout))


def check_batchnorm_forward():
    """Batch normalisation after a dense layer (N, D) and after a conv layer
    (N, H, W, C, normalised over N, H, W), against the loop reference."""
    rng = _rng()
    for shape in ((6, 5), (2, 3, 4, 5)):
        x = rng.normal(size=shape) * 3 + 1
        gamma, beta = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
        out, _, mean, var = nt.batchnorm_forward(x, gamma, beta)
        compare(f"batchnorm_forward: out for x of shape {shape}", out,
                nt.batchnorm_forward_naive(x, gamma, beta))
        axes = tuple(range(x.ndim - 1))
        compare("batchnorm_forward: the batch mean", mean, x.mean(axis=axes))
        compare("batchnorm_forward: the batch variance (divided by M, as Keras)", var,
                x.var(axis=axes))


def check_batchnorm_backward():
    """dx, dgamma, dbeta against the loop reference (the chain rule written
    out pair by pair) and against finite differences."""
    rng = _rng()
    for shape in ((6, 5), (2, 3, 4, 5)):
        x = rng.normal(size=shape) * 3 + 1
        gamma, beta = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
        dout = rng.normal(size=shape)
        _, cache, _, _ = nt.batchnorm_forward(x, gamma, beta)
        got = nt.batchnorm_backward(dout, cache)
        want = nt.batchnorm_backward_naive(dout, x, gamma)
        axes = tuple(range(x.ndim - 1))
        xhat = (x - x.mean(axis=axes)) / np.sqrt(x.var(axis=axes) + 1e-3)
        direct = gamma / np.sqrt(x.var(axis=axes) + 1e-3) * dout
        compare(f"batchnorm_backward: dx for x of shape {shape}", got[0], want[0], lookalikes=[
            (direct, "it has only the first of its three terms: the gradient also flows "
                     "through the batch mean and variance, which every x moves"),
            (direct - direct.mean(axis=axes), "it has the gradient through the mean but "
                                              "not through the variance (the xhat term)")])
        compare("batchnorm_backward: dgamma", got[1], (dout * xhat).sum(axis=axes))
        compare("batchnorm_backward: dbeta", got[2], dout.sum(axis=axes))
        _against_finite_differences(
            "batchnorm_backward", got, (x, gamma, beta), names=("dx", "dgamma", "dbeta"),
            loss=lambda: np.sum(nt.batchnorm_forward_naive(x, gamma, beta) * dout))


def adam_from_the_paper(w, grads, lr, beta_1, beta_2, epsilon_hat):
    """Adam as Kingma and Ba (2015) write it in Algorithm 1, with one change
    that Keras documents: its epsilon is the paper's "epsilon hat" (the
    efficient form just before the paper's Section 2.1), which equals the
    Algorithm's epsilon times sqrt(1 - beta_2^t). Returns w after each step.

        m_t = beta_1 m_{t-1} + (1 - beta_1) g_t
        v_t = beta_2 v_{t-1} + (1 - beta_2) g_t^2
        m_hat = m_t / (1 - beta_1^t),   v_hat = v_t / (1 - beta_2^t)
        w_t = w_{t-1} - lr m_hat / (sqrt(v_hat) + epsilon_t)
    """
    m, v, out = np.zeros_like(w), np.zeros_like(w), []
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g ** 2
        m_hat, v_hat = m / (1 - beta_1 ** t), v / (1 - beta_2 ** t)
        epsilon_t = epsilon_hat / np.sqrt(1 - beta_2 ** t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + epsilon_t)
        out.append(w)
    return out


def check_adam():
    """Ten steps against the paper's algorithm, on gradients of ordinary size
    and on tiny ones (around 1e-8), where epsilon's placement matters.
    Tolerance 1e-4 relative: the twin, like Keras, computes the bias
    correction from float32-rounded betas, and float32(0.999) = 0.99900001
    makes 1 - beta_2 about 1.3e-5 smaller, a step about 6e-6 of itself
    larger. Every mistake in the rule is off by far more (epsilon in the
    wrong place: a factor of 2 or more on tiny gradients; no bias
    correction: about 3x on the first step)."""
    rng = _rng()
    for size, words in ((1.0, "ordinary gradients"), (1e-8, "tiny gradients (about 1e-8)")):
        w0 = rng.normal(size=(3, 4))
        grads = [rng.normal(size=w0.shape) * size for _ in range(10)]
        want = adam_from_the_paper(w0, grads, 0.01, 0.9, 0.999, 1e-7)
        inside = _adam_epsilon_inside(w0, grads, 0.01, 0.9, 0.999, 1e-7)
        opt, w = nt.Adam(lr=0.01), w0.copy()
        for t, g in enumerate(grads, start=1):
            opt.update([("w", w, g.copy())])
            if t in (1, 10):
                step_got, step_want = w - w0, want[t - 1] - w0
                compare(f"Adam.update: the change of the weights after step {t} ({words})",
                        step_got, step_want, tol=1e-4, lookalikes=[
                            (inside[t - 1] - w0, "epsilon is added inside the square root, "
                             "sqrt(v + eps); Keras adds it outside, sqrt(v) + eps, which "
                             "matters when gradients are small")])


def _adam_epsilon_inside(w, grads, lr, beta_1, beta_2, epsilon):
    """Adam with epsilon under the square root, w -= alpha m / sqrt(v + eps):
    a common variant, for the diagnosis."""
    m, v, out = np.zeros_like(w), np.zeros_like(w), []
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g ** 2
        alpha = lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
        w = w - alpha * m / np.sqrt(v + epsilon)
        out.append(w)
    return out


def check_initial_weights():
    """Statistics of the starting weights against Keras's initialisers:
    GlorotUniform kernels, U(-limit, limit) with limit = sqrt(6 / (fan_in +
    fan_out)), fan_in = K*K*C and fan_out = K*K*F for a conv kernel (Keras's
    documented formula); zero biases."""
    model = nt.build_model()
    shapes = model.weight_shapes()
    weights = common.initial_weights(shapes, 0, DTYPE)
    for key, shape in shapes.items():
        w = weights[key]
        if w.shape != shape:
            raise CheckFailed(f"initial weights {key}: shape {w.shape}, expected {shape}")
        if key.endswith("/bias"):
            if np.any(w):
                raise CheckFailed(f"initial weights {key}: biases start at 0 in Keras")
            continue
        receptive = int(np.prod(shape[:-2]))
        limit = np.sqrt(6 / (receptive * (shape[-2] + shape[-1])))
        std, big = float(w.std()), float(np.abs(w).max())
        if big > limit * (1 + 1e-6) or abs(std - limit / np.sqrt(3)) > 0.05 * limit:
            raise CheckFailed(
                f"initial weights {key}: spread (standard deviation) {std:.4f} and largest "
                f"|w| {big:.4f}; Keras's GlorotUniform gives {limit / np.sqrt(3):.4f} and at "
                f"most {limit:.4f} for this shape (fan_in and fan_out count the kernel's "
                "K*K positions too)")


def check_whole_model_gradients(dropout=0.5):
    """Every weight tensor of the network (a few entries each) against
    centred finite differences of the loss, in training mode with one fixed
    dropout mask (the same mask for every evaluation of the loss)."""
    rng = np.random.default_rng(0)
    model = nt.build_model(dropout=dropout, seed=3, dtype="float64")
    model.threads = 1
    for layer in model.layers:
        if "bias" in layer.params:
            layer.bias[:] = rng.normal(size=layer.bias.shape) * 0.1   # non-zero biases too
    x, y = rng.random((2,) + model.input.shape), np.array([1, 7])
    masks = {}
    for layer in model.layers:
        if isinstance(layer, nt.Dropout):
            masks[layer.name] = layer.draw_mask((len(x),) + layer.input_shape)

    def loss_and_grads():
        for layer in model.layers:
            if layer.name in masks:
                layer.batch_mask = masks[layer.name]
        return nt.loss_and_grads(model.layers, x, y, len(x))[0]

    loss_and_grads()
    base = _kinks(model)
    analytic = {key: g.copy() for key, _, g in model.trainable_weights()}
    for key, w, _ in model.trainable_weights():
        flat, checked, numeric = w.reshape(-1), [], []
        for i in rng.permutation(flat.size)[:60]:
            old = flat[i]
            flat[i] = old + 1e-5
            plus, side_plus = loss_and_grads(), _kinks(model)
            flat[i] = old - 1e-5
            minus, side_minus = loss_and_grads(), _kinks(model)
            flat[i] = old
            if _same(base, side_plus) and _same(base, side_minus):   # no kink crossed
                checked.append(i)
                numeric.append((plus - minus) / 2e-5)
            if len(checked) == min(12, flat.size):
                break
        if len(checked) < min(6, flat.size):
            raise CheckFailed(f"whole model {key}: too few entries clear of ReLU and "
                              "max-pool kinks to check")
        compare(f"whole model, training mode with a fixed dropout mask: d{key} "
                "against finite differences", analytic[key].reshape(-1)[checked],
                np.array(numeric), tol=1e-6)


def _kinks(model):
    """Which side of every kink the last forward pass was on: each ReLU's
    active units and each max-pool's winners. Finite differences are valid
    only where a step of h crosses none of them."""
    parts = []
    for layer in model.layers:
        if hasattr(layer, "relu_cache"):
            parts.append(np.asarray(layer.relu_cache) > 0)
        if isinstance(layer, nt.MaxPooling2D):
            parts.append(np.asarray(layer.cache[1]))
    return [p.copy() for p in parts]


def _same(a, b):
    return all(np.array_equal(p, q) for p, q in zip(a, b))


# The checks in the order they run: each function first, then the whole model.
CHECKS = [
    check_dense_forward, check_dense_backward, check_relu_backward,
    check_softmax_cross_entropy, check_softmax_cross_entropy_backward,
    check_dropout_mask, check_dropout_backward, check_dropout_layer_at_inference,
    check_flatten_order, check_maxpool_forward, check_maxpool_backward,
    check_im2col, check_conv2d_forward, check_conv2d_backward,
    check_batchnorm_forward, check_batchnorm_backward,
    check_adam, check_initial_weights, check_whole_model_gradients,
]


def name(check):
    return check.__name__.removeprefix("check_")


def run(checks=CHECKS):
    """Run checks in order; return [(check name, None or the failure message)]."""
    results = []
    for check in checks:
        try:
            with np.errstate(all="ignore"):
                check()
            results.append((name(check), None))
        except CheckFailed as e:
            results.append((name(check), str(e)))
        except Exception as e:                         # a crash is a failure too
            results.append((name(check), f"raised {type(e).__name__}: {e}"))
    return results
