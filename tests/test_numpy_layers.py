"""The NumPy twin's math: fast against naive, backward against finite
differences, Adam against its rule written out. All in float64.

Tolerances and why:
- fast vs naive, 1e-10: the same sums in a different order; float64 rounding
  of sums of a few hundred terms stays near 1e-14, so 1e-10 catches any real
  mistake (a missing term is of order 1e-1) with room to spare.
- gradient checks, relative error 1e-6: centred differences with h = 1e-5
  have a truncation error of order h^2 = 1e-10 and a rounding error of order
  1e-16 / h = 1e-11; a wrong gradient is off by order 1.
"""

import numpy as np
import pytest

import common
import mnist_cnn_numpy as nn
import speedup

RNG = np.random.default_rng(1234)


def rel_error(a, b):
    """max |a - b|, relative to the largest magnitude in a and b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-300))


def numeric_grad(f, x, h=1e-5):
    """Centred finite differences of the scalar f() with respect to x (in place)."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = f()
        x[i] = old - h
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


def check(analytic, f, x, tol=1e-6):
    numeric = numeric_grad(f, x)
    err = rel_error(analytic, numeric)
    assert err < tol, f"relative error {err:.2e}"


# --- Fast against naive --------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])          # 1: the first layer's own path
def test_im2col_fast_matches_naive(channels):
    x = RNG.normal(size=(2, 7, 6, channels))
    assert np.array_equal(nn.im2col(x, 3), nn.im2col_naive(x, 3))


@pytest.mark.parametrize("channels", [1, 3])
def test_conv2d_fast_matches_naive(channels):
    x = RNG.normal(size=(2, 7, 6, channels))
    kernel, bias = RNG.normal(size=(3, 3, channels, 4)), RNG.normal(size=4)
    out, cache = nn.conv2d_forward(x, kernel, bias)
    assert out.shape == (2, 5, 4, 4)
    assert rel_error(out, nn.conv2d_forward_naive(x, kernel, bias)) < 1e-10
    dout = RNG.normal(size=out.shape)
    fast = nn.conv2d_backward(dout, cache)
    for got, want in zip(fast, nn.conv2d_backward_naive(dout, x, kernel)):
        assert got.shape == want.shape and rel_error(got, want) < 1e-10
    dx, dkernel, dbias = nn.conv2d_backward(dout, cache, need_dx=False)
    assert dx is None and rel_error(dkernel, fast[1]) < 1e-15


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (2, 5, 7, 2)])   # even and odd sizes
def test_maxpool_fast_matches_naive(shape):
    x = RNG.normal(size=shape)
    out, cache = nn.maxpool2d_forward(x)
    assert rel_error(out, nn.maxpool2d_forward_naive(x)) < 1e-10
    dout = RNG.normal(size=out.shape)
    assert rel_error(nn.maxpool2d_backward(dout, cache),
                     nn.maxpool2d_backward_naive(dout, x)) < 1e-10


def test_maxpool_ties_go_to_the_first_maximum():
    """After ReLU many windows hold several equal values (often 0)."""
    x = RNG.integers(0, 2, size=(3, 6, 6, 4)).astype(np.float64)   # ties everywhere
    out, cache = nn.maxpool2d_forward(x)
    dout = RNG.normal(size=out.shape)
    dx = nn.maxpool2d_backward(dout, cache)
    assert np.array_equal(dx, nn.maxpool2d_backward_naive(dout, x))
    # Exactly one position per window receives the gradient.
    nonzero = (dx != 0).reshape(3, 3, 2, 3, 2, 4).sum(axis=(2, 4))
    assert nonzero.max() == 1
    # A window of four equal values: its top-left position gets it all.
    x = np.ones((1, 2, 2, 1))
    dx = nn.maxpool2d_backward(np.array([[[[5.0]]]]), nn.maxpool2d_forward(x)[1])
    assert dx[0, :, :, 0].tolist() == [[5.0, 0.0], [0.0, 0.0]]


def test_dense_fast_matches_naive():
    x, kernel, bias = RNG.normal(size=(4, 6)), RNG.normal(size=(6, 3)), RNG.normal(size=3)
    out, cache = nn.dense_forward(x, kernel, bias)
    assert rel_error(out, nn.dense_forward_naive(x, kernel, bias)) < 1e-10
    dout = RNG.normal(size=out.shape)
    for got, want in zip(nn.dense_backward(dout, cache), nn.dense_backward_naive(dout, x, kernel)):
        assert rel_error(got, want) < 1e-10


