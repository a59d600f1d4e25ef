"""Compare the twins: their results side by side, or the proof in lockstep.

    python compare.py                 # table of results/mnist/keras.json vs numpy.json
                                      # and a figure of both training curves
    python compare.py --lockstep 20   # train both twins from the same weights on
                                      # the same batches, printing both losses
                                      # at every step (needs TensorFlow)
    python compare.py --reference     # the proof without TensorFlow: the NumPy
                                      # twin against the Keras twin's stored numbers

The table needs only the two results files (no TensorFlow): run
`python mnist_cnn_keras.py` and `python mnist_cnn_numpy.py` first.
"""

import argparse
import json
from pathlib import Path

import numpy as np

import data_utils
from helpers import common

ROWS = [  # (label, how to show a report's value)
    ("Test accuracy", lambda r: f"{100 * r['test_accuracy']:.2f}%"),
    ("Test loss", lambda r: f"{r['test_loss']:.4f}"),
    ("Train time", lambda r: f"{r['train_seconds']:.1f} s"),
    ("Time per epoch", lambda r: f"{r['train_seconds'] / max(r['epochs'], 1):.1f} s"),
    ("Parameters", lambda r: f"{r['params']:,}"),
    ("Epochs", lambda r: str(r["epochs"])),
    ("Batch size", lambda r: str(r["batch_size"])),
    ("Training images", lambda r: f"{r['train_images']:,}"),
    ("Dataset", lambda r: r["dataset"]),
    ("Seed", lambda r: str(r["seed"])),
]


def read_reports(folder):
    """Both twins' reports in folder, checked: complete, and of the same
    dataset and the same network (else the table would compare apples with
    pears); anything else is one message."""
    reports = {}
    for twin, script in (("keras", "mnist_cnn_keras.py"), ("numpy", "mnist_cnn_numpy.py")):
        path = Path(folder) / f"{twin}.json"
        try:
            reports[twin] = json.loads(path.read_text())
        except FileNotFoundError:
            raise common.UserError(f"{path} is missing: run `python {script}` first "
                                   f"(with --out {folder} if you chose another folder)."
                                   ) from None
        except (OSError, ValueError) as e:
            raise common.UserError(f"{path} is not a readable results file ({e}).") from None
        missing = [key for key in common.REPORT_KEYS
                   if not isinstance(reports[twin], dict) or key not in reports[twin]]
        if missing:
            raise common.UserError(f"{path} is not a results file of this repo's twins "
                                   f"(it has no {missing[0]!r}): run `python {script}` again.")
    k, n = reports["keras"], reports["numpy"]
    if k["dataset"] != n["dataset"]:
        raise common.UserError(f"The twins' runs in {folder} are on different datasets "
                               f"(Keras on {k['dataset']}, NumPy on {n['dataset']}); run both "
                               "on the same one to compare them.")
    if k["network"] != n["network"]:
        layer = next((f"{a} against {b}" for a, b in zip(k["network"], n["network"]) if a != b),
                     f"{len(k['network'])} layers against {len(n['network'])}")
        raise common.UserError(f"The twins' runs in {folder} are of different networks "
                               f"(Keras's layer {layer}, NumPy's); edit both build_model "
                               "functions the same way and run both again.")
    return reports


def table(reports):
    k, n = reports["keras"], reports["numpy"]
    lines = [f"{'':<16} {'Keras':>12} {'NumPy':>12}"]
    lines += [f"{label:<16} {show(k):>12} {show(n):>12}" for label, show in ROWS]
    per_epoch = {t: r["train_seconds"] / max(r["epochs"], 1) for t, r in reports.items()}
    ratio = per_epoch["numpy"] / max(per_epoch["keras"], 1e-9)
    lines.append(f"{'NumPy / Keras':<16} {'':>12} {ratio:>11.2f}x  (time per epoch)")
    return "\n".join(lines)


