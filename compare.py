"""Compare the twins: their results side by side, or the proof in lockstep.

    python compare.py                 # table of results/mnist/keras.json vs numpy.json
                                      # and a figure of both training curves
    python compare.py --lockstep 20   # train both twins from the same weights on
                                      # the same batches, printing both losses
                                      # at every step (needs TensorFlow)

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


def lockstep(keras_model, numpy_model, x, y, steps, batch_size, seed):
    """Train both models step by step on the same batches, both with dropout
    0: Keras's train_on_batch and the NumPy twin's train_step (forward,
    loss, gradients, Adam). Yields steps + 1 pairs (keras loss, numpy loss):
    one for each step, computed in training mode on its batch before that
    step's update, and a last one, at inference, on the last batch after the
    last update, so that every update is checked. numpy_model may be built
    by an edited copy of the NumPy twin: its layers do their own arithmetic."""
    import mnist_cnn_numpy as nt
    optimizer = nt.Adam(float(keras_model.optimizer.learning_rate.numpy()))
    rng, done = common.random_streams(seed)["batches"], 0
    while done < steps:
        for xb, yb in data_utils.iterate_minibatches(x, y, batch_size, rng):
            # The loss train_on_batch reports passes through a float32 running
            # mean, so Keras's loss is taken in the model's own dtype first.
            k_loss = keras_loss(keras_model, xb, yb)
            keras_model.train_on_batch(xb, yb)
            n_loss, _ = nt.train_step(numpy_model, optimizer, xb, yb)
            done += 1
            yield k_loss, float(n_loss)
            if done == steps:
                break
    yield (keras_loss(keras_model, xb, yb, training=False),
           float(nt.softmax_cross_entropy(nt.logits(numpy_model, xb), yb)[0]))


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
    p.add_argument("--data-dir", default=None, help="data folder (lockstep)")
    args = p.parse_args(argv)
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
