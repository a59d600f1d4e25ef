"""Named checks of the NumPy twin's math and of every speed-up, each with a
message a learner reads.

Every lesson check runs one piece of mnist_cnn_numpy.py (or batchnorm.py,
or common.glorot_uniform) on small random inputs and compares it with
something written independently of it: the slow loop version beside it
(the algorithmic reference), centred finite differences (float64), the
definition in the docstring, statistics of what Keras does, or Adam as the
paper writes it. Every machine check (check_fast_...) runs one drop-in of
speedup.py against the lesson function it replaces. A check that fails
raises CheckFailed with where it happened (function, tensor) and what kind
of difference it is (shape, sign, scale, only where windows overlap, only
at ties, or one of the classic mistakes of bug_gallery.py by name).

Checks look the functions up in their modules when they run, so whatever
is there at that moment is what gets checked: the twin's own code in the
tests, a planted mistake in bug_gallery.py, a learner's function in
exercises.py.

    python -m pytest tests/test_checks.py   # every check passes
    python bug_gallery.py                   # every classic mistake is caught
"""

import numpy as np

import batchnorm as bn
import mnist_cnn_numpy as nt
import speedup
from helpers import common

DTYPE = np.float64         # checks run in float64: rounding stays near 1e-15


class CheckFailed(AssertionError):
    """A check found a difference; the message says where and what kind."""


# -----------------------------------------------------------------------------
# The registry: which functions each check is for
# -----------------------------------------------------------------------------

CHECKS = []                # in the order they run: each function, then the whole


def check(*subjects):
    """Register a check for the functions it checks ("conv2d_backward",
    "Adam.update", "speedup.conv2d_backward", ...): exercises.py runs a
    function's checks when the learner checks it."""
    def register(function):
        function.subjects = subjects
        CHECKS.append(function)
        return function
    return register


def checks_for(subject):
    return [c for c in CHECKS if subject in c.subjects]


def name(check_function):
    return check_function.__name__.removeprefix("check_")


def run(checks=None, until_one_fails=False):
    """Run checks in order; return [(check name, None or the failure message)]
    (only up to the first failure, if until_one_fails)."""
    results = []
    for check_function in CHECKS if checks is None else checks:
        try:
            with np.errstate(all="ignore"):
                check_function()
            results.append((name(check_function), None))
        except CheckFailed as e:
            results.append((name(check_function), str(e)))
        except Exception as e:                         # a crash is a failure too
            results.append((name(check_function), f"raised {type(e).__name__}: {e}"))
        if until_one_fails and results[-1][1]:
            break
    return results


def mistakes_like(target, output):
    """[(what that mistake gives, its diagnosis)] for each classic mistake of
    bug_gallery.py in `target` that has a diagnosis: output(variant) runs the
    mistaken variant on the check's own inputs. A result that equals one of
    them is named by it."""
    import bug_gallery                  # the one table of mistakes (it imports this module)
    found = []
    for m in bug_gallery.MISTAKES:
        if m.name == target and m.diagnosis:
            with np.errstate(all="ignore"):
                found.append((output(m.variant), m.diagnosis))
    return found


# -----------------------------------------------------------------------------
# Comparing arrays, with a diagnosis
# -----------------------------------------------------------------------------