def test_softmax_cross_entropy_fast_matches_naive():
    logits, labels = RNG.normal(size=(5, 10)) * 3, RNG.integers(0, 10, 5)
    loss, probs = nn.softmax_cross_entropy(logits, labels)
    naive_loss, naive_dlogits = nn.softmax_cross_entropy_naive(logits, labels)
    assert abs(loss - naive_loss) < 1e-10
    assert rel_error(nn.softmax_cross_entropy_backward(probs, labels), naive_dlogits) < 1e-10
    assert np.allclose(probs.sum(axis=1), 1) and rel_error(probs, nn.softmax(logits)) < 1e-12


def test_softmax_does_not_overflow():
    probs = nn.softmax(np.array([[1000.0, 0.0, -1000.0]]))
    assert np.all(np.isfinite(probs)) and probs[0, 0] == 1.0


# --- Backward against finite differences ------------------------------------------

def test_conv2d_gradients():
    x = RNG.normal(size=(2, 6, 5, 2))
    kernel, bias = RNG.normal(size=(3, 3, 2, 3)), RNG.normal(size=3)
    dout = RNG.normal(size=(2, 4, 3, 3))               # random upstream gradient
    dx, dkernel, dbias = nn.conv2d_backward(dout, nn.conv2d_forward(x, kernel, bias)[1])

    def f():
        return np.sum(nn.conv2d_forward(x, kernel, bias)[0] * dout)
    check(dx, f, x)
    check(dkernel, f, kernel)
    check(dbias, f, bias)


def test_relu_gradient():
    z = RNG.normal(size=(3, 4))
    z[np.abs(z) < 0.01] = 0.5                          # stay clear of the kink
    dout = RNG.normal(size=z.shape)
    out, cache = nn.relu_forward(z)
    check(nn.relu_backward(dout, cache), lambda: np.sum(nn.relu_forward(z)[0] * dout), z)


def test_maxpool_gradient():
    x = RNG.normal(size=(2, 5, 4, 3))                  # odd height: a dropped row
    out, cache = nn.maxpool2d_forward(x)
    dout = RNG.normal(size=out.shape)
    check(nn.maxpool2d_backward(dout, cache),
          lambda: np.sum(nn.maxpool2d_forward(x)[0] * dout), x)


def test_flatten_gradient():
    x = RNG.normal(size=(2, 3, 2, 2))
    out, shape = nn.flatten_forward(x)
    assert out.shape == (2, 12) and out[1, 5] == x[1, 1, 0, 1]      # channels-last order
    dout = RNG.normal(size=out.shape)
    check(nn.flatten_backward(dout, shape), lambda: np.sum(nn.flatten_forward(x)[0] * dout), x)


def test_dense_gradients():
    x, kernel, bias = RNG.normal(size=(4, 5)), RNG.normal(size=(5, 3)), RNG.normal(size=3)
    dout = RNG.normal(size=(4, 3))
    dx, dkernel, dbias = nn.dense_backward(dout, nn.dense_forward(x, kernel, bias)[1])

    def f():
        return np.sum(nn.dense_forward(x, kernel, bias)[0] * dout)
    check(dx, f, x)
    check(dkernel, f, kernel)
    check(dbias, f, bias)


def test_relu_in_place_gives_the_same_numbers():
    z, dout = RNG.normal(size=(4, 6)), RNG.normal(size=(4, 6))
    out, cache = nn.relu_forward(z)
    z2, dout2 = z.copy(), dout.copy()
    out2, _ = nn.relu_forward(z2, in_place=True)
    assert out2 is z2 and np.array_equal(out2, out)
    back2 = nn.relu_backward(dout2, cache, in_place=True)
    assert back2 is dout2 and np.array_equal(back2, nn.relu_backward(dout, cache))


def test_dropout_gradient_and_scaling():
    x = RNG.normal(size=(200, 50))
    mask = nn.dropout_mask(x.shape, 0.5, np.random.default_rng(0), x.dtype)
    out, _ = nn.dropout_forward(x, mask)
    assert set(np.unique(mask)) == {0.0, 2.0}                # kept units scaled by 1/(1-rate)
    assert abs((mask == 0).mean() - 0.5) < 0.02
    dout = RNG.normal(size=x.shape)
    xs, ms, ds = x[:3].copy(), mask[:3], dout[:3]
    check(nn.dropout_backward(ds, ms), lambda: np.sum(xs * ms * ds), xs)
    layer = nn.Dropout(0.5, np.random.default_rng(0))
    assert layer.forward(x, training=False) is x            # identity at inference


def test_loss_gradient():
    logits, labels = RNG.normal(size=(4, 10)), RNG.integers(0, 10, 4)
    _, probs = nn.softmax_cross_entropy(logits, labels)
    check(nn.softmax_cross_entropy_backward(probs, labels),
          lambda: nn.softmax_cross_entropy(logits, labels)[0], logits)


