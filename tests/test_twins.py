"""The proof that the two twins are the same network.

Same weights (passed through the shared .npz weights file, as a user would),
same real MNIST batch: the class probabilities, the loss, every gradient,
and the loss after each of 20 Adam steps must agree between Keras and NumPy.
On failure the messages show, tensor by tensor, where the twins part.
"""

import numpy as np
import pytest

import common
import compare
import data_utils
import mnist_cnn_keras as kt
import mnist_cnn_numpy as nt



@pytest.fixture(scope="module")
def mnist(real_data_dir):
    (x_train, y_train), (x_test, y_test) = data_utils.load_dataset("mnist", real_data_dir,
                                                                   progress=False)
    return (x_train[:2000], y_train[:2000]), (x_test, y_test)


def twins(dtype, tmp_path, seed=0, dropout=0.5):
    """A Keras model and a NumPy model holding the same weights.

    The weights go Keras -> keras.weights.npz -> NumPy, through the same file
    format the scripts use, so the test also proves that format.
    """
    keras_model = kt.build_model(dropout=dropout, dtype=dtype)
    kt.set_weights(keras_model, common.initial_weights(seed, dtype))
    for layer in keras_model.layers:            # non-zero biases, so they are tested too
        if layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, np.linspace(-0.05, 0.05, bias.size).astype(dtype)])
    path = tmp_path / f"keras_{dtype}.weights.npz"
    common.save_weights(path, kt.get_weights(keras_model))
    numpy_model = nt.Model(seed, dropout=dropout, dtype=dtype)
    numpy_model.set_weights(common.load_weights(path, dtype))
    return keras_model, numpy_model


def max_rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def describe(diffs):
    """A table of the worst tensors, for failure messages."""
    return "\n".join(f"  {name:<14} max rel diff {d:.2e}   first pairs (numpy, keras): {pairs}"
                     for name, d, pairs in sorted(diffs, key=lambda t: -t[1]))


# Tolerances, and why:
# forward, float32 1e-5: float32 has 7 significant digits; two correct
#   implementations summing the same 288-term dot products in different
#   orders differ in the 6th-7th digit. float64 1e-10: same, with 16 digits.
# gradients, float32 1e-4 / float64 1e-9 (relative to each tensor's largest
#   entry): a backward pass sums over the whole batch and all positions, so
#   rounding grows with the number of terms (about 1e5 here); a wrong term
#   (a missed ReLU, a mis-routed max-pool tie) is off by 1e-2 or more.
FORWARD_TOL = {"float32": 1e-5, "float64": 1e-10}
GRAD_TOL = {"float32": 1e-4, "float64": 1e-9}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_and_gradients_agree(mnist, tmp_path, dtype):
    keras_model, numpy_model = twins(dtype, tmp_path)
    (x, y) = mnist[1][0][:64].astype(dtype), mnist[1][1][:64]
    probs, loss, grads = compare.keras_loss_and_grads(keras_model, x, y)

    n_loss, n_probs = numpy_model.loss_and_grads(x, y, training=False)
    assert np.max(np.abs(n_probs - probs)) < FORWARD_TOL[dtype]
    assert abs(float(n_loss) - float(loss)) < FORWARD_TOL[dtype]

    diffs = []
    by_variable = {id(v): g for v, g in zip(keras_model.trainable_variables, grads)}
    keras_grads = {f"{name}/{part}": by_variable[id(getattr(keras_model.get_layer(name), part))]
                   for name in common.WEIGHT_SHAPES for part in ("kernel", "bias")}
    for layer in numpy_model.trainable():
        for part in ("kernel", "bias"):
            mine = getattr(layer, "d" + part)
            theirs = keras_grads[f"{layer.name}/{part}"]
            assert mine.shape == theirs.shape
            pairs = [(f"{a:.3e}", f"{b:.3e}") for a, b in zip(mine.ravel()[:3], theirs.ravel()[:3])]
            diffs.append((f"{layer.name}/{part}", max_rel_diff(mine, theirs), pairs))
    worst = max(d for _, d, _ in diffs)
    assert worst < GRAD_TOL[dtype], "gradients differ:\n" + describe(diffs)


