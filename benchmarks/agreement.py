"""How closely the twins agree, measured: the numbers docs/proof.md quotes.

    python benchmarks/agreement.py         # writes --out/agreement.json (needs TensorFlow)

On the default network with the same weights (the starting weights for
seed 0, small non-zero biases) and real MNIST batches, in float32 and
float64: the largest differences between the twins' probabilities, losses
and gradients (dropout off, and on with the same mask), over 20 Adam steps
in lockstep (each step's loss and the final weights), the same lockstep
with the NumPy Adam using Python's exact betas instead of Keras's
float32-rounded ones, and how often max-pooling meets a tie and whether
sending ties to the last maximum instead of the first changes a gradient;
and the NumPy twin against the stored Keras reference (compare.py --reference).
tests/test_twins.py asserts the tolerances; this writes what was measured.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402
import machine  # noqa: E402
import mnist_cnn_numpy  # noqa: E402
from helpers import common, edits  # noqa: E402


def twins(kt, nt, weights, dtype, dropout=0.0):
    keras_model = kt.build_model(dropout=dropout, dtype=dtype)
    kt.set_weights(keras_model, weights)
    numpy_model = nt.build_model(dropout=dropout, dtype=dtype)
    numpy_model.set_weights(weights)
    return keras_model, numpy_model


def one_batch(kt, nt, weights, x, y, dtype, dropout):
    """The largest differences on one batch: probs, loss, gradient (relative
    to each tensor's largest entry)."""
    keras_model, numpy_model = twins(kt, nt, weights, dtype, dropout)
    masks = compare.shared_dropout_masks(nt, numpy_model, len(x), dtype) if dropout else {}
    probs, loss, grads = compare.keras_loss_and_grads(keras_model, x, y, masks)
    n_loss, n_probs = nt.loss_and_grads(numpy_model.layers, x, y)
    theirs = compare.keras_gradients(keras_model, grads)
    gradient = max(float(np.abs(g - theirs[k]).max() / np.abs(theirs[k]).max())
                   for k, _, g in numpy_model.trainable_weights())
    return {"probs": float(np.abs(n_probs - probs).max()),
            "loss": abs(float(n_loss) - loss), "gradients": gradient}


def lockstep(kt, nt, weights, x, y, dtype, exact_betas=False):
    """20 steps of both twins: the largest loss gap, and the final weights'
    largest difference (relative in float64, absolute in float32)."""
    keras_model, numpy_model = twins(kt, nt, weights, dtype)
    saved = nt.Adam.update
    if exact_betas:
        # The lesson's Adam.update, deliberately with one change: Python's
        # 0.9 and 0.999 in the bias correction, not float32's (lr still
        # passes through float32, as in the lesson).
        def update(self, params):
            t = self.iterations + 1
            for key, w, g in params:
                dt = w.dtype.type
                lr, b1, b2 = dt(np.float32(self.lr)), dt(self.beta_1), dt(self.beta_2)
                alpha = lr * np.sqrt(1 - b2 ** dt(t)) / (1 - b1 ** dt(t))
                if key not in self.m:
                    self.m[key], self.v[key] = np.zeros_like(w), np.zeros_like(w)
                m, v = self.m[key], self.v[key]
                m += (g - m) * dt(1 - self.beta_1)
                v += (g * g - v) * dt(1 - self.beta_2)
                w -= (m * alpha) / (np.sqrt(v) + dt(self.epsilon))
            self.iterations = t
        nt.Adam.update = update
    try:
        pairs = list(compare.lockstep(keras_model, numpy_model, x, y, 20, 64, 0))
    finally:
        nt.Adam.update = saved
    kw, nw = kt.get_weights(keras_model), numpy_model.get_weights()
    if dtype == "float64":
        weight = max(float(np.abs(nw[k] - kw[k]).max() / np.abs(kw[k]).max()) for k in kw)
    else:
        weight = max(float(np.abs(nw[k] - kw[k]).max()) for k in kw)
    return {"loss": max(abs(k - n) for k, n in pairs), "weights": weight,
            "first_loss": pairs[0][0], "last_loss": pairs[-1][0]}


def ties(kt, nt, weights, x, y):
    """Max-pool ties on real digits (float64): the share of pool1's windows
    whose maximum, positive, is held more than once, and the largest
    gradient difference from Keras when ties go to the first maximum (the
    twin's rule, TensorFlow's) and when they go to the last."""
    keras_model, numpy_model = twins(kt, nt, weights, "float64")
    conv1 = nt.forward(numpy_model.layers[:1], x)
    windows = conv1.reshape(len(x), 13, 2, 13, 2, -1).transpose(0, 1, 3, 5, 2, 4).reshape(
        len(x), 13, 13, -1, 4)
    top = windows.max(axis=-1, keepdims=True)
    tied = ((windows == top).sum(axis=-1) > 1) & (top[..., 0] > 0)
    _, _, grads = compare.keras_loss_and_grads(keras_model, x, y)
    theirs = compare.keras_gradients(keras_model, grads)

    def worst():
        nt.loss_and_grads(numpy_model.layers, x, y)
        return max(float(np.abs(g - theirs[k]).max() / np.abs(theirs[k]).max())
                   for k, _, g in numpy_model.trainable_weights())

    first = worst()
    from bug_gallery import maxpool_ties_to_last       # the gallery's own variant
    saved, nt.maxpool2d_forward = nt.maxpool2d_forward, maxpool_ties_to_last
    try:
        last = worst()
    finally:
        nt.maxpool2d_forward = saved
    return {"tied_share": float(tied.mean()), "first": first, "last": last}


def batchnorm(x_test, y_test, x, y, folder):
    """The same measurements for the twins with batch normalization added
    (docs/change.md's edit, helpers/edits.py), and how far each twin's
    float32 gradients are from exact (float64) arithmetic."""
    edits.batchnorm(folder)
    kt, nt = (edits.load_twin(folder, twin, "agreement_bn") for twin in ("keras", "numpy"))
    weights64 = common.initial_weights(nt.build_model(dropout=0.0).weight_shapes(), 0,
                                       np.float64)
    found = {}
    for dtype in ("float32", "float64"):
        weights = {k: v.astype(dtype) for k, v in weights64.items()}
        found[dtype] = {
            "dropout_off": one_batch(kt, nt, weights, x_test.astype(dtype), y_test, dtype, 0.0),
            "lockstep": lockstep(kt, nt, weights, x.astype(dtype), y, dtype)}
    exact = nt.build_model(dropout=0.0, dtype="float64")
    exact.set_weights(weights64)
    nt.loss_and_grads(exact.layers, x_test.astype("float64"), y_test)
    exact_grads = {k: g for k, _, g in exact.trainable_weights()}
    weights32 = {k: v.astype("float32") for k, v in weights64.items()}
    keras_model, numpy_model = twins(kt, nt, weights32, "float32")
    _, _, grads = compare.keras_loss_and_grads(keras_model, x_test.astype("float32"), y_test,
                                               masks={})          # training mode: batch statistics
    keras_grads = compare.keras_gradients(keras_model, grads)
    nt.loss_and_grads(numpy_model.layers, x_test.astype("float32"), y_test)
    found["float32_against_exact"] = {
        "keras": max(float(np.abs(keras_grads[k] - g).max() / np.abs(g).max())
                     for k, g in exact_grads.items()),
        "numpy": max(float(np.abs(g32 - exact_grads[k]).max() / np.abs(exact_grads[k]).max())
                     for k, _, g32 in numpy_model.trainable_weights())}
    found["params"] = nt.build_model().count_params()
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=common.HelpWithDefaults)
    p.add_argument("--out", default="results", help="folder for the results file")
    p.add_argument("--name", default="agreement", help="the results file: --out/NAME.json")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    out = common.prepare_out_dir(args.out)
    import mnist_cnn_keras as kt
    weights64, (x_test, y_test), (x, y) = compare.reference_inputs(args.data_dir)
    nt = mnist_cnn_numpy
    results = {"machine": machine.machine()}
    for dtype in ("float32", "float64"):
        weights = {k: v.astype(dtype) for k, v in weights64.items()}
        xt, xs = x_test.astype(dtype), x.astype(dtype)
        results[dtype] = {
            "dropout_off": one_batch(kt, nt, weights, xt, y_test, dtype, 0.0),
            "dropout_on": one_batch(kt, nt, weights, xt, y_test, dtype, 0.5),
            "lockstep": lockstep(kt, nt, weights, xs, y, dtype)}
        print(dtype, results[dtype], flush=True)
    results["float64"]["lockstep_exact_betas"] = lockstep(kt, nt, weights64, x.astype("float64"),
                                                          y, "float64", exact_betas=True)
    results["ties"] = ties(kt, nt, weights64, x_test.astype("float64"), y_test)
    results["reference"] = [{"what": what, "dtype": dtype, "difference": diff, "tolerance": tol}
                            for what, dtype, diff, tol in compare.against_reference(args.data_dir)]
    print(results["float64"]["lockstep_exact_betas"], results["ties"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["batchnorm"] = batchnorm(x_test, y_test, x, y, Path(tmp))
    print(results["batchnorm"])
    path = out / f"{args.name}.json"
    common.write_report(path, results)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    common.run(main)