def kinks(model):
    """Which side of every kink the last forward pass was on: each ReLU's
    active units and each max-pool's winners. Finite differences are only
    valid where a step of h crosses none of them."""
    parts = []
    for layer in model.layers:
        if hasattr(layer, "relu_cache"):
            parts.append(layer.relu_cache > 0)
        if isinstance(layer, nn.MaxPooling2D):
            parts.append(layer.cache[1])
    return [p.copy() for p in parts]


def same(a, b):
    return all(np.array_equal(p, q) for p, q in zip(a, b))


WHOLE_MODEL_SEED = 0


def test_whole_model_gradients():
    """Every parameter tensor of the full network (dropout off), 20 entries each.

    With tens of thousands of ReLU units and pool windows, a step of h = 1e-5
    now and then pushes one of them across its kink, where the loss is not
    differentiable; such entries are skipped (and counted), others are checked.
    """
    # Its own random numbers, so that tests added above do not change its
    # input: one earlier draw put a conv2 unit within about 1e-6 of its ReLU
    # kink, so that nearly every step of a conv1 bias crossed it (seeds 0-7
    # of this generator were all checked and pass).
    rng = np.random.default_rng(WHOLE_MODEL_SEED)
    model = nn.build_model(dropout=0.0, seed=3, dtype="float64")
    for layer in model.layers:                              # non-zero biases too
        if "bias" in layer.params:
            layer.bias[:] = rng.normal(size=layer.bias.shape) * 0.1
    x = rng.random((2,) + model.input.shape)
    y = np.array([1, 7])
    nn.loss_and_grads(model.layers, x, y, len(x))
    base = kinks(model)

    def loss():
        return nn.softmax_cross_entropy(nn.logits(model, x), y)[0]

    for layer in model.layers:
        for name in layer.params:
            flat, grad = getattr(layer, name).reshape(-1), getattr(layer, "d" + name).reshape(-1)
            checked, numeric, skipped = [], [], 0
            for i in rng.permutation(flat.size):
                old = flat[i]
                flat[i] = old + 1e-5
                plus, kinks_plus = loss(), kinks(model)
                flat[i] = old - 1e-5
                minus, kinks_minus = loss(), kinks(model)
                flat[i] = old
                if not (same(base, kinks_plus) and same(base, kinks_minus)):
                    skipped += 1
                    continue
                checked.append(i)
                numeric.append((plus - minus) / 2e-5)
                if len(checked) == min(20, flat.size):
                    break
            assert skipped <= len(checked), f"{layer.name}/{name}: {skipped} kinks crossed"
            err = rel_error(grad[checked], numeric)
            assert err < 1e-6, f"{layer.name}/{name}: relative error {err:.2e}"


def test_threads_change_nothing_but_rounding():
    """A batch cut into slices on threads gives the loss, probabilities and
    gradients of the whole batch at once, with the same dropout masks: in
    float64 equal to rounding, whatever the number of slices."""
    x = RNG.random((3 * speedup.MIN_SLICE + 5, 28, 28, 1))
    y = RNG.integers(0, 10, len(x))
    results = []
    for threads in (1, 2, 3):
        model = nn.build_model(seed=5, dtype="float64")              # dropout on
        model.threads = threads
        assert len(speedup.slices(len(x), threads)) == threads
        loss, probs = speedup.train_in_slices(model, nn.loss_and_grads, x, y)
        grads = [g for _, _, g in model.trainable_weights()]
        results.append((loss, probs, grads, nn.logits(model, x)))
    for loss, probs, grads, logits in results[1:]:
        assert abs(loss - results[0][0]) < 1e-13
        assert rel_error(probs, results[0][1]) < 1e-13
        assert rel_error(logits, results[0][3]) < 1e-13
        for got, want in zip(grads, results[0][2]):
            assert rel_error(got, want) < 1e-12
    # Small batches are not split: one slice.
    assert speedup.slices(speedup.MIN_SLICE, 4) == [slice(0, speedup.MIN_SLICE)]


# --- Adam --------------------------------------------------------------------

