"""The proof that two twin modules build the same network, as functions.

tests/test_twins.py runs it on the repo's twins; test_change_the_network.py
runs it on copies of both twins edited the way docs/change.md tells a learner
to. kt and nt are the two twin modules (mnist_cnn_keras, mnist_cnn_numpy or
edited copies of them). On failure the messages say, weight by weight,
where the twins part.
"""

import numpy as np

import compare
from helpers import common
from helpers.checks import rel_error as max_rel_diff

# Tolerances, and why:
# forward, float32 1e-5: float32 has 7 significant digits; two correct
#   implementations summing the same 288-term dot products in different
#   orders differ in the 6th-7th digit. float64 1e-10: same, with 16 digits.
# gradients, float32 1e-4 / float64 1e-9 (relative to each tensor's largest
#   entry): a backward pass sums over the whole batch and all positions
#   (conv2's kernel gradient: batch x 11 x 11 terms per entry), so rounding
#   grows with the number of terms; a wrong term (a missed ReLU, a
#   mis-routed max-pool tie) moves the leading digits instead.
FORWARD_TOL = {"float32": 1e-5, "float64": 1e-10}
GRAD_TOL = {"float32": 1e-4, "float64": 1e-9}

# Lockstep tolerances, (loss, final weights):
# float64: loss 1e-8, weights 1e-12 relative to each tensor's largest entry
#   (agreement at the last digits needs Keras's float32-rounded Adam betas,
#   see mnist_cnn_numpy.Adam; benchmarks/agreement.py measures both ways).
# float32: loss 1e-4, some hundred times float32's rounding of a loss near
#   2. Weights: absolute 1e-3, one Adam
#   step at lr = 1e-3. Adam moves each weight by about lr * m / sqrt(v); for a
#   weight whose gradients are near zero, float32 rounding can flip the sign
#   of m, so twins that agree to 1e-7 elsewhere can differ by up to a step
#   there. The loss check is what catches a wrong gradient. What was
#   measured: benchmarks/agreement.py, docs/proof.md.
LOCKSTEP_TOL = {"float32": (1e-4, 1e-3), "float64": (1e-8, 1e-12)}

# Moving statistics (BatchNormalization), relative to each tensor's largest
# entry, after every lockstep step: float64 1e-8 (they are running means of
# batch statistics that agree as closely as the forward pass); float32 1e-4, as the forward
# pass above, with room for 20 steps of rounding in a running mean.
STATE_TOL = {"float32": 1e-4, "float64": 1e-8}

# Weights exchanged: trained weights evaluated by both twins must give the same
# predicted class on this share of the test images at least (float32 rounding
# can tip an image whose two likeliest classes are nearly tied).
SAME_PREDICTION = 0.999

# Float32 with BatchNormalization. Keras's float32 batch statistics carry
# more rounding than the NumPy twin's (TensorFlow reduces tens of thousands
# of float32 values; the NumPy twin sums in float64), and the division by a
# batch's standard deviation magnifies it: against exact (float64)
# arithmetic on one real batch, Keras's float32 gradients are off by orders
# of magnitude more than the NumPy twin's, and 20 lockstep steps amplify
# that further (Adam gives a gradient of pure rounding a full step).
# benchmarks/agreement.py measures all of it (docs/change.md's table);
# these tolerances sit above what it and these tests' own batches give,
# while a wrong batch-norm gradient is off by order 1. The tight proof for
# batch normalization is float64 (the tolerances above), and
# test_batchnorm.py checks the NumPy twin's float32 against exact
# arithmetic at the ordinary float32 tolerances.
BN_FLOAT32_TOL = {"forward": 5e-4, "gradients": 5e-2, "loss": 5e-2, "state": 2e-1,
                  "weights": 2e-1}
# Float64 with BatchNormalization: the twins add up each channel's
# statistics in different orders, and the normalisation magnifies that
# rounding, so after 20 steps the final weights differ by more than without
# batch norm (docs/change.md's table, against docs/proof.md's); every other
# float64 tolerance above holds as it is.
BN_FLOAT64_WEIGHT_TOL = 1e-8


