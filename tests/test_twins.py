"""The proof that the two twins are the same network.

Same weights (passed through the shared .npz weights file, as a user would),
same real MNIST batch: the class probabilities, the loss, every gradient,
and the loss at each of 20 Adam steps must agree between Keras and NumPy.
The checks themselves are in proof.py, so that test_change_the_network.py
can run them on an edited network too. On failure the messages show,
tensor by tensor, where the twins part.
"""

import numpy as np
import pytest

from helpers import common
import data_utils
import mnist_cnn_keras as kt
import mnist_cnn_numpy as nt
import proof


@pytest.fixture(scope="module")
def mnist(real_data_dir):
    (x_train, y_train), (x_test, y_test) = data_utils.load_dataset("mnist", real_data_dir,
                                                                   progress=False)
    return (x_train[:2000], y_train[:2000]), (x_test, y_test)


def test_both_twins_declare_the_same_network():
    proof.same_network(kt, nt, kt.build_model(), nt.build_model())
    # The same starting weights for the same seed, drawn from each model's own shapes.
    k = common.initial_weights(kt.weight_shapes(kt.build_model()), 7)
    n = common.initial_weights(nt.build_model().weight_shapes(), 7)
    assert list(k) == list(n) and all(np.array_equal(k[key], n[key]) for key in k)
    other = common.initial_weights(nt.build_model().weight_shapes(), 8)
    assert not any(np.array_equal(n[key], other[key]) for key in n if key.endswith("/kernel"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_and_gradients_agree(mnist, tmp_path, dtype):
    keras_model, numpy_model = proof.twins(kt, nt, dtype, tmp_path, dropout=0.0)
    x, y = mnist[1][0][:64].astype(dtype), mnist[1][1][:64]
    proof.forward_and_gradients_agree(kt, nt, keras_model, numpy_model, x, y, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_and_gradients_agree_with_dropout_on(mnist, tmp_path, dtype):
    """Training mode, dropout 0.5, the same mask in both twins: a dropout
    backward pass that ignored its mask, or a mask without its scaling,
    would show up here as gradients that differ."""
    keras_model, numpy_model = proof.twins(kt, nt, dtype, tmp_path, dropout=0.5)
    x, y = mnist[1][0][64:128].astype(dtype), mnist[1][1][64:128]
    proof.forward_and_gradients_agree(kt, nt, keras_model, numpy_model, x, y, dtype,
                                      dropout=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lockstep_training(mnist, tmp_path, dtype):
    """20 Adam steps from the same weights on the same batches, dropout 0."""
    keras_model, numpy_model = proof.twins(kt, nt, dtype, tmp_path, dropout=0.0)
    x, y = mnist[0]
    proof.lockstep_agrees(kt, nt, keras_model, numpy_model, x.astype(dtype), y, dtype)


def test_cross_evaluation(mnist, tmp_path):
    """Weights trained by each twin, evaluated by both: the same predictions."""
    (x, y), (x_test, y_test) = mnist
    keras_model, numpy_model = proof.twins(kt, nt, "float32", tmp_path)
    import compare
    list(compare.lockstep(keras_model, numpy_model, x, y, steps=60, batch_size=64, seed=1))
    for trained in (kt.get_weights(keras_model), numpy_model.get_weights()):
        path = tmp_path / "trained.weights.npz"
        common.save_weights(path, trained)
        k_model, n_model = kt.build_model(), nt.build_model()
        kt.set_weights(k_model, common.load_weights(path, kt.weight_shapes(k_model)))
        n_model.set_weights(common.load_weights(path, n_model.weight_shapes()))
        k_probs = k_model.predict(x_test, batch_size=1000, verbose=0)
        _, n_acc, n_probs = nt.evaluate(n_model, x_test, y_test)
        k_acc = float((k_probs.argmax(1) == y_test).mean())
        assert k_acc > 0.8                                  # a real, trained model
        agree = float((k_probs.argmax(1) == n_probs.argmax(1)).mean())
        assert agree >= proof.SAME_PREDICTION, \
            f"the twins disagree on {1 - agree:.2%} of test images"
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
    args = argparse.Namespace(seed=3, epochs=3, batch_size=16, lr=1e-3)
    history, seconds = kt.train(kt.build_model(), (x, y), (x[:10], y[:10]), args)
    assert len(seconds) == 3 and len(history["val_loss"]) == 3

    rng = common.random_streams(3)["batches"]
    expected = [(e, i, yb.tolist()) for e in range(3)
                for i, (_, yb) in enumerate(data_utils.iterate_minibatches(x, y, 16, rng))]
    assert calls[:2] == expected[:2]                  # Keras's look at the shapes
    assert calls[2:] == expected


# --- The parts that are random or stateful, against Keras's own --------------

@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_mask_matches_keras(rate):
    """keras.layers.Dropout and the NumPy twin's mask: the same two values
    (0 and 1 / (1 - rate)), and each drops a fraction rate of the units
    (within 4 standard deviations of the binomial count)."""
    ones = np.ones((400, 250), np.float32)
    keras_out = np.asarray(kt.keras.layers.Dropout(rate, seed=1)(ones, training=True))
    numpy_out = nt.dropout_forward(ones, nt.dropout_mask(ones.shape, rate,
                                                         np.random.default_rng(1),
                                                         np.float32))[0]
    assert np.array_equal(np.unique(keras_out), np.unique(numpy_out))
    assert np.allclose(np.unique(numpy_out), [0, 1 / (1 - rate)])
    spread = 4 * np.sqrt(rate * (1 - rate) / ones.size)
    for out in (keras_out, numpy_out):
        assert abs(np.mean(out == 0) - rate) < spread
        assert abs(out.mean() - 1) < spread / (1 - rate)        # the expected value stays 1


def test_initial_weights_match_keras_statistics():
    """For every kernel of the network: Keras's GlorotUniform and the shared
    starting weights have the same bound and the same spread."""
    model = nt.build_model()
    ours = common.initial_weights(model.weight_shapes(), 0, np.float64)
    glorot = kt.keras.initializers.GlorotUniform(seed=0)
    for key, shape in model.weight_shapes().items():
        if not key.endswith("/kernel"):
            assert not ours[key].any(), key                      # Keras's zero biases
            continue
        theirs = np.asarray(glorot(shape), np.float64)
        limit = max(np.abs(theirs).max(), np.abs(ours[key]).max())
        assert np.abs(ours[key]).max() <= limit and np.abs(theirs).max() <= limit
        # Both uniform on the same interval: the same standard deviation,
        # within the sampling error of a few hundred numbers (about 5%).
        assert abs(ours[key].std() - theirs.std()) < 0.1 * theirs.std(), key
        assert abs(ours[key].std() - limit / np.sqrt(3)) < 0.1 * theirs.std(), key


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_matches_keras(dtype):
    """Keras's own Adam and the NumPy twin's, ten steps on the same weights
    and gradients, of ordinary size and tiny (where epsilon matters)."""
    rng = np.random.default_rng(5)
    for size in (1.0, 1e-8):
        w = rng.normal(size=(3, 4)).astype(dtype)
        grads = [(rng.normal(size=w.shape) * size).astype(dtype) for _ in range(10)]
        variable = kt.keras.Variable(w.copy(), dtype=dtype)
        keras_adam, numpy_adam, mine = kt.keras.optimizers.Adam(0.01), nt.Adam(0.01), w.copy()
        for g in grads:
            keras_adam.apply_gradients([(kt.tf.constant(g), variable)])
            numpy_adam.update([("w", mine, g.copy())])
            step = np.abs(np.asarray(variable) - w).max()
            tol = 1e-12 if dtype == "float64" else 1e-5            # relative to the step
            assert np.abs(np.asarray(variable) - mine).max() <= tol * step, size