def test_adam_follows_the_keras_rule():
    """Five steps on a small problem, against the rule written out by hand."""
    w = RNG.normal(size=(3, 2))
    grads = [RNG.normal(size=w.shape) for _ in range(5)]
    opt, w_opt = nn.Adam(lr=0.01), w.copy()
    m, v, w_ref = np.zeros_like(w), np.zeros_like(w), w.copy()
    b1, b2 = float(np.float32(0.9)), float(np.float32(0.999))   # Keras's float32 betas
    lr = float(np.float32(0.01))
    for t, g in enumerate(grads, start=1):
        opt.update([("w", w_opt, g)])
        m = m + (g - m) * (1 - 0.9)
        v = v + (g * g - v) * (1 - 0.999)
        alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        w_ref = w_ref - m * alpha / (np.sqrt(v) + 1e-7)
        assert rel_error(w_opt, w_ref) < 1e-15, f"step {t}"
    assert opt.iterations == 5
    # The first step of Adam moves every weight by about lr, against its gradient.
    assert np.allclose(np.abs(w - (w - 0.01 * np.sign(grads[0]))), 0.01)


def test_adam_keeps_float32():
    w = np.ones(4, np.float32)
    nn.Adam().update([("w", w, np.full(4, 0.5, np.float32))])
    assert w.dtype == np.float32


# --- The model ---------------------------------------------------------------

def test_model_builds_from_its_declaration():
    """Every layer's weights and output shape are inferred from the input
    shape, as in Keras: running the layers gives exactly the shapes that
    build() worked out, and the parameter count is the weights' sizes."""
    model = nn.build_model(seed=0)
    weights = model.get_weights()
    assert list(weights) == list(model.weight_shapes())
    assert model.count_params() == sum(w.size for w in weights.values())
    x = RNG.random((2,) + model.input.shape).astype(np.float32)
    out = x
    for layer in model.layers:
        assert layer.input_shape == out.shape[1:]
        out = layer.forward(out)
        assert out.shape == (2,) + layer.output_shape and out.dtype == np.float32
    nn.loss_and_grads(model.layers, x, np.array([0, 1]), 2)
    for key, w, g in model.trainable_weights():
        assert g.shape == w.shape and g.dtype == np.float32, key


def test_editing_a_layer_changes_the_network():
    """The declaration is the network: other filters and units give other
    weights, and nothing else needs changing (the default network's
    build_model with two numbers edited, written out here)."""
    model = nn.Sequential([
        nn.Input(shape=(28, 28, 1)),
        nn.Conv2D(16, 3, activation="relu", name="conv1"),
        nn.MaxPooling2D(2, name="pool1"),
        nn.Flatten(name="flatten"),
        nn.Dense(64, activation="relu", name="dense1"),
        nn.Dense(10, activation="softmax", name="dense2"),
    ])
    shapes = model.weight_shapes()
    assert shapes["conv1/kernel"][-1] == 16 and shapes["dense1/kernel"][-1] == 64
    assert shapes["dense1/kernel"][0] == int(np.prod(model.layers[1].output_shape))
    x = RNG.random((3,) + model.input.shape)
    assert nn.logits(model, x).shape == (3,) + model.layers[-1].output_shape


def test_a_network_must_end_in_softmax():
    with pytest.raises(ValueError, match="softmax"):
        nn.Sequential([nn.Input(shape=(4, 4, 1)), nn.Flatten(), nn.Dense(3)])
    with pytest.raises(ValueError, match="Flatten"):
        nn.Sequential([nn.Input(shape=(4, 4, 1)), nn.Dense(3, activation="softmax")])


def test_initial_weights_are_glorot_uniform():
    shapes = nn.build_model().weight_shapes()
    w = common.initial_weights(shapes, 0)
    kernels = [key for key in shapes if key.endswith("/kernel")]
    for key in kernels:
        shape = shapes[key]
        receptive = int(np.prod(shape[:-2]))
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        limit = np.sqrt(6 / (fan_in + fan_out))
        assert w[key].shape == shape and np.abs(w[key]).max() <= limit
        if w[key].size > 1000:            # enough numbers for the statistics
            # U(-a, a) has standard deviation a / sqrt(3)
            assert abs(w[key].std() - limit / np.sqrt(3)) < 0.02 * limit, key
    assert not any(w[key].any() for key in shapes if key.endswith("/bias"))
    again, other = common.initial_weights(shapes, 0), common.initial_weights(shapes, 1)
    assert all(np.array_equal(w[k], again[k]) for k in kernels)
    assert not any(np.array_equal(w[k], other[k]) for k in kernels)


def test_predict_and_evaluate_in_batches():
    model = nn.build_model(seed=0)
    x = RNG.random((25, 28, 28, 1)).astype(np.float32)
    y = RNG.integers(0, 10, 25)
    whole = nn.evaluate(model, x, y, batch_size=25)
    pieces = nn.evaluate(model, x, y, batch_size=7)
    assert abs(whole[0] - pieces[0]) < 1e-5 and whole[1] == pieces[1]
    assert np.allclose(nn.predict(model, x, batch_size=4), whole[2], atol=1e-6)
