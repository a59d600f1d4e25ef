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

import common
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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_and_gradients_agree(mnist, tmp_path, dtype):
    keras_model, numpy_model = proof.twins(kt, nt, dtype, tmp_path, dropout=0.0)
    x, y = mnist[1][0][:64].astype(dtype), mnist[1][1][:64]
    proof.forward_and_gradients_agree(kt, nt, keras_model, numpy_model, x, y, dtype)


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
    compare.lockstep(keras_model, numpy_model, x, y, steps=60, batch_size=64, seed=1)
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
    args = argparse.Namespace(seed=3, epochs=3, batch_size=16, lr=1e-3)
    history, seconds = kt.train(kt.build_model(), (x, y), (x[:10], y[:10]), args)
    assert len(seconds) == 3 and len(history["val_loss"]) == 3

    rng = common.random_streams(3)["batches"]
    expected = [(e, i, yb.tolist()) for e in range(3)
                for i, (_, yb) in enumerate(data_utils.iterate_minibatches(x, y, 16, rng))]
    assert calls[:2] == expected[:2]                  # Keras's look at the shapes
    assert calls[2:] == expected
