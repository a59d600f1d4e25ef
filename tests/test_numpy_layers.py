"""The NumPy twin beyond its layer functions: max-pool ties, Adam's first
step, the model built from its declaration, what the lesson imports, and
the fast path switched on and off. The layer functions and every speed-up
are checked in helpers/checks.py (run by tests/test_checks.py)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import mnist_cnn_numpy as nn
import speedup
from conftest import REPO
from helpers.checks import rel_error

RNG = np.random.default_rng(1234)


def test_maxpool_ties_go_to_the_first_maximum():
    """After ReLU many windows hold several equal values (often 0)."""
    x = RNG.integers(0, 2, size=(3, 6, 6, 4)).astype(np.float64)   # ties everywhere
    out, cache = nn.maxpool2d_forward(x)
    dout = RNG.normal(size=out.shape)
    dx = nn.maxpool2d_backward(dout, cache)
    assert np.array_equal(dx, nn.maxpool2d_naive(x, dout)[1])
    # Exactly one position per window receives the gradient.
    nonzero = (dx != 0).reshape(3, 3, 2, 3, 2, 4).sum(axis=(2, 4))
    assert nonzero.max() == 1
    # A window of four equal values: its top-left position gets it all.
    x = np.ones((1, 2, 2, 1))
    dx = nn.maxpool2d_backward(np.array([[[[5.0]]]]), nn.maxpool2d_forward(x)[1])
    assert dx[0, :, :, 0].tolist() == [[5.0, 0.0], [0.0, 0.0]]


def test_maxpool_takes_other_window_sizes():
    """The lesson's max-pool, like Keras's, takes any pool_size (the fast
    drop-in only 2, and the layer falls back to the lesson's for others)."""
    x = RNG.normal(size=(2, 7, 9, 3))
    dout = RNG.normal(size=(2, 2, 3, 3))
    out, cache = nn.maxpool2d_forward(x, 3)
    want_out, want_dx = nn.maxpool2d_naive(x, dout, 3)
    assert np.array_equal(out, want_out)
    assert np.array_equal(nn.maxpool2d_backward(dout, cache), want_dx)


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
    nn.loss_and_grads(model.layers, x, np.array([0, 1]))
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


# --- The lesson alone, and the fast path switched on ---------------------------

def test_the_lesson_imports_with_numpy_and_requests_only():
    """mnist_cnn_numpy imports nothing but the standard library, NumPy,
    requests (through data_utils) and the repo's own modules: run in a
    Python where every other installed package refuses to import."""
    code = (
        "import sys, importlib.abc\n"
        "ALLOWED = {'numpy', 'requests', 'urllib3', 'idna', 'certifi', 'charset_normalizer',"
        " 'mnist_cnn_numpy', 'data_utils', 'helpers'}\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        top = name.split('.')[0]\n"
        "        if top in sys.stdlib_module_names or top in ALLOWED or top.startswith('_'):\n"
        "            return None\n"
        "        raise ImportError(f'the lesson imported {name}')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import mnist_cnn_numpy as nt\n"
        "model = nt.build_model()\n"
        "import numpy as np\n"
        "print(nt.loss_and_grads(model.layers, np.zeros((2, 28, 28, 1), np.float32),"
        " np.array([1, 2]))[0])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert abs(float(proc.stdout) - np.log(10)) < 1e-5           # ten equal probabilities


def test_switched_on_replaces_two_functions_and_puts_them_back():
    lesson = (nn.loss_and_grads, nn.logits, nn.forward)
    with speedup.switched_on(nn):
        assert nn.loss_and_grads is not lesson[0] and nn.logits is not lesson[1]
        assert nn.forward is lesson[2]
        assert speedup.lesson_function(nn, "loss_and_grads") is lesson[0]
    assert (nn.loss_and_grads, nn.logits, nn.forward) == lesson


def test_training_steps_agree_with_the_fast_path_on_and_off():
    """Five Adam steps of the lesson alone and of the fast path, from the
    same start on the same batches, dropout on (float64): the same weights."""
    x, y = RNG.random((5 * 40, 28, 28, 1)), RNG.integers(0, 10, 5 * 40)
    models = []
    for fast in (False, True):
        model, optimizer = nn.build_model(seed=2, dtype="float64"), nn.Adam()
        if fast:
            with speedup.switched_on(nn):
                for i in range(5):
                    nn.train_step(model, optimizer, x[40 * i:40 * i + 40], y[40 * i:40 * i + 40])
        else:
            for i in range(5):
                nn.train_step(model, optimizer, x[40 * i:40 * i + 40], y[40 * i:40 * i + 40])
        models.append(model.get_weights())
    for key in models[0]:
        assert rel_error(models[1][key], models[0][key]) < 1e-10, key


def test_fast_path_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("MNIST_TWINS_FAST", "0")
    lesson = nn.loss_and_grads
    with speedup.switched_on(nn):
        assert nn.loss_and_grads is lesson


@pytest.mark.parametrize("fast", ["1", "0"])
def test_the_twin_trains_with_the_fast_path_on_and_off(real_data_dir, tmp_path, fast):
    env = dict(os.environ, MNIST_DATA_DIR=str(real_data_dir), MNIST_TWINS_FAST=fast)
    proc = subprocess.run([sys.executable, "mnist_cnn_numpy.py", "--train-limit", "256",
                           "--epochs", "1", "--no-plots", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Test accuracy: " in proc.stdout


class FailsInAHelper(nn.Flatten):
    """Flatten that fails in a helper process only (as if it ran out of memory there)."""

    def forward(self, x, training=False):
        if speedup._IN_HELPER:
            raise MemoryError
        return super().forward(x, training)


class AlwaysFails(nn.Flatten):
    def forward(self, x, training=False):
        raise ValueError("a mistake in the learner's layer")


def _with_flatten(flatten):
    return nn.Sequential([nn.Input(shape=(8, 8, 1)), nn.Conv2D(4, 3, activation="relu"),
                          nn.MaxPooling2D(2), flatten, nn.Dense(10, activation="softmax")],
                         seed=1, dtype="float64")


def test_a_slice_that_fails_in_a_helper_process_is_done_here():
    """A helper process that fails hands its slice back: this process runs
    it, so the result is the lesson's; a mistake that fails everywhere is
    raised here, with its own message, and the helpers are stopped."""
    x, y = RNG.random((40, 8, 8, 1)), RNG.integers(0, 10, 40)
    want = nn.loss_and_grads(_with_flatten(nn.Flatten()).layers, x, y)[0]
    model = _with_flatten(FailsInAHelper())
    try:
        loss, _ = speedup.train_in_slices(nn, model.layers, x, y, threads=2)
        assert speedup._HELPERS and speedup._HELPERS[0].layers is model.layers
    finally:
        speedup.close_processes()
    assert abs(loss - want) < 1e-12
    with pytest.raises(ValueError, match="a mistake in the learner's layer"):
        speedup.train_in_slices(nn, _with_flatten(AlwaysFails()).layers, x, y, threads=2)
    assert not speedup._HELPERS


def test_a_helper_process_that_dies_is_replaced():
    """A helper killed between batches (out of memory, say): this process
    trains its slice itself, the batch's result is the lesson's, and the
    next batch gets a new helper."""
    x, y = RNG.random((40, 8, 8, 1)), RNG.integers(0, 10, 40)
    want = nn.loss_and_grads(_with_flatten(nn.Flatten()).layers, x, y)[0]
    model = _with_flatten(nn.Flatten())
    try:
        speedup.train_in_slices(nn, model.layers, x, y, threads=2)
        pid = speedup._HELPERS[0].workers[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        loss, _ = speedup.train_in_slices(nn, model.layers, x, y, threads=2)
        assert abs(loss - want) < 1e-12
        assert not speedup._HELPERS                   # the dead one was let go
        loss, _ = speedup.train_in_slices(nn, model.layers, x, y, threads=2)
        assert abs(loss - want) < 1e-12
        assert speedup._HELPERS[0].workers[0]["pid"] != pid
    finally:
        speedup.close_processes()
