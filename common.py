"""What both twins share besides the data: the command line, the starting
weights, the weights file, the report, and how errors reach the user.

Keeping these in one place is what makes the twins twins: the same flags,
the same initial weights for the same seed, the same files written. Nothing
here knows the network's shape: each twin declares its layers once, in its
own build_model, and passes its weights' shapes in ({"conv1/kernel": (3, 3,
1, 32), ...}), so a learner who edits a layer changes it everywhere.
This module needs only NumPy; import_keras imports TensorFlow only when a
caller asks for it.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import data_utils


class UserError(Exception):
    """Bad input from the user: printed as one message, exit status 1."""


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
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a number greater than 0, got {text}")
        return value
    parse.__name__ = kind.__name__          # argparse names the type in errors
    return parse


MAX_SEED = 2**32 - 1                        # what NumPy and Keras both accept


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED:,}, got {text}")
    return value


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
    p.add_argument("--seed", type=_seed, default=DEFAULTS["seed"],
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
    # Exercise 14. Hint: both fans count the K*K positions of a conv kernel.
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def initial_weights(shapes, seed, dtype=np.float32):
    """The starting weights of both twins: {"conv1/kernel": array, ...}.

    shapes: the model's own {"conv1/kernel": (3, 3, 1, 32), ...}, in the
    order of its layers (each twin's weight_shapes gives it). Kernels are
    Glorot-uniform and biases zero, as Keras would make them; a
    BatchNormalization layer starts as Keras's does (gamma and the moving
    variance 1, beta and the moving mean 0). They are drawn here with NumPy,
    one kernel after another in layer order, so that both twins start from
    the *same* numbers.
    """
    rng = random_streams(seed)["init"]
    weights = {}
    for key, shape in shapes.items():
        part = key.split("/")[-1]
        if part == "kernel":
            weights[key] = glorot_uniform(rng, shape, dtype)
        elif part in ("gamma", "moving_variance"):
            weights[key] = np.ones(shape, dtype)
        else:                                   # bias, beta, moving_mean
            weights[key] = np.zeros(shape, dtype)
    return weights


def check_weights(weights, shapes, source):
    """Check {key: array} against the model's {key: shape}; return it.

    Every weight of the model must be there with the model's shape, and
    nothing else: anything else is a UserError naming the layer and both
    shapes. source says where the weights came from, for the message.
    """
    fix = ("A weights file fits only the network that wrote it: if you changed "
           "a layer in one twin, make the same change in the other (README: "
           "\"Change the network\").")
    for key, shape in shapes.items():
        layer = key.rsplit("/", 1)[0]
        if key not in weights:
            raise UserError(f"{source} has no {key!r}, which this model's layer "
                            f"{layer} needs (shape {shape}). {fix}")
        found = tuple(weights[key].shape)
        if found != tuple(shape):
            raise UserError(f"{source}: {key} has shape {found}, but this model's "
                            f"layer {layer} needs {tuple(shape)}. {fix}")
    extra = [key for key in weights if key not in shapes]
    if extra:
        raise UserError(f"{source} has {extra[0]!r} (shape {tuple(weights[extra[0]].shape)}), "
                        f"but this model has no such weight. {fix}")
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
    block finishes. A crash or Ctrl-C leaves the old file (or none).

    The result gets the user's usual file permissions (see
    data_utils.new_part_file).
    """
    path = Path(path)
    tmp, fd = data_utils.new_part_file(path.parent, path.name)
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


def load_weights(path, shapes, dtype=np.float32):
    """Read a weights file and check it against the model that will load it.

    shapes: that model's {"conv1/kernel": (3, 3, 1, 32), ...}. A missing
    key, a wrong shape, an extra layer, integers, NaN or infinite values are
    each a UserError that says which weight and why.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise UserError(f"Weights file not found: {path}") from None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"Weights file {path} is not a readable .npz "
                        f"file ({e}).") from None
    check_weights(found, shapes, f"Weights file {path}")
    for key, array in found.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise UserError(f"Weights file {path}: {key} has dtype "
                            f"{array.dtype}, expected floats.")
        if not np.all(np.isfinite(array)):
            raise UserError(f"Weights file {path}: {key} holds NaN or infinite "
                            "values (written by a training run whose loss "
                            "diverged?); these weights cannot be used.")
    return {key: found[key].astype(dtype) for key in shapes}


def write_report(path, report):
    with atomic_write(path) as f:
        f.write((json.dumps(report, indent=2) + "\n").encode())


def make_report(implementation, args, params, train_images, test_accuracy, test_loss,
                epoch_seconds, history):
    """The results file; both twins write exactly these keys. params: the
    model's number of weights (Keras's "Total params")."""
    return {
        "implementation": implementation,
        "dataset": args.dataset,
        "epochs": len(epoch_seconds),
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "seed": args.seed,
        "train_images": train_images,
        "params": int(params),
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


class ProgressBar:
    """The NumPy twin's per-epoch bar, like Keras's: step/total, time, ETA, running metrics.
    When the output is not a terminal, one line per epoch (Keras verbose=2)."""

    def __init__(self, total):
        self.total, self.start, self.tty = total, time.perf_counter(), sys.stdout.isatty()
        self.last = 0.0

    def update(self, step, metrics):
        now = time.perf_counter()
        if not self.tty or (now - self.last < 0.1 and step < self.total):
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / step * (self.total - step)
        bar = "━" * int(20 * step / self.total)
        print(f"\r{step:>{len(str(self.total))}}/{self.total} {bar:<20} "
              f"{elapsed:.0f}s (ETA {eta:.0f}s) - {_metrics(metrics)}",
              end="", flush=True)

    def close(self, metrics):
        elapsed = time.perf_counter() - self.start
        line = (f"{self.total}/{self.total} - {elapsed:.0f}s - "
                f"{1000 * elapsed / self.total:.0f}ms/step - {_metrics(metrics)}")
        print("\r" + line + "\033[K" if self.tty else line, flush=True)


def _metrics(metrics):
    return " - ".join(f"{k}: {v:.4f}" for k, v in metrics.items())


def diverged(epoch, step, what, lr):
    """The error both twins raise when training blows up: what = "the loss
    became nan", "some weights became NaN or infinite", ..."""
    where = f"epoch {epoch}, step {step}" if step else f"the end of epoch {epoch}"
    return UserError(
        f"Training stopped at {where}: {what}. The learning rate --lr {lr:g} is "
        f"probably too large: try a smaller one, e.g. --lr {lr / 10:g}. "
        "Nothing was written.")


def not_finite(history, weights):
    """What went wrong at the end of an epoch, or None: the epoch's
    validation loss or a weight that is NaN or infinite."""
    if not math.isfinite(history["val_loss"][-1]):
        return f"the validation loss became {history['val_loss'][-1]}"
    bad = [key for key, w in weights.items() if not np.all(np.isfinite(w))]
    if bad:
        return f"{bad[0]} became NaN or infinite"
    return None


def import_keras():
    """Import Keras and TensorFlow with TensorFlow's start-up chatter hidden.

    TensorFlow prints log lines from C++ as it loads (CUDA probing, CPU
    features, oneDNN notes). TF_CPP_MIN_LOG_LEVEL silences most of them,
    but some are written before TensorFlow reads it, so stderr is pointed at
    /dev/null at the file-descriptor level during the import and restored
    right after. A GPU, if present, is still used. Returns (keras, tf).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        import keras
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras, tf


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
