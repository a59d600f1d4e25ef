"""Batch normalization added to both twins, as docs/change.md's "Adding batch
normalization" shows: a BatchNormalization layer after conv1 and after dense1, in
copies of both twins. Proven like every other layer: probabilities, every
gradient (gamma and beta included) and, after each of 20 lockstep steps,
the loss and the moving statistics, in float32 and float64; the slices of a
batch give the batch's statistics; the twins train and exchange weights.
(checks.py checks batchnorm_forward and batchnorm_backward themselves.)
"""

import numpy as np
import pytest

import proof
import speedup
from helpers import edits
from test_change_the_network import load_twins, train_and_exchange


def add_batchnorm(folder):
    """docs/change.md, "Adding batch normalization", made to a copy."""
    return edits.batchnorm(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return add_batchnorm(tmp_path_factory.mktemp("batchnorm"))


@pytest.fixture(scope="module")
def twins_with_bn(folder):
    return load_twins(folder, "bn")


def test_the_weights_file_keeps_keras_order(twins_with_bn):
    ek, en = twins_with_bn
    keras_keys, numpy_keys = list(ek.weight_shapes(ek.build_model())), list(
        en.build_model().weight_shapes())
    assert keras_keys == numpy_keys
    assert [k for k in numpy_keys if k.startswith("bn1/")] == [
        "bn1/gamma", "bn1/beta", "bn1/moving_mean", "bn1/moving_variance"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_twins_with_batchnorm_pass_the_proof(twins_with_bn, mnist_head, tmp_path, dtype):
    ek, en = twins_with_bn
    x, y = mnist_head[0].astype(dtype), mnist_head[1]
    numpy_model = proof.edited_twins_agree(ek, en, x, y, dtype, tmp_path)
    moving = numpy_model.get_weights()["bn1/moving_mean"]
    assert np.abs(moving).max() > 1e-3                   # the statistics really moved


def test_numpy_float32_against_exact_arithmetic(twins_with_bn, mnist_head):
    """The NumPy twin in float32 against itself in float64 (which the proof
    above shows equal to Keras in float64 to about 1e-12), on the same
    weights and batch: within the ordinary float32 tolerances. (Keras's own
    float32 batch statistics are less exact: see proof.BN_FLOAT32_TOL.)"""
    _, en = twins_with_bn
    x, y = mnist_head[0][:64], mnist_head[1][:64]
    single, exact = en.build_model(dropout=0.0), en.build_model(dropout=0.0, dtype="float64")
    exact.set_weights({k: v.astype("float64") for k, v in single.get_weights().items()})
    loss32, probs32 = en.loss_and_grads(single.layers, x, y)
    loss64, probs64 = en.loss_and_grads(exact.layers, x.astype("float64"), y)
    assert np.max(np.abs(probs32 - probs64)) < proof.FORWARD_TOL["float32"]
    assert abs(float(loss32) - float(loss64)) < proof.FORWARD_TOL["float32"]
    grads64 = {k: g for k, _, g in exact.trainable_weights()}
    diffs = [(k, proof.max_rel_diff(g, grads64[k]), []) for k, _, g in single.trainable_weights()]
    assert max(d for _, d, _ in diffs) < proof.GRAD_TOL["float32"], proof.describe(diffs)


def test_slices_give_the_batch_statistics(twins_with_bn, mnist_head, monkeypatch):
    """The edited twin with the fast path: 1, 2 and 3 slices on threads give
    the lesson's loss, gradients and moving statistics on the whole batch,
    with dropout on (float64; 1e-11 relative: the batch's statistics are the
    slices' sums added up, in another order than one sum; measured 5e-13)."""
    _, en = twins_with_bn
    n = 3 * speedup.MIN_SLICE + 5
    x, y = mnist_head[0][:n].astype("float64"), mnist_head[1][:n]
    run = speedup._run

    def one_slice_per_thread(work, copies, parts, threads):
        # The slices wait for each other, so they must all run at once: more
        # slices than threads would wait forever (checked before they start).
        assert len(parts) == threads, f"{len(parts)} slices on {threads} threads"
        return run(work, copies, parts, threads)

    monkeypatch.setattr(speedup, "_run", one_slice_per_thread)
    lesson = en.build_model(seed=5, dtype="float64")
    loss, probs = en.loss_and_grads(lesson.layers, x, y)
    for threads in (1, 2, 3):
        model = en.build_model(seed=5, dtype="float64")
        got_loss, got_probs = speedup.train_in_slices(en, model.layers, x, y, threads)
        assert abs(got_loss - loss) < 1e-11
        assert proof.max_rel_diff(got_probs, probs) < 1e-11
        want = {k: g for k, _, g in lesson.trainable_weights()}
        for key, _, g in model.trainable_weights():
            assert proof.max_rel_diff(g, want[key]) < 1e-11, key
        for key, value in lesson.get_weights().items():     # moving statistics included
            assert proof.max_rel_diff(model.get_weights()[key], value) < 1e-11, key


def test_twins_with_batchnorm_train_and_exchange_weights(folder, real_data_dir, tmp_path):
    runs = train_and_exchange(folder, real_data_dir, tmp_path)
    for twin, (stdout, _) in runs.items():
        weights = np.load(tmp_path / twin / f"{twin}.weights.npz", allow_pickle=False)
        kept = sum(weights[k].size for k in weights.files if "/moving_" in k)
        assert "bn1 (BatchNormalization)" in stdout
        assert f"Non-trainable params: {kept:,}" in stdout and kept > 0
