"""What both twins share besides the data: the command line, the starting
weights, the weights file, the report, and how errors reach the user.

Keeping these in one place is what makes the twins twins: the same flags,
the same initial weights for the same seed, the same files written. This
module needs only NumPy (never TensorFlow).
"""

import argparse
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import data_utils


class UserError(Exception):
    """Bad input from the user: printed as one message, exit status 1."""


# The network, layer by layer: (name, description, output shape after it).
# Both twins give their layers exactly these names; the weights file uses them.
LAYERS = [
    ("conv1", "Conv2D(32, 3x3, relu)", (26, 26, 32)),
    ("pool1", "MaxPooling2D(2x2)", (13, 13, 32)),
    ("conv2", "Conv2D(64, 3x3, relu)", (11, 11, 64)),
    ("pool2", "MaxPooling2D(2x2)", (5, 5, 64)),
    ("flatten", "Flatten", (1600,)),
    ("dense1", "Dense(128, relu)", (128,)),
    ("dropout", "Dropout(0.5)", (128,)),
    ("dense2", "Dense(10, softmax)", (10,)),
]

# The layers whose outputs the feature-map figure shows.
FEATURE_LAYERS = ("conv1", "pool1", "conv2", "pool2")

# The shapes of the weights, in Keras's layouts: a conv kernel is
# (kernel height, kernel width, input channels, filters), a dense kernel is
# (inputs, units). 320 + 18,496 + 204,928 + 1,290 = 225,034 parameters.
WEIGHT_SHAPES = {
    "conv1": {"kernel": (3, 3, 1, 32), "bias": (32,)},
    "conv2": {"kernel": (3, 3, 32, 64), "bias": (64,)},
    "dense1": {"kernel": (1600, 128), "bias": (128,)},
    "dense2": {"kernel": (128, 10), "bias": (10,)},
}
PARAMS = sum(int(np.prod(s)) for w in WEIGHT_SHAPES.values() for s in w.values())

DEFAULTS = {"epochs": 12, "batch_size": 128, "lr": 1e-3, "seed": 0,
            "dataset": "mnist", "out": "results"}


# ---------------------------------------------------------------------------
# Command line: the same flags and defaults in both twins
# ---------------------------------------------------------------------------

def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value
    parse.__name__ = kind.__name__          # argparse names the type in errors
    return parse


def parse_args(description, argv=None):
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=_positive(int), default=DEFAULTS["epochs"],
                   help="passes over the training images")
    p.add_argument("--batch-size", type=_positive(int),
                   default=DEFAULTS["batch_size"], help="images per Adam step")
    p.add_argument("--lr", type=_positive(float), default=DEFAULTS["lr"],
                   help="Adam learning rate")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help="seed for the initial weights, batch order and dropout")
    p.add_argument("--train-limit", type=_positive(int), default=None,
                   metavar="N", help="train on the first N training images "
                   "only (quick runs); default: all 55,000")
    p.add_argument("--dataset", choices=sorted(data_utils.DATASETS),
                   default=DEFAULTS["dataset"], help="which dataset")
    p.add_argument("--data-dir", default=None,
                   help="data folder; default: $MNIST_DATA_DIR, else "
                        "~/.cache/mnist-twins")
    p.add_argument("--out", default=DEFAULTS["out"], metavar="DIR",
                   help="folder for the report, weights and figures")
    p.add_argument("--load-weights", default=None, metavar="PATH",
                   help="start from this .weights.npz file (either twin's)")
    p.add_argument("--eval-only", action="store_true",
                   help="with --load-weights: only evaluate on the test set")
    p.add_argument("--no-plots", action="store_true",
                   help="do not draw the figures")
    p.add_argument("--predict", nargs="+", metavar="IMAGE",
                   help="classify your own PNG/JPEG images: after training, or "
                        "instead of it with --load-weights")
    args = p.parse_args(argv)
    if args.eval_only and not args.load_weights:
        p.error("--eval-only needs --load-weights PATH (there is nothing "
                "to evaluate otherwise)")
    return args


# ---------------------------------------------------------------------------
# Random streams and the starting weights
# ---------------------------------------------------------------------------

def random_streams(seed):
    """Three independent NumPy generators from one seed.

    "init" draws the starting weights, "batches" the order of each epoch,
    "dropout" the NumPy twin's dropout masks. Separate streams mean that the
    batch order does not depend on how many random numbers dropout used, so
    both twins see the same batches.
    """
    init, batches, dropout = np.random.SeedSequence(seed).spawn(3)
    return {"init": np.random.default_rng(init),
            "batches": np.random.default_rng(batches),
            "dropout": np.random.default_rng(dropout)}