def _has_bn(model):
    return any(type(layer).__name__ == "BatchNormalization" for layer in model.layers)


def _bn_float32(model, dtype):
    return dtype == "float32" and _has_bn(model)


def same_network(kt, nt, keras_model, numpy_model):
    """Both declarations describe the same network: the same weights with
    the same shapes and the same output shape after every layer. Otherwise
    one message that names each layer where they differ."""
    problems = []
    k, n = kt.weight_shapes(keras_model), numpy_model.weight_shapes()
    for key in dict.fromkeys([*k, *n]):
        if k.get(key) != n.get(key):
            problems.append(f"  weight {key}: Keras twin {k.get(key, 'none')}, "
                            f"NumPy twin {n.get(key, 'none')}")
    k_out = {layer.name: tuple(layer.output.shape[1:]) for layer in keras_model.layers}
    n_out = {layer.name: tuple(layer.output_shape) for layer in numpy_model.layers}
    for name in dict.fromkeys([*k_out, *n_out]):
        if k_out.get(name) != n_out.get(name):
            problems.append(f"  layer {name} output: Keras twin {k_out.get(name, 'none')}, "
                            f"NumPy twin {n_out.get(name, 'none')}")
    assert not problems, ("The twins declare different networks; edit both build_model "
                          "functions the same way:\n" + "\n".join(problems))


def twins(kt, nt, dtype, tmp_path, seed=0, dropout=0.5):
    """A Keras model and a NumPy model holding the same weights.

    The weights go Keras -> keras.weights.npz -> NumPy, through the same file
    format the scripts use, so the test also proves that format.
    """
    keras_model = kt.build_model(dropout=dropout, dtype=dtype)
    numpy_model = nt.build_model(dropout=dropout, seed=seed, dtype=dtype)
    same_network(kt, nt, keras_model, numpy_model)
    start = common.initial_weights(kt.weight_shapes(keras_model), seed, dtype)
    for key in start:                     # non-zero biases, so they are tested too
        if key.endswith("/bias"):
            start[key] = np.linspace(-0.05, 0.05, start[key].size).astype(dtype)
    kt.set_weights(keras_model, start)
    path = tmp_path / f"keras_{dtype}.weights.npz"
    common.save_weights(path, kt.get_weights(keras_model))
    numpy_model.set_weights(common.load_weights(path, numpy_model.weight_shapes(), dtype))
    return keras_model, numpy_model


def describe(diffs):
    """A table of the worst tensors, for failure messages."""
    return "\n".join(f"  {name:<22} max rel diff {d:.2e}   first pairs (numpy, keras): {pairs}"
                     for name, d, pairs in sorted(diffs, key=lambda t: -t[1]))


def keras_state(model):
    """The weights a model keeps but does not learn (BatchNormalization's
    moving statistics), as {"bn1/moving_mean": array, ...}."""
    return {f"{layer.name}/{w.name}": w.numpy() for layer in model.layers
            for w in layer.non_trainable_weights}


def numpy_state(model):
    return {f"{layer.name}/{part}": getattr(layer, part).copy()
            for layer in model.layers for part in layer.state}