# Lockstep tolerances, (loss, final weights):
# float64: loss 1e-8, weights 1e-12 relative to each tensor's largest entry
#   (measured: about 1e-15 and 1e-15; bit-level agreement needs Keras's
#   float32-rounded Adam betas, see mnist_cnn_numpy.Adam).
# float32: loss 1e-4 (measured: a few 1e-7). Weights: absolute 1e-3, one Adam
#   step at lr = 1e-3. Adam moves each weight by about lr * m / sqrt(v); for a
#   weight whose gradients are near zero, float32 rounding can flip the sign
#   of m, so twins that agree to 1e-7 elsewhere can differ by up to a step
#   there (measured: up to 5e-4 on a few conv2 kernel entries). The loss
#   check above is what catches a wrong gradient.
LOCKSTEP_TOL = {"float32": (1e-4, 1e-3), "float64": (1e-8, 1e-12)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lockstep_training(mnist, tmp_path, dtype):
    """20 Adam steps from the same weights on the same batches, dropout 0."""
    keras_model, numpy_model = twins(dtype, tmp_path, dropout=0.0)
    (x, y) = mnist[0]
    losses = compare.lockstep(keras_model, numpy_model, x.astype(dtype), y,
                              steps=20, batch_size=64, seed=0)
    loss_tol, weight_tol = LOCKSTEP_TOL[dtype]
    gaps = [abs(k - n) for k, n in losses]
    assert max(gaps) < loss_tol, "\n".join(
        f"step {i + 1:2d}: keras {k:.10f}  numpy {n:.10f}" for i, (k, n) in enumerate(losses))
    assert losses[-1][0] < losses[0][0] - 0.5          # they really trained
    kw, nw = kt.get_weights(keras_model), numpy_model.get_weights()
    if dtype == "float64":
        diffs = [(k, max_rel_diff(nw[k], kw[k]), []) for k in kw]
    else:
        diffs = [(k, float(np.max(np.abs(nw[k] - kw[k]))), []) for k in kw]
    assert max(d for _, d, _ in diffs) < weight_tol, "weights differ:\n" + describe(diffs)


def test_cross_evaluation(mnist, tmp_path):
    """Weights trained by each twin, evaluated by both: the same predictions."""
    (x, y), (x_test, y_test) = mnist
    keras_model, numpy_model = twins("float32", tmp_path)
    compare.lockstep(keras_model, numpy_model, x, y, steps=60, batch_size=64, seed=1)
    for trained in (kt.get_weights(keras_model), numpy_model.get_weights()):
        path = tmp_path / "trained.weights.npz"
        common.save_weights(path, trained)
        k_model, n_model = kt.build_model(), nt.Model()
        kt.set_weights(k_model, common.load_weights(path))
        n_model.set_weights(common.load_weights(path))
        k_probs = k_model.predict(x_test, batch_size=1000, verbose=0)
        _, n_acc, n_probs = n_model.evaluate(x_test, y_test)
        k_acc = float((k_probs.argmax(1) == y_test).mean())
        assert k_acc > 0.8                                  # a real, trained model
        agree = float((k_probs.argmax(1) == n_probs.argmax(1)).mean())
        assert agree >= 0.999, f"the twins disagree on {1 - agree:.2%} of test images"
        assert abs(k_acc - n_acc) <= 1e-3


def test_keras_fit_trains_on_the_shared_batches(monkeypatch):
    """model.fit in the Keras twin asks for exactly the NumPy twin's batches,
    epoch after epoch, in order (beyond a first look at two batches that
    Keras takes to learn their shapes)."""
    import argparse

    calls = []
    original = kt.SharedBatches.__getitem__

    def recording(self, i):
        xb, yb = original(self, i)
        calls.append((self.epoch, i, yb.tolist()))
        return xb, yb

    monkeypatch.setattr(kt.SharedBatches, "__getitem__", recording)
    x = np.random.default_rng(0).random((50, 28, 28, 1), dtype=np.float32)
    y = np.arange(50) % 10
    args = argparse.Namespace(seed=3, epochs=3, batch_size=16)
    history, seconds = kt.train(kt.build_model(), (x, y), (x[:10], y[:10]), args)
    assert len(seconds) == 3 and len(history["val_loss"]) == 3

    rng = common.random_streams(3)["batches"]
    expected = [(e, i, yb.tolist()) for e in range(3)
                for i, (_, yb) in enumerate(data_utils.iterate_minibatches(x, y, 16, rng))]
    assert calls[:2] == expected[:2]                  # Keras's look at the shapes
    assert calls[2:] == expected