def rel_error(a, b):
    """max |a - b| relative to the largest magnitude in b (the expected one)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


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
        if abs(s) > 1e-12 and abs(s - 1) > 1e-6 and np.allclose(g, s * w, rtol=1e-6,
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


def numeric_grad(f, x, h=1e-5, entries=None):
    """Centred finite differences of the scalar f() with respect to x (in
    place): of every entry, or of `entries` of them (indices), the rest 0."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape) if entries is None else entries:
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
    the definition of the forward one. Of a large tensor, 40 entries drawn
    at random are checked (the naive forward is slow)."""
    rng = np.random.default_rng(7)
    for name, grad, x in zip(names, grads, inputs):
        every = list(np.ndindex(x.shape))
        entries = every if len(every) <= 40 else [every[i] for i in
                                                  rng.choice(len(every), 40, replace=False)]
        rows = tuple(np.array(index) for index in zip(*entries))
        if np.shape(grad) != x.shape:
            compare(f"{function}: {name}", grad, x)          # the shape message
        compare(f"{function}: {name} against finite differences", np.asarray(grad)[rows],
                numeric_grad(lambda: float(loss()), x, entries=entries)[rows], tol=1e-6)


def overlap_mask(x_shape, K):
    """True for each input pixel that K x K windows (stride 1) share with
    other windows: the pixels col2im must *add* several gradients into."""
    N, H, W, C = x_shape
    count = np.zeros((H, W))
    for i in range(H - K + 1):
        for j in range(W - K + 1):
            count[i:i + K, j:j + K] += 1
    return np.broadcast_to((count > 1)[None, :, :, None], x_shape)


def tie_mask(x):
    """True for each input in a 2 x 2 window that holds its maximum more than once."""
    N, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    windows = x[:, :2 * Ho, :2 * Wo].reshape(N, Ho, 2, Wo, 2, C)
    tied = (windows == windows.max(axis=(2, 4), keepdims=True)).sum(axis=(2, 4)) > 1
    mask = np.zeros(x.shape, bool)
    mask[:, :2 * Ho, :2 * Wo] = np.repeat(np.repeat(tied, 2, axis=1), 2, axis=2)
    return mask


OVERLAP = "where windows overlap: col2im must add each window's share, not assign it"
TIES = ("at ties (windows with several equal maxima): only the first maximum in reading "
        "order gets the gradient, as in TensorFlow (which one won is decided in "
        "maxpool2d_forward)")


# -----------------------------------------------------------------------------
# The lesson's checks, one per function or idea, in the lesson's order
# -----------------------------------------------------------------------------
# Each takes no arguments, draws its own inputs from a fixed seed, and
# returns nothing when all is well.

def _rng():
    return np.random.default_rng(20)


def _dense_inputs():
    rng = _rng()
    return rng.normal(size=(4, 6)), rng.normal(size=(6, 3)), rng.normal(size=3), \
        rng.normal(size=(4, 3))


@check("dense_forward")
def check_dense_forward():
    x, kernel, bias, dout = _dense_inputs()
    out, _ = nt.dense_forward(x, kernel, bias)
    compare("dense_forward: out", out, nt.dense_naive(x, kernel, bias, dout)[0])


@check("dense_backward")
def check_dense_backward():
    x, kernel, bias, dout = _dense_inputs()
    _, cache = nt.dense_forward(x, kernel, bias)
    got = nt.dense_backward(dout, cache)
    for name_, g, w in zip(("dx", "dkernel", "dbias"), got,
                           nt.dense_naive(x, kernel, bias, dout)[1:]):
        compare(f"dense_backward: {name_}", g, w)
    _against_finite_differences("dense_backward", got, (x, kernel, bias),
                                lambda: np.sum(nt.dense_naive(x, kernel, bias, dout)[0] * dout))


@check("relu_backward")
def check_relu_backward():
    rng = _rng()
    z = rng.normal(size=(5, 7))
    z[np.abs(z) < 0.01] = 0.5                    # clear of the kink
    dout = rng.normal(size=z.shape)
    out, cache = nt.relu_forward(z.copy())
    got = nt.relu_backward(dout.copy(), cache)
    off = z <= 0
    compare("relu_backward: dz", got, dout * (z > 0),
            lookalikes=mistakes_like("relu_backward", lambda f: f(dout.copy(), cache.copy())),
            patterns=[(off, "where the unit was off (z <= 0): no gradient may pass there"),
                      (~off, "where the unit was on (z > 0): the gradient passes unchanged")])
    _against_finite_differences("relu_backward", [got], [z],
                                lambda: np.sum(np.maximum(z, 0) * dout), names=["dz"])


@check("softmax_cross_entropy")
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


@check("softmax_cross_entropy_backward")
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


@check("dropout_mask")
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


@check("dropout_backward")
def check_dropout_backward():
    rng = _rng()
    x = rng.normal(size=(6, 8))
    mask = nt.dropout_mask(x.shape, 0.5, np.random.default_rng(3), DTYPE)
    dout = rng.normal(size=x.shape)
    got = nt.dropout_backward(dout.copy(), mask)
    dropped = mask == 0
    compare("dropout_backward: dx", got, dout * mask,
            lookalikes=mistakes_like("dropout_backward", lambda f: f(dout.copy(), mask)),
            patterns=[(dropped, "where units were dropped: the mask stops their gradient too"),
                      (~dropped, "where units were kept: multiply by the mask's 1/(1 - rate)")])


@check("Dropout.forward")
def check_dropout_layer_at_inference():
    x = _rng().normal(size=(4, 8))
    layer = nt.Dropout(0.5)
    layer.rng = np.random.default_rng(0)
    out = layer.forward(x.copy(), training=False)
    compare("Dropout.forward(training=False)", out, x,
            patterns=[(np.ones(x.shape, bool), "at inference: dropout must do nothing then")])


@check("flatten_forward")
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


@check("maxpool2d_forward")
def check_maxpool_forward():
    for ties in (False, True):
        x = _pool_inputs(ties)
        out, _ = nt.maxpool2d_forward(x)
        want = nt.maxpool2d_naive(x, np.zeros((x.shape[0], x.shape[1] // 2,
                                               x.shape[2] // 2, x.shape[3])))[0]
        compare("maxpool2d_forward: out", out, want)


@check("maxpool2d_backward")
def check_maxpool_backward():
    for ties in (False, True):
        x = _pool_inputs(ties)
        out, cache = nt.maxpool2d_forward(x)
        dout = _rng().normal(size=np.shape(out))
        got = nt.maxpool2d_backward(dout, cache)
        compare("maxpool2d_backward: dx" + (" (windows with equal maxima)" if ties else ""),
                got, nt.maxpool2d_naive(x, dout)[1], patterns=[(tie_mask(x), TIES)],
                lookalikes=mistakes_like("maxpool2d_backward", lambda f: f(dout, cache)))
        if not ties:                  # finite differences need one clear maximum per window
            _against_finite_differences(
                "maxpool2d_backward", [got], [x], names=["dx"],
                loss=lambda: np.sum(nt.maxpool2d_naive(x, dout)[0] * dout))


@check("im2col")
def check_im2col():
    rng = _rng()
    for C in (1, 3):
        x = rng.normal(size=(2, 5, 6, C))
        compare(f"im2col: cols (C = {C})", nt.im2col(x, 3), nt.im2col_naive(x, 3),
                lookalikes=mistakes_like("im2col", lambda f: f(x, 3)))


@check("col2im")
def check_col2im():
    """col2im against one window at a time, and as im2col's transpose:
    sum(im2col(x) * dcols) = sum(x * col2im(dcols)) for any x and dcols."""
    rng = _rng()
    x_shape, K = (2, 5, 6, 3), 3
    dcols = rng.normal(size=(2 * 3 * 4, K * K * 3))
    want, row = np.zeros(x_shape), 0
    for n in range(2):
        for i in range(3):
            for j in range(4):
                want[n, i:i + K, j:j + K, :] += dcols[row].reshape(K, K, 3)
                row += 1
    got = nt.col2im(dcols, x_shape, K)
    compare("col2im: dx", got, want, patterns=[(overlap_mask(x_shape, K), OVERLAP)])
    x = rng.normal(size=x_shape)
    compare("col2im: as im2col's transpose, sum(x * col2im(dcols))", np.sum(x * got),
            np.sum(nt.im2col_naive(x, K) * dcols))


def _conv_inputs(C):
    rng = _rng()
    x = rng.normal(size=(2, 6, 5, C))
    kernel, bias = rng.normal(size=(3, 3, C, 4)), rng.normal(size=4)
    return x, kernel, bias, rng.normal(size=(2, 4, 3, 4))


@check("conv2d_forward")
def check_conv2d_forward():
    for C in (1, 3):
        x, kernel, bias, dout = _conv_inputs(C)
        out, _ = nt.conv2d_forward(x, kernel, bias)
        compare(f"conv2d_forward: out (C = {C})", out, nt.conv2d_naive(x, kernel, bias, dout)[0],
                lookalikes=mistakes_like("conv2d_forward", lambda f: f(x, kernel, bias)[0]))


@check("conv2d_backward")
def check_conv2d_backward():
    x, kernel, bias, dout = _conv_inputs(3)
    out, cache = nt.conv2d_forward(x, kernel, bias)
    got = nt.conv2d_backward(dout, cache)
    want = nt.conv2d_naive(x, kernel, bias, dout)[1:]
    patterns = {"dx": [(overlap_mask(x.shape, 3), OVERLAP)]}
    for name_, g, w in zip(("dx", "dkernel", "dbias"), got, want):
        compare(f"conv2d_backward: {name_}", g, w, patterns=patterns.get(name_, ()))
    _against_finite_differences(
        "conv2d_backward", got, (x, kernel, bias),
        lambda: np.sum(nt.conv2d_naive(x, kernel, bias, dout)[0] * dout))


def _batchnorm_inputs(shape):
    rng = _rng()
    return (rng.normal(size=shape) * 3 + 1, rng.normal(size=shape[-1]),
            rng.normal(size=shape[-1]), rng.normal(size=shape))


@check("batchnorm_forward")
def check_batchnorm_forward():
    """Batch normalisation after a dense layer (N, D) and after a conv layer
    (N, H, W, C, normalised over N, H, W), against the loop reference."""
    for shape in ((6, 5), (2, 3, 4, 5)):
        x, gamma, beta, _ = _batchnorm_inputs(shape)
        out, _, mean, var = bn.batchnorm_forward(x, gamma, beta)
        compare(f"batchnorm_forward: out for x of shape {shape}", out,
                bn.batchnorm_forward_naive(x, gamma, beta))
        axes = tuple(range(x.ndim - 1))
        compare("batchnorm_forward: the batch mean", mean, x.mean(axis=axes))
        compare("batchnorm_forward: the batch variance (divided by M, as Keras)", var,
                x.var(axis=axes))


@check("batchnorm_backward")
def check_batchnorm_backward():
    """dx, dgamma, dbeta against the loop reference (the chain rule written
    out pair by pair) and against finite differences."""
    for shape in ((6, 5), (2, 3, 4, 5)):
        x, gamma, beta, dout = _batchnorm_inputs(shape)
        _, cache, _, _ = bn.batchnorm_forward(x, gamma, beta)
        got = bn.batchnorm_backward(dout, cache)
        want = bn.batchnorm_backward_naive(dout, x, gamma)
        compare(f"batchnorm_backward: dx for x of shape {shape}", got[0], want[0],
                lookalikes=mistakes_like("batchnorm_backward",
                                         lambda f: f(dout, cache)[0]))
        compare("batchnorm_backward: dgamma", got[1], want[1])
        compare("batchnorm_backward: dbeta", got[2], want[2])
        _against_finite_differences(
            "batchnorm_backward", got, (x, gamma, beta), names=("dx", "dgamma", "dbeta"),
            loss=lambda: np.sum(bn.batchnorm_forward_naive(x, gamma, beta) * dout))


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


def _adam_steps(update, w0, grads):
    """w after each of the steps, with `update` as Adam.update (lr 0.01)."""
    optimizer, w, out = nt.Adam(lr=0.01), w0.copy(), []
    for g in grads:
        update(optimizer, [("w", w, g.copy())])
        out.append(w.copy())
    return out


@check("Adam.update")
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
        got = _adam_steps(nt.Adam.update, w0, grads)
        others = mistakes_like("Adam.update", lambda f: _adam_steps(f, w0, grads))
        for t in (1, 10):
            compare(f"Adam.update: the change of the weights after step {t} ({words})",
                    got[t - 1] - w0, want[t - 1] - w0, tol=1e-4,
                    lookalikes=[(steps[t - 1] - w0, words_) for steps, words_ in others])


@check("glorot_uniform")
def check_initial_weights():
    """Statistics of the starting weights against Keras's initialisers:
    GlorotUniform kernels, U(-limit, limit) with limit = sqrt(6 / (fan_in +
    fan_out)), fan_in = K*K*C and fan_out = K*K*F for a conv kernel (Keras's
    documented formula); zero biases."""
    shapes = nt.build_model().weight_shapes()
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


@check("the whole network")
def check_whole_model_gradients(dropout=0.5):
    """Every weight tensor of the network (a few entries each) against
    centred finite differences of the loss, in training mode with one fixed
    dropout mask (the dropout layer's random stream starts afresh for every
    evaluation of the loss, so it draws the same mask each time)."""
    rng = np.random.default_rng(0)
    model = nt.build_model(dropout=dropout, seed=3, dtype="float64")
    for layer in model.layers:
        if "bias" in layer.params:
            layer.bias[:] = rng.normal(size=layer.bias.shape) * 0.1   # non-zero biases too
    x, y = rng.random((2,) + model.input.shape), np.array([1, 7])

    def loss_and_grads():
        for layer in model.layers:
            layer.rng = np.random.default_rng(11)
        return nt.loss_and_grads(model.layers, x, y)[0]

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


# -----------------------------------------------------------------------------
# The machine's checks: each drop-in of speedup.py against the lesson's
# -----------------------------------------------------------------------------
# Float64 inputs, so that rounding stays near 1e-15: a drop-in that sums in
# another order is within 1e-12 of the lesson (FAST_TOL); one that copies or
# routes the same numbers is exactly equal.

FAST_TOL = 1e-12


@check("speedup.im2col_with_ones")
def check_fast_im2col():
    """im2col_with_ones(x, K) is the lesson's im2col(x, K) with a column of
    ones after it, exactly: for one channel (its own path) and for three."""
    rng = _rng()
    for C in (1, 3):
        x = rng.normal(size=(2, 5, 6, C))
        want = np.concatenate([nt.im2col(x, 3), np.ones((2 * 3 * 4, 1))], axis=1)
        compare(f"speedup.im2col_with_ones: cols (C = {C}) against the lesson's im2col",
                speedup.im2col_with_ones(x, 3), want, tol=0,
                lookalikes=mistakes_like("speedup.im2col_with_ones", lambda f: f(x, 3)))


@check("speedup.conv2d_forward", "speedup.conv2d_backward")
def check_fast_conv2d():
    """The fast conv2d pair against the lesson's: out, dx, dkernel, dbias
    (to FAST_TOL: the bias is added inside the product, dx in other sums),
    and need_dx=False, the first layer's, gives no dx and the same rest."""
    for C in (1, 3):
        x, kernel, bias, dout = _conv_inputs(C)
        out, cache = speedup.conv2d_forward(x, kernel, bias)
        want_out, want_cache = nt.conv2d_forward(x, kernel, bias)
        compare(f"speedup.conv2d_forward: out (C = {C}) against the lesson's", out, want_out,
                tol=FAST_TOL)
        got, want = speedup.conv2d_backward(dout, cache), nt.conv2d_backward(dout, want_cache)
        patterns = {"dx": [(overlap_mask(x.shape, 3), OVERLAP)]}
        for name_, g, w in zip(("dx", "dkernel", "dbias"), got, want):
            compare(f"speedup.conv2d_backward: {name_} (C = {C}) against the lesson's", g, w,
                    tol=FAST_TOL, patterns=patterns.get(name_, ()))
        skipped = speedup.conv2d_backward(dout, cache, need_dx=False)
        if skipped[0] is not None:
            raise CheckFailed("speedup.conv2d_backward(need_dx=False): dx should be None "
                              "(the first layer's input gradient is never used)")
        compare("speedup.conv2d_backward(need_dx=False): dkernel", skipped[1], want[1],
                tol=FAST_TOL)