def forward_and_gradients_agree(kt, nt, keras_model, numpy_model, x, y, dtype,
                                dropout=False):
    """Probabilities, loss and every gradient of one batch.

    dropout=False: for twins built with dropout 0. dropout=True: in training
    mode, with the masks the NumPy twin's Dropout layers draw (each layer's
    random stream restarted from a known seed, so the same mask can be drawn
    once more for Keras; keras_loss_and_grads says how Keras takes it)."""
    masks = None
    if dropout:
        masks = compare.shared_dropout_masks(nt, numpy_model, len(x), dtype)
        assert masks and all(np.any(m == 0) for m in masks.values())   # some units dropped
    probs, loss, grads = compare.keras_loss_and_grads(keras_model, x, y,
                                                      masks if dropout else {})
    n_loss, n_probs = nt.loss_and_grads(numpy_model.layers, x, y)
    if dropout:
        for layer in numpy_model.layers:
            if layer.name in masks:
                assert np.array_equal(layer.mask, masks[layer.name])
    bn = _bn_float32(numpy_model, dtype)
    forward_tol = BN_FLOAT32_TOL["forward"] if bn else FORWARD_TOL[dtype]
    assert np.max(np.abs(n_probs - probs)) < forward_tol
    assert abs(float(n_loss) - float(loss)) < forward_tol
    theirs = compare.keras_gradients(keras_model, grads)
    diffs = []
    for key, _, mine in numpy_model.trainable_weights():
        assert mine.shape == theirs[key].shape, key
        pairs = [(f"{a:.3e}", f"{b:.3e}")
                 for a, b in zip(mine.ravel()[:3], theirs[key].ravel()[:3])]
        diffs.append((key, max_rel_diff(mine, theirs[key]), pairs))
    assert set(theirs) == {key for key, _, _ in diffs}
    worst = max(d for _, d, _ in diffs)
    assert worst < (BN_FLOAT32_TOL["gradients"] if bn else GRAD_TOL[dtype]), \
        "gradients differ:\n" + describe(diffs)


def lockstep_agrees(kt, nt, keras_model, numpy_model, x, y, dtype, steps=20):
    """steps Adam steps from the same weights on the same batches, dropout 0:
    the loss before every update and after the last, the kept weights
    (BatchNormalization's moving statistics) after every step, and the final
    weights."""
    losses, bn = [], _bn_float32(numpy_model, dtype)
    for pair in compare.lockstep(keras_model, numpy_model, x, y, steps=steps, batch_size=64,
                                 seed=0):
        losses.append(pair)
        if len(losses) > steps:
            break                                    # the last pair: after the last update
        k_state, n_state = keras_state(keras_model), numpy_state(numpy_model)
        assert set(k_state) == set(n_state)
        diffs = [(key, max_rel_diff(n_state[key], k_state[key]), []) for key in k_state]
        tol = BN_FLOAT32_TOL["state"] if bn else STATE_TOL[dtype]
        assert not diffs or max(d for _, d, _ in diffs) < tol, \
            f"moving statistics differ after step {len(losses)}:\n" + describe(diffs)
    assert len(losses) == steps + 1
    loss_tol, weight_tol = LOCKSTEP_TOL[dtype]
    if bn:
        loss_tol, weight_tol = BN_FLOAT32_TOL["loss"], BN_FLOAT32_TOL["weights"]
    elif _has_bn(numpy_model):
        weight_tol = BN_FLOAT64_WEIGHT_TOL
    gaps = [abs(k - n) for k, n in losses]
    assert max(gaps) < loss_tol, "\n".join(
        f"step {i + 1:2d}: keras {k:.10f}  numpy {n:.10f}" for i, (k, n) in enumerate(losses))
    assert losses[-1][0] < losses[0][0] - 0.5          # they really trained
    kw, nw = kt.get_weights(keras_model), numpy_model.get_weights()
    assert set(kw) == set(nw)
    if dtype == "float64":
        diffs = [(k, max_rel_diff(nw[k], kw[k]), []) for k in kw]
    else:
        diffs = [(k, float(np.max(np.abs(nw[k] - kw[k]))), []) for k in kw]
    assert max(d for _, d, _ in diffs) < weight_tol, "weights differ:\n" + describe(diffs)
    return losses


def edited_twins_agree(kt, nt, x, y, dtype, tmp_path):
    """The whole proof for a pair of edited twin modules (no dropout): forward
    and gradients on 64 images, then the lockstep on fresh twins. Returns the
    NumPy twin after the lockstep."""
    keras_model, numpy_model = twins(kt, nt, dtype, tmp_path, dropout=0.0)
    forward_and_gradients_agree(kt, nt, keras_model, numpy_model, x[:64], y[:64], dtype)
    keras_model, numpy_model = twins(kt, nt, dtype, tmp_path, dropout=0.0)
    lockstep_agrees(kt, nt, keras_model, numpy_model, x, y, dtype)
    return numpy_model