def curves_figure(reports, path):
    from helpers import plots
    plt = plots.plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for twin, style in (("keras", "-"), ("numpy", "--")):
            h = reports[twin]["history"]
            epochs = np.arange(1, len(h[key]) + 1)
            ax.plot(epochs, h[key], "o" + style, label=f"{twin} training")
            ax.plot(epochs, h["val_" + key], "s" + style, label=f"{twin} validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("The twins' training curves")
    plots._save(fig, path)


def keras_loss(model, x, y, training=True):
    """Keras's mean loss on one batch, in the model's dtype, computed from
    the logits as in model.fit. Training mode (batch normalization with the
    batch's statistics) moves nothing: the moving statistics are put back."""
    kept = [(v, v.numpy()) for v in model.non_trainable_variables]
    loss = float(model.loss(y, model(x, training=training)))
    for variable, value in kept:
        variable.assign(value)
    return loss


def shared_dropout_masks(nt, numpy_model, n, dtype, seed=99):
    """Dropout masks for a batch of n that the NumPy twin's Dropout layers
    will draw themselves (each layer's random stream restarted from seed),
    so that the same masks can be given to keras_loss_and_grads: {layer
    name: mask}."""
    masks = {}
    for layer in numpy_model.layers:
        if isinstance(layer, nt.Dropout):
            masks[layer.name] = nt.dropout_mask((n,) + layer.input_shape, layer.rate,
                                                np.random.default_rng(seed), dtype)
            layer.rng = np.random.default_rng(seed)          # it draws that same mask
    return masks


def keras_loss_and_grads(model, x, y, masks=None):
    """Keras's loss (mean cross-entropy), probabilities and gradients for one
    batch, in the model's dtype, run as a TensorFlow graph as in model.fit:
    (probs, loss, [gradient of each trainable variable]).

    masks=None: inference, dropout off. masks={"dropout": array (N, units),
    ...}: training mode, with these dropout masks instead of ones Keras
    draws itself: at each Dropout layer the activations are multiplied by its
    mask, which is what keras.layers.Dropout does with the mask it draws (0
    for a dropped unit, 1 / (1 - rate) for a kept one), so that both twins
    can use the same mask; masks={} is training mode for a network whose
    dropout rate is 0. Moving statistics are put back afterwards.
    """
    import tensorflow as tf

    if not hasattr(model, "_loss_and_grads"):
        @tf.function
        def loss_and_grads(x, y, masks, training):
            with tf.GradientTape() as tape:
                out = x
                for layer in model.layers:
                    if layer.name in masks:
                        out = out * masks[layer.name]
                    else:
                        out = layer(out, training=training)
                loss = model.loss(y, out)
            return out, loss, tape.gradient(loss, model.trainable_variables)
        model._loss_and_grads = loss_and_grads
    kept = [(v, v.numpy()) for v in model.non_trainable_variables]
    probs, loss, grads = model._loss_and_grads(x, y, masks or {}, masks is not None)
    for variable, value in kept:
        variable.assign(value)
    return probs.numpy(), float(loss), [g.numpy() for g in grads]


def keras_gradients(model, grads):
    """Keras's gradients as {"conv1/kernel": array, ...}."""
    by_variable = {id(v): g for v, g in zip(model.trainable_variables, grads)}
    return {f"{layer.name}/{w.name}": by_variable[id(w)]
            for layer in model.layers for w in layer.trainable_weights}


def _batches(x, y, steps, batch_size, seed):
    """The lockstep's batches: `steps` of them, in the twins' shared order
    (the epochs repeat if x holds fewer)."""
    rng, done = common.random_streams(seed)["batches"], 0
    while True:
        for batch in data_utils.iterate_minibatches(x, y, batch_size, rng):
            yield batch
            done += 1
            if done == steps:
                return


def keras_losses(model, x, y, steps, batch_size, seed):
    """Keras's train_on_batch on the lockstep's batches: each step's loss,
    taken in training mode on its batch before that step's update (the loss
    train_on_batch reports passes through a float32 running mean, so it is
    taken in the model's own dtype first), then the last batch's loss at
    inference, after the last update."""
    for xb, yb in _batches(x, y, steps, batch_size, seed):
        loss = keras_loss(model, xb, yb)
        model.train_on_batch(xb, yb)
        yield loss
    yield keras_loss(model, xb, yb, training=False)


def numpy_losses(model, x, y, steps, batch_size, seed, lr=common.DEFAULTS["lr"]):
    """The NumPy twin's train_step on the same batches, its losses taken as
    keras_losses takes Keras's. model may be built by an edited copy of the
    twin: its layers do their own arithmetic."""
    import mnist_cnn_numpy as nt
    optimizer = nt.Adam(lr)
    for xb, yb in _batches(x, y, steps, batch_size, seed):
        loss, _ = nt.train_step(model, optimizer, xb, yb)
        yield float(loss)
    yield float(nt.softmax_cross_entropy(nt.logits(model, xb), yb)[0])


def lockstep(keras_model, numpy_model, x, y, steps, batch_size, seed):
    """Train both models step by step on the same batches, both with dropout
    0: Keras's train_on_batch and the NumPy twin's train_step (forward,
    loss, gradients, Adam). Yields steps + 1 pairs (keras loss, numpy loss),
    one step of each twin at a time: one for each step, before its update,
    and a last one, at inference, after the last update, so that every
    update is checked."""
    lr = float(keras_model.optimizer.learning_rate.numpy())
    return zip(keras_losses(keras_model, x, y, steps, batch_size, seed),
               numpy_losses(numpy_model, x, y, steps, batch_size, seed, lr))


# --- The Keras reference, for the proof without TensorFlow ------------------------

REFERENCE = Path(__file__).resolve().parent / "tests" / "reference" / "keras_reference.npz"
REFERENCE_STEPS, REFERENCE_BATCH = 20, 64


def reference_inputs(data_dir=None):
    """What the reference is computed on: the default network's starting
    weights for seed 0 with small non-zero biases (so that their gradients
    are tested too), the first 64 MNIST test images, and the first 20
    batches of 64 training images in the twins' order for seed 0."""
    import mnist_cnn_numpy as nt
    shapes = nt.build_model(dropout=0.0).weight_shapes()
    weights = common.initial_weights(shapes, 0, np.float64)
    for key in weights:
        if key.endswith("/bias"):
            weights[key] = np.linspace(-0.05, 0.05, weights[key].size)
    (x, y), (x_test, y_test) = data_utils.load_dataset("mnist", data_dir, progress=False)
    n = REFERENCE_STEPS * REFERENCE_BATCH
    return weights, (x_test[:64], y_test[:64]), (x[:n], y[:n])


def keras_reference(data_dir=None):
    """What the Keras twin computes on reference_inputs, in float64: the
    probabilities and loss of the test images, every gradient, and the
    lockstep's losses. {name: array}."""
    import mnist_cnn_keras as kt
    weights, (x, y), (xs, ys) = reference_inputs(data_dir)
    model = kt.build_model(dropout=0.0, dtype="float64")
    kt.set_weights(model, weights)
    probs, loss, grads = keras_loss_and_grads(model, x.astype(np.float64), y)
    found = {"probs": probs, "loss": np.array(loss)}
    found.update({f"grad:{k}": g for k, g in keras_gradients(model, grads).items()})
    model = kt.build_model(dropout=0.0, dtype="float64")
    kt.set_weights(model, weights)
    found["lockstep"] = np.array(list(keras_losses(model, xs.astype(np.float64), ys,
                                                   REFERENCE_STEPS, REFERENCE_BATCH, 0)))
    return found


def write_reference(data_dir=None, path=REFERENCE):
    """Store keras_reference(): the gradients as float32 (half the bytes
    of float64, and 7 digits are plenty for the tolerances below), the rest as float64."""
    found = keras_reference(data_dir)
    stored = {k: (v.astype(np.float32) if k.startswith("grad:") else v) for k, v in found.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_write(path) as f:
        np.savez_compressed(f, **stored)
    return path


# Tolerances against the reference, and why: float64 (both exact to about 1e-15):
# probabilities and loss 1e-10; gradients 1e-6 of each tensor's largest entry (they are
# stored as float32, rounded to 6e-8); lockstep losses 1e-8. float32: the twin proof's.
REFERENCE_TOL = {"float64": (1e-10, 1e-6, 1e-8), "float32": (1e-5, 1e-4, 1e-4)}


def against_reference(data_dir=None, path=REFERENCE, nt=None):
    """The NumPy twin (no TensorFlow) against the stored Keras reference, in
    float64 and float32: [(what, dtype, largest difference, tolerance)]."""
    if nt is None:
        import mnist_cnn_numpy as nt
    try:
        with np.load(path, allow_pickle=False) as stored:
            reference = {k: stored[k] for k in stored.files}
    except (OSError, ValueError, EOFError) as e:
        raise common.UserError(f"The Keras reference {path} cannot be read ({e}); write it "
                               "again with `python compare.py --write-reference`.") from None
    missing = [k for k in ("probs", "loss", "lockstep") if k not in reference]
    if missing:
        raise common.UserError(f"The Keras reference {path} cannot be read (it has no "
                               f"{missing[0]!r}); write it again with `python compare.py "
                               "--write-reference`.")
    weights, (x, y), (xs, ys) = reference_inputs(data_dir)
    rows = []
    for dtype in ("float64", "float32"):
        forward_tol, grad_tol, loss_tol = REFERENCE_TOL[dtype]
        model = nt.build_model(dropout=0.0, dtype=dtype)
        model.set_weights(weights)
        loss, probs = nt.loss_and_grads(model.layers, x.astype(dtype), y)
        rows.append(("probabilities", dtype, float(np.abs(probs - reference["probs"]).max()),
                     forward_tol))
        rows.append(("loss", dtype, abs(float(loss) - float(reference["loss"])), forward_tol))
        worst = max((float(np.abs(g - reference[f"grad:{k}"]).max()
                           / np.abs(reference[f"grad:{k}"]).max()), k)
                    for k, _, g in model.trainable_weights())
        rows.append((f"gradients (worst: {worst[1]})", dtype, worst[0], grad_tol))
        model = nt.build_model(dropout=0.0, dtype=dtype)
        model.set_weights(weights)
        losses = np.array(list(numpy_losses(model, xs.astype(dtype), ys, REFERENCE_STEPS,
                                            REFERENCE_BATCH, 0)))
        rows.append((f"{REFERENCE_STEPS} lockstep losses", dtype,
                     float(np.abs(losses - reference["lockstep"]).max()), loss_tol))
    return rows


def run_reference(args):
    rows = against_reference(args.data_dir)
    print(f"The NumPy twin against the Keras twin's stored reference ({REFERENCE.name}: the "
          "default network, 64 test images, 20 Adam steps):\n")
    print(f"{'':<40} {'dtype':<8} {'largest difference':>18} {'tolerance':>10}")
    for what, dtype, difference, tol in rows:
        mark = "" if difference < tol else "   <- TOO LARGE"
        print(f"{what:<40} {dtype:<8} {difference:>18.2e} {tol:>10.0e}{mark}")
    bad = [f"{what} ({dtype})" for what, dtype, difference, tol in rows if not difference < tol]
    if bad:
        raise common.UserError(f"The NumPy twin differs from the Keras reference: "
                               f"{', '.join(bad)}.")
    print("\nThe same network: every number within its tolerance.")
    return 0


def run_lockstep(args):
    import mnist_cnn_keras as kt
    import mnist_cnn_numpy as nt
    dtype = "float64" if args.float64 else "float32"
    (x, y), _ = data_utils.load_dataset("mnist", args.data_dir)
    x, y = x[:args.steps * args.batch_size], y[:args.steps * args.batch_size]
    keras_model = kt.build_model(dropout=0.0, dtype=dtype)
    numpy_model = nt.build_model(dropout=0.0, seed=args.seed, dtype=dtype)
    kt.set_weights(keras_model, numpy_model.get_weights(), "The NumPy twin's weights")
    print(f"Both twins: the same starting weights (seed {args.seed}), {dtype}, "
          f"dropout off, the same {args.steps} batches of {args.batch_size}.\n")
    print(f"{'step':>5}  {'Keras loss':>20}  {'NumPy loss':>20}  {'difference':>10}")
    losses = lockstep(keras_model, numpy_model, x.astype(dtype), y, args.steps,
                      args.batch_size, args.seed)
    for i, (k, n) in enumerate(losses, start=1):
        step = f"{i:>5}" if i <= args.steps else "after"
        print(f"{step}  {k:>20.15f}  {n:>20.15f}  {abs(k - n):>10.1e}")
    print("(each step's loss is taken on its batch before the update; 'after' is the "
          "last batch again, after the last update)")
    kw, nw = kt.get_weights(keras_model), numpy_model.get_weights()
    worst = max(kw, key=lambda key: np.max(np.abs(kw[key] - nw[key])))
    print(f"\nLargest weight difference after {args.steps} steps: "
          f"{np.max(np.abs(kw[worst] - nw[worst])):.1e} (in {worst}; its largest "
          f"weight is {np.max(np.abs(kw[worst])):.2f})")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=common.HelpWithDefaults)
    p.add_argument("--results", default=None, metavar="DIR",
                   help="folder with keras.json and numpy.json; default: results/<dataset>")
    p.add_argument("--dataset", choices=sorted(data_utils.DATASETS),
                   default=common.DEFAULTS["dataset"],
                   help="which dataset's default folder; the lockstep is on MNIST")
    p.add_argument("--lockstep", dest="steps", type=common._positive(int), metavar="STEPS",
                   help="instead: train both twins for STEPS steps in lockstep")
    p.add_argument("--float64", action="store_true", help="lockstep in float64")
    p.add_argument("--batch-size", type=common._positive(int), default=64,
                   help="lockstep batch size")
    p.add_argument("--seed", type=common._seed, default=0, help="lockstep seed")
    p.add_argument("--reference", action="store_true",
                   help="instead: check the NumPy twin against the stored Keras reference "
                        "(no TensorFlow needed)")
    p.add_argument("--write-reference", action="store_true",
                   help="instead: compute the Keras reference again and store it "
                        "(needs TensorFlow)")
    p.add_argument("--data-dir", default=None, help="data folder (lockstep, reference)")
    args = p.parse_args(argv)
    if args.write_reference:
        print(f"Wrote {write_reference(args.data_dir)}")
        return 0
    if args.reference:
        return run_reference(args)
    if args.steps:
        return run_lockstep(args)
    folder = common.results_folder(args.results, args.dataset)
    reports = read_reports(folder)
    print(table(reports))
    figure = folder / "compare_curves.png"
    with common.ResultSet(folder) as results:
        curves_figure(reports, results.path(figure.name))
    print(f"\nWrote {figure}")
    return 0


if __name__ == "__main__":
    common.run(main)