@check("speedup.maxpool2d_forward", "speedup.maxpool2d_backward")
def check_fast_maxpool2d():
    """The fast max-pool pair against the lesson's, exactly (the same numbers
    are routed), with windows that tie and with an odd row and column."""
    for ties in (False, True):
        x = _pool_inputs(ties)
        out, cache = speedup.maxpool2d_forward(x)
        want_out, want_cache = nt.maxpool2d_forward(x)
        compare("speedup.maxpool2d_forward: out against the lesson's", out, want_out, tol=0)
        dout = _rng().normal(size=want_out.shape)
        compare("speedup.maxpool2d_backward: dx against the lesson's"
                + (" (windows with equal maxima)" if ties else ""),
                speedup.maxpool2d_backward(dout, cache),
                nt.maxpool2d_backward(dout, want_cache), tol=0,
                patterns=[(tie_mask(x), TIES)])


def _conv_pool_pair(x_shape, C, K, rng):
    """A lesson Conv2D(relu) and MaxPooling2D(2), built, with random weights
    and a bias that turns many units off."""
    layers = [nt.Conv2D(4, K, activation="relu"), nt.MaxPooling2D(2)]
    shape = x_shape[1:]
    for layer in layers:
        shape = layer.output_shape = layer.build(shape, DTYPE)
    layers[0].kernel[...] = rng.normal(size=layers[0].kernel.shape)
    layers[0].bias[...] = rng.normal(size=4) - 0.5
    return layers