def glorot_uniform(rng, shape, dtype=np.float32):
    """Keras's default kernel initialiser: U(-limit, limit), with
    limit = sqrt(6 / (fan_in + fan_out)). For a conv kernel (kh, kw, C, F)
    fan_in = kh*kw*C and fan_out = kh*kw*F; for a dense kernel (in, out)
    they are in and out."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def initial_weights(seed, dtype=np.float32):
    """The starting weights of both twins: {"conv1/kernel": array, ...}.

    Glorot-uniform kernels and zero biases, as Keras would make them, but
    drawn here with NumPy so that both twins start from the *same* numbers.
    """
    rng = random_streams(seed)["init"]
    weights = {}
    for layer, shapes in WEIGHT_SHAPES.items():
        weights[f"{layer}/kernel"] = glorot_uniform(rng, shapes["kernel"], dtype)
        weights[f"{layer}/bias"] = np.zeros(shapes["bias"], dtype)
    return weights


# ---------------------------------------------------------------------------
# Files: the weights (.npz), the report (.json), written all-or-nothing
# ---------------------------------------------------------------------------

def prepare_out_dir(out):
    """Create --out (if needed) and check that it is writable, before training."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"Cannot write to --out {out} "
                        f"({e.strerror or e}).") from None
    return out


@contextmanager
def atomic_write(path):
    """Open a temporary file beside `path`; rename it to `path` only if the
    block finishes. A crash or Ctrl-C leaves the old file (or none)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                               suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_weights(path, weights):
    """Write {"conv1/kernel": array, ...} as an .npz file (no pickle inside)."""
    with atomic_write(path) as f:
        np.savez(f, **{k: np.asarray(v) for k, v in weights.items()})


def load_weights(path, dtype=np.float32):
    """Read and check a weights file; return {"conv1/kernel": array, ...}.

    Every layer must be there with the right shape; anything else is a
    UserError that names the layer, the expected and the found shape.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise UserError(f"Weights file not found: {path}") from None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"Weights file {path} is not a readable .npz "
                        f"file ({e}).") from None
    weights = {}
    for layer, shapes in WEIGHT_SHAPES.items():
        for part, shape in shapes.items():
            key = f"{layer}/{part}"
            if key not in found:
                raise UserError(f"Weights file {path}: no {key!r} for layer "
                                f"{layer} (expected shape {shape}).")
            if found[key].shape != shape:
                raise UserError(f"Weights file {path}: {key} has shape "
                                f"{found[key].shape}, expected {shape}.")
            if not np.issubdtype(found[key].dtype, np.floating):
                raise UserError(f"Weights file {path}: {key} has dtype "
                                f"{found[key].dtype}, expected floats.")
            weights[key] = found[key].astype(dtype)
    return weights


def write_report(path, report):
    with atomic_write(path) as f:
        f.write((json.dumps(report, indent=2) + "\n").encode())


def make_report(implementation, args, train_images, test_accuracy, test_loss,
                epoch_seconds, history):
    """The results file; both twins write exactly these keys."""
    return {
        "implementation": implementation,
        "dataset": args.dataset,
        "epochs": len(epoch_seconds),
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "seed": args.seed,
        "train_images": train_images,
        "params": PARAMS,
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "train_seconds": float(sum(epoch_seconds)),
        "epoch_seconds": [float(s) for s in epoch_seconds],
        "history": {k: [float(v) for v in history.get(k, [])]
                    for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
    }


def summary_line(report):
    """The last line both twins print, in one fixed format."""
    line = (f"Test accuracy: {100 * report['test_accuracy']:.2f}%   "
            f"Test loss: {report['test_loss']:.4f}   ")
    if not report["epochs"]:
        return line + "Train time: none (evaluation only)"
    return line + (f"Train time: {report['train_seconds']:.1f} s "
                   f"({report['train_seconds'] / report['epochs']:.1f} s/epoch)")


# ---------------------------------------------------------------------------
# Running a twin: data, timing, errors
# ---------------------------------------------------------------------------

def load_splits(args):
    """(train, validation, test) as (x, y) pairs, the same for both twins."""
    (x_train, y_train), test = data_utils.load_dataset(args.dataset, args.data_dir)
    train, val = data_utils.split_validation(x_train, y_train)
    if args.train_limit:
        train = (train[0][:args.train_limit], train[1][:args.train_limit])
    return train, val, test


def run(main):
    """Call main(); turn a user's mistake into one message and exit status 1.

    Only UserError, DataError and Ctrl-C are caught: a bug still shows its
    traceback, as it should.
    """
    try:
        sys.exit(main())
    except (UserError, data_utils.DataError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        sys.exit(130)
