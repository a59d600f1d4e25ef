"""The NumPy twin beyond its layer functions: details of max-pool ties,
in-place ReLU, the first layer's skipped dx, threads, Adam's first step and
the model built from its declaration. The layer functions themselves are
checked in checks.py (run by tests/test_checks.py)."""

import numpy as np
import pytest

import mnist_cnn_numpy as nn
import speedup

RNG = np.random.default_rng(1234)


def rel_error(a, b):
    """max |a - b|, relative to the largest magnitude in a and b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-300))


# The checks of every layer function against its naive reference and
# against finite differences are in checks.py (tests/test_checks.py runs
# them); here are the details they do not cover.

def test_conv2d_backward_can_skip_dx():
    """The first layer needs no dx: need_dx=False gives the same dkernel."""
    x = RNG.normal(size=(2, 7, 6, 3))
    kernel, bias = RNG.normal(size=(3, 3, 3, 4)), RNG.normal(size=4)
    out, cache = nn.conv2d_forward(x, kernel, bias)
    dout = RNG.normal(size=out.shape)
    dx, dkernel, dbias = nn.conv2d_backward(dout, cache, need_dx=False)
    full = nn.conv2d_backward(dout, cache)
    assert dx is None and np.array_equal(dkernel, full[1]) and np.array_equal(dbias, full[2])


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


def test_relu_in_place_gives_the_same_numbers():
    z, dout = RNG.normal(size=(4, 6)), RNG.normal(size=(4, 6))
    out, cache = nn.relu_forward(z)
    z2, dout2 = z.copy(), dout.copy()
    out2, _ = nn.relu_forward(z2, in_place=True)
    assert out2 is z2 and np.array_equal(out2, out)
    back2 = nn.relu_backward(dout2, cache, in_place=True)
    assert back2 is dout2 and np.array_equal(back2, nn.relu_backward(dout, cache))


def test_threads_change_nothing_but_rounding(monkeypatch):
    """A batch cut into slices on threads gives the loss, probabilities and
    gradients of the whole batch at once, with the same dropout masks: in
    float64 equal to rounding, whatever the number of threads and slices."""
    x = RNG.random((3 * speedup.MIN_SLICE + 5, 28, 28, 1))              # 53 examples
    y = RNG.integers(0, 10, len(x))
    results = []
    # (threads, slice size) -> slices: (1, 53) -> 1; (1, 26) -> 2 one after
    # the other; (2, 16) -> 3 on 2 threads; (3, 32) -> 3 at once.
    for threads, size, count in [(1, 53, 1), (1, 26, 2), (2, 16, 3), (3, 32, 3)]:
        monkeypatch.setattr(speedup, "SLICE", size)
        assert len(speedup.slices(len(x), threads)) == count
        model = nn.build_model(seed=5, dtype="float64")              # dropout on
        model.threads = threads
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
# Adam against the paper's algorithm: checks.check_adam; against Keras's own
# Adam: tests/test_twins.py.

def test_adam_first_step_moves_each_weight_by_lr():
    """At step 1, m = (1 - b1) g and v = (1 - b2) g^2, so the bias-corrected
    step is lr * g / (|g| + eps / sqrt(1 - b2)): every weight moves by lr
    against the sign of its gradient, whatever the gradient's size, as long
    as |g| is far above eps / sqrt(1 - b2) = 3.2e-6. For |g| from 0.1 to
    1000 the step is lr within 3.2e-5 of itself (tolerance 1e-4)."""
    w = RNG.normal(size=(4, 5))
    g = RNG.choice([-1.0, 1.0], size=w.shape) * np.logspace(-1, 3, w.size).reshape(w.shape)
    before = w.copy()
    nn.Adam(lr=0.01).update([("w", w, g)])
    assert np.allclose(w - before, -0.01 * np.sign(g), rtol=1e-4, atol=0)


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


def test_predict_and_evaluate_in_batches():
    model = nn.build_model(seed=0)
    x = RNG.random((25, 28, 28, 1)).astype(np.float32)
    y = RNG.integers(0, 10, 25)
    whole = nn.evaluate(model, x, y, batch_size=25)
    pieces = nn.evaluate(model, x, y, batch_size=7)
    assert abs(whole[0] - pieces[0]) < 1e-5 and whole[1] == pieces[1]
    assert np.allclose(nn.predict(model, x, batch_size=4), whole[2], atol=1e-6)