@check("speedup.conv_pool_forward", "speedup.conv_pool_backward", "speedup.shifted_images",
       "speedup.winograd_tiles", "speedup.winograd_corners", "speedup.winograd_backward",
       "speedup.InPlaceReLU", "speedup.FastConv2D", "speedup.FastMaxPooling2D")
def check_fast_conv_pool():
    """Conv2D(relu) then MaxPooling2D(2), as one layer of the slices (im2col
    in pooling-window order, the ReLU after the pooling; Winograd's
    algorithm for 3 x 3 kernels over many channels, in blocks of images)
    against the lesson's two layers: the output, dx, dkernel and dbias, to
    FAST_TOL, for one to three input channels, odd and even sizes, images
    with flat parts and with parts that do not change down a column or along
    a row (where corners of a window tie, and the first must win, as in the
    lesson), and blocks of two images and of one (the last)."""
    rng = _rng()
    saved = speedup.WINOGRAD_BLOCK
    for x_shape, K in (((2, 9, 8, 3), 3), ((2, 10, 11, 1), 3), ((2, 8, 8, 2), 2),
                       ((2, 12, 12, 3), 3), ((3, 14, 13, 2), 3), ((2, 9, 10, 1), 2)):
        x = rng.normal(size=x_shape)
        if x_shape[1] == 12:
            x[:, 2:10, 1:9] = 0.5                                    # flat: ties everywhere
        if x_shape[1] == 14:
            x[:, 1:13, 0:7] = rng.normal(size=(1, 1, 7, 2))          # the same down a column
            x[:, 0:7, 7:13] = rng.normal(size=(1, 7, 1, 2))          # the same along a row
            # two images a block: 3 images make a block of 2 and one of 1
            speedup.WINOGRAD_BLOCK = 2 * ((x_shape[1] - 2) // 2) * ((x_shape[2] - 2) // 2)
        try:
            _conv_pool_against_the_lesson(x, K, rng)
        finally:
            speedup.WINOGRAD_BLOCK = saved


def _conv_pool_against_the_lesson(x, K, rng):
    """One case of check_fast_conv_pool."""
    x_shape = x.shape
    layers = _conv_pool_pair(x_shape, x_shape[3], K, rng)
    ((conv, pool),), _ = speedup.fast_copies(layers, [slice(0, len(x))], training=True)
    conv.first = False
    if not (conv.pooled and pool.in_conv):
        raise CheckFailed("speedup.fast_copies: a Conv2D followed by MaxPooling2D(2) "
                          "should become one layer (pooled)")
    where = f"speedup.conv_pool (x {x_shape}, {K} x {K} kernel)"
    out = nt.forward(layers, x, training=True)
    compare(f"{where}: out", nt.forward([conv, pool], x, training=True), out, tol=FAST_TOL)
    dout = rng.normal(size=out.shape)
    want = [layers[0].backward(layers[1].backward(dout)), layers[0].dkernel,
            layers[0].dbias]
    got = [conv.backward(pool.backward(dout.copy())), conv.dkernel, conv.dbias]
    others = mistakes_like("speedup.conv_pool_backward", lambda f: f(dout, conv.cache)[0])
    patterns = {"dx": [(overlap_mask(x_shape, K), OVERLAP)]}
    for name_, g, w in zip(("dx", "dkernel", "dbias"), got, want):
        compare(f"{where}: {name_}", g, w, tol=FAST_TOL, patterns=patterns.get(name_, ()),
                lookalikes=others if name_ == "dx" else ())


def _fast_model(dtype, layers=None, seed=5):
    """The default network, or these layers, with non-zero biases."""
    model = nt.build_model(seed=seed, dtype=dtype) if layers is None else \
        nt.Sequential(layers, seed=seed, dtype=dtype)
    for layer in model.layers:
        if "bias" in layer.params:
            layer.bias[...] = np.linspace(-0.05, 0.05, layer.bias.size)
    return model


def _slices_against_the_lesson(where, make_model, x, y, runs, dtype):
    """train_in_slices on fresh models for each (threads, slice size) of runs
    against the lesson's loss_and_grads on the whole batch: loss, probs,
    every gradient (and its float type), and the kept weights; with more
    than one thread, once on threads and once with helper processes
    (speedup.PROCESSES), wherever the network lets them be used. Float64:
    FAST_TOL; float32: the twin proof's tolerances (1e-5 forward, 1e-4
    gradients), as the slices add their gradients in another order."""
    forward_tol, grad_tol = (FAST_TOL, FAST_TOL) if dtype == "float64" else (1e-5, 1e-4)
    lesson = make_model()
    loss, probs = nt.loss_and_grads(lesson.layers, x, y)
    want = {key: g for key, _, g in lesson.trainable_weights()}

    def one_run(threads, size, processes):
        def in_slices(share_backward=None):
            model = make_model()
            saved = (speedup.SLICE, speedup.ShareOfBatch.backward, speedup.PROCESSES)
            speedup.SLICE, speedup.PROCESSES = size, processes
            speedup.ShareOfBatch.backward = share_backward or saved[1]
            try:
                result = speedup.train_in_slices(nt, model.layers, x, y, threads)
                used = bool(speedup._HELPERS) and speedup._HELPERS[0].layers is model.layers
            finally:
                speedup.SLICE, speedup.ShareOfBatch.backward, speedup.PROCESSES = saved
                speedup.close_processes()
            return model, result, used
        model, (got_loss, got_probs), used = in_slices()
        if processes and not used and not any(layer.state for layer in model.layers):
            raise CheckFailed(f"{where}: with speedup.PROCESSES on, {threads} threads and a "
                              "network with no running state, no helper process was used")
        others = mistakes_like("speedup.ShareOfBatch.backward", lambda f: {
            key: g for key, _, g in in_slices(f)[0].trainable_weights()})
        saved, speedup.SLICE = speedup.SLICE, size
        count = len(speedup.training_slices(model.layers, len(x), threads))
        speedup.SLICE = saved
        how = (f"{threads} slices, {threads - 1} in helper processes" if used else
               f"{count} slices on {threads} thread{'s' if threads > 1 else ''}")
        compare(f"{where} ({how}): the loss", got_loss, loss, tol=forward_tol)
        compare(f"{where} ({how}): probs", got_probs, probs, tol=forward_tol)
        for key, _, g in model.trainable_weights():
            if g.dtype != np.dtype(dtype):
                raise CheckFailed(f"{where} ({how}): d{key} is {g.dtype} in a {dtype} model: "
                                  "a NumPy float64 number multiplied into a float32 array "
                                  "makes it float64 (and twice as slow); use a Python float")
            compare(f"{where} ({how}): d{key}", g, want[key], tol=grad_tol,
                    lookalikes=[(grads[key], words) for grads, words in others])
        for key, value in lesson.get_weights().items():
            compare(f"{where} ({how}): the kept weight {key}", model.get_weights()[key], value,
                    tol=forward_tol)

    for threads, size in runs:
        for processes in (False, True) if threads > 1 else (False,):
            one_run(threads, size, processes)


@check("speedup.train_in_slices", "speedup.ShareOfBatch", "speedup.fast_copies",
       "speedup.SliceProcesses")
def check_fast_slices():
    """loss_and_grads in slices against the lesson's on the whole batch,
    dropout on (the same mask, drawn for the batch): 2 or 3 slices on 1 to 3
    threads, or on helper processes, float64; and a float32 model keeps
    float32 gradients."""
    x = _rng().random((3 * speedup.MIN_SLICE + 5, 28, 28, 1))       # 53 examples
    y = _rng().integers(0, 10, len(x))
    runs = [(1, 26), (2, 16), (3, 32)]
    _slices_against_the_lesson("speedup.train_in_slices", lambda: _fast_model("float64"),
                               x, y, runs, "float64")
    _slices_against_the_lesson("speedup.train_in_slices", lambda: _fast_model("float32"),
                               x.astype(np.float32), y, [(2, 16)], "float32")


@check("speedup.BatchNormOverSlices", "speedup.batchnorm_forward", "speedup.batchnorm_backward")
def check_fast_batchnorm():
    """A network with batch normalization after a conv and a dense layer, in
    slices (each normalised with the whole batch's statistics) against the
    lesson on the whole batch: loss, gradients, moving statistics."""
    def make():
        return _fast_model("float64", [
            nt.Input(shape=(10, 10, 1)), nt.Conv2D(4, 3, activation="relu"),
            bn.BatchNormalization(), nt.MaxPooling2D(2), nt.Flatten(),
            nt.Dense(8, activation="relu"), bn.BatchNormalization(), nt.Dropout(0.3),
            nt.Dense(10, activation="softmax")])
    x, y = _rng().random((41, 10, 10, 1)), _rng().integers(0, 10, 41)
    _slices_against_the_lesson("speedup.train_in_slices with batch normalization", make,
                               x, y, [(2, 21), (3, 14)], "float64")


@check("speedup.logits_in_slices", "speedup.SliceProcesses")
def check_fast_logits():
    """Inference in slices, on threads and with a helper process, against the
    lesson's logits."""
    model = _fast_model("float64")
    x = _rng().random((3 * speedup.MIN_SLICE + 5, 28, 28, 1))
    want = nt.logits(model, x)
    for processes in (False, True):
        saved, speedup.PROCESSES = speedup.PROCESSES, processes
        try:
            got = speedup.logits_in_slices(nt, model, x, 2)
            used = bool(speedup._HELPERS)
        finally:
            speedup.PROCESSES = saved
            speedup.close_processes()
        if processes and not used:
            raise CheckFailed("speedup.logits_in_slices: with speedup.PROCESSES on and 2 "
                              "threads, no helper process was used")
        how = "a helper process" if used else "threads"
        compare(f"speedup.logits_in_slices ({how}): the logits", got, want, tol=FAST_TOL)
