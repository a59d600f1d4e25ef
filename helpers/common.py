"""What both twins share besides the data: the command line, the starting
weights, the weights file, the report, the training log, the one main both
twins run, and how errors reach the user.

Keeping these in one place is what makes the twins twins: the same flags,
the same initial weights for the same seed, the same files written, the
same printed lines. Nothing here knows the network's shape: each twin
declares its layers once, in its own build_model, and passes its weights'
shapes in ({"conv1/kernel": (3, 3, 1, 32), ...}), so a learner who edits a
layer changes it everywhere. Needs NumPy and data_utils (NumPy and
requests); import_keras imports TensorFlow only when a twin asks for it.
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

import data_utils
from helpers.progress import ProgressBar


class UserError(Exception):
    """Bad input from the user: printed as one message, exit status 1."""


DEFAULTS = {"epochs": 12, "batch_size": 128, "lr": 1e-3, "seed": 0,
            "dataset": "mnist", "out": "results"}      # out: results/<dataset>/


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


class HelpWithDefaults(argparse.HelpFormatter):
    """--help says each flag's default once: argparse's own "(default: X)",
    unless the help text says it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and not any(action.default is v for v in
                                                 (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def results_folder(out, dataset):
    """Where a run writes: --out, or results/<dataset>/ so that runs on
    different datasets never overwrite each other."""
    return Path(out) if out else Path(DEFAULTS["out"]) / dataset


def parser(description):
    """Both twins' command line (docs/data.md prints its table from this)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpWithDefaults)
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
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the report, weights and figures; default: "
                        "results/<dataset>")
    p.add_argument("--load-weights", default=None, metavar="PATH",
                   help="start from this .weights.npz file (either twin's)")
    p.add_argument("--eval-only", action="store_true",
                   help="with --load-weights: only evaluate on the test set")
    p.add_argument("--no-plots", action="store_true",
                   help="do not draw the figures")
    p.add_argument("--predict", nargs="+", metavar="IMAGE",
                   help="classify your own PNG/JPEG images: after training, or "
                        "instead of it with --load-weights")
    return p


def parse_args(description, argv=None):
    p = parser(description)
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
    # Exercise. Hint: both fans count the K*K positions of a conv kernel.
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
           "a layer in one twin, make the same change in the other (docs/change.md: "
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

def prepare_out_dir(out, dataset=None, reports=()):
    """Create --out (if needed) and check, before any work, that it is
    writable and that the reports this run would replace (reports: file
    names) are of the same dataset: a run never overwrites another
    dataset's results."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"Cannot write to --out {out} "
                        f"({e.strerror or e}).") from None
    for name in reports:
        try:
            other = json.loads((out / name).read_text()).get("dataset")
        except (OSError, ValueError, AttributeError):
            continue                              # nothing there, or not a report
        if dataset and other != dataset:
            raise UserError(f"{out / name} holds the results of a run on {other}; this run is "
                            f"on {dataset}. Choose another --out (by default each dataset "
                            "has its own folder, results/<dataset>/).")
    return out


class ResultSet:
    """A run's files, written as one set: each into a hidden folder inside
    --out first, then all moved into place together (os.replace, which
    cannot run out of space) once every one is complete. A full disk, an
    error or a signal on the way leaves --out as it was.

        with ResultSet(out) as results:
            write_report(results.path("numpy.json"), report)   # ...
        # here, and only here, the files are in out
    """

    def __init__(self, out):
        self.out = Path(out)

    def __enter__(self):
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=self.out))
        except OSError as e:
            raise UserError(f"Cannot write to --out {self.out} ({e.strerror or e}).") from None
        return self

    def path(self, name):
        return self.staging / name

    def __exit__(self, kind, error, trace):
        try:
            if kind is None:
                for path in sorted(self.staging.iterdir()):
                    os.replace(path, self.out / path.name)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise UserError(f"Could not write the results to {self.out} "
                            f"({error.strerror or error}); nothing there was changed.") \
                from None
        return False


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

    shapes: that model's {"conv1/kernel": (3, 3, 1, 32), ...}. The file is a
    zip archive of .npy arrays (np.savez); every array's header is read and
    checked against the model (name, shape, float type, the byte count it
    promises) before any of its numbers are, so a damaged or hostile file
    costs no more memory than the model's own weights. Anything wrong (not
    an archive, a damaged one, a missing, extra or misshapen weight,
    integers or objects, NaN, values too large for dtype) is a UserError
    that says which weight and why.
    """
    source = f"Weights file {path}"
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UserError(f"Weights file not found: {path}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{source} cannot be read as a weights file ({reason}): it should be "
                        "the .npz archive a twin writes (not a plain .npy, not a damaged "
                        "copy).") from None
    try:
        with archive:
            members = archive.infolist()
            if len(members) > 2 * len(shapes) + 8:
                raise UserError(f"{source} holds {len(members):,} files; this model has "
                                f"{len(shapes)} weights.")
            headers = {}
            for info in members:
                if not info.filename.endswith(".npy"):
                    raise UserError(f"{source}: its member {info.filename!r} is not an "
                                    "array (.npy): not a file a twin wrote.")
                headers[info.filename[:-len(".npy")]] = _npy_header(archive, info, source)
            check_weights({k: SimpleNamespace(shape=h[0]) for k, h in headers.items()}, shapes,
                          source)
            weights = {}
            for key in shapes:
                shape, kind, info = headers[key]
                with archive.open(info) as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
                weights[key] = _checked_values(array, key, dtype, source)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise UserError(f"{source} is damaged ({e}); write it again, or use another copy.") \
            from None
    return weights


def _npy_header(archive, info, source):
    """(shape, dtype, info) from one .npy member's header, after checking
    that the member holds exactly as many bytes as the header promises."""
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{info.filename}: .npy format version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, kind = read(f)
        header = f.tell()
    key = info.filename[:-len(".npy")]
    if kind.hasobject or kind.kind != "f":
        raise UserError(f"{source}: {key} has dtype {kind}, expected floats.")
    expected = header + int(np.prod(shape, dtype=object)) * kind.itemsize
    if info.file_size != expected:
        raise UserError(f"{source}: {key} declares {shape} {kind} values ({expected:,} bytes), "
                        f"but holds {info.file_size:,}: a damaged or foreign file.")
    return tuple(int(n) for n in shape), kind, info


def _checked_values(array, key, dtype, source):
    if not np.all(np.isfinite(array)):
        raise UserError(f"{source}: {key} holds NaN or infinite values (written by a "
                        "training run whose loss diverged?); these weights cannot be used.")
    largest = float(np.max(np.abs(array))) if array.size else 0.0
    if largest > float(np.finfo(dtype).max):
        raise UserError(f"{source}: {key} holds values up to {largest:.3g}, beyond what "
                        f"the twin's {np.dtype(dtype).name} can hold "
                        f"({np.finfo(dtype).max:.3g}); these weights cannot be used.")
    return array.astype(dtype)


def write_report(path, report):
    """The report as JSON (strict: a NaN is refused, it is not valid JSON)."""
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    with atomic_write(path) as f:
        f.write(text.encode())


REPORT_KEYS = ("implementation", "dataset", "network", "epochs", "batch_size",
               "learning_rate", "seed", "train_images", "params", "test_accuracy",
               "test_loss", "train_seconds", "epoch_seconds", "history")


def make_report(implementation, args, network, params, train_images, test_accuracy,
                test_loss, epoch_seconds, history):
    """The results file; both twins write exactly these keys (REPORT_KEYS).
    network: [[layer name, type, output shape], ...]; params: the model's
    number of weights (Keras's "Total params")."""
    return {
        "implementation": implementation,
        "dataset": args.dataset,
        "network": [[name, kind, list(shape)] for name, kind, shape in network],
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


class TrainingLog:
    """The NumPy twin's books while it trains, kept as Keras's model.fit
    keeps them: a progress bar per epoch, the running loss and accuracy
    (averaged over examples), each epoch's seconds (validation included),
    the history, and a stop with one message when training blows up (a
    loss, a validation loss or a weight that is no longer a finite number).
    NumPy's own overflow warnings are silenced meanwhile: that message says
    more.

        for epoch in log.epochs():      # prints "Epoch 1/12"; times the epoch
            ... log.batch(loss, probs, labels) after every step ...
            log.end_epoch(val_loss, val_accuracy, weights)
    """

    def __init__(self, args, examples):
        self.args, self.steps = args, -(-examples // args.batch_size)
        self.history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
        self.epoch_seconds = []

    def epochs(self):
        for epoch in range(1, self.args.epochs + 1):
            print(f"Epoch {epoch}/{self.args.epochs}", flush=True)
            self.epoch, self.step, self.loss_sum, self.correct, self.seen = epoch, 0, 0.0, 0, 0
            self.bar, self.start = ProgressBar(self.steps), time.perf_counter()
            with np.errstate(over="ignore", invalid="ignore"):
                yield epoch

    def batch(self, loss, probs, labels):
        self.step += 1
        if not np.isfinite(loss):                     # as Keras's TerminateOnNaN
            raise diverged(self.epoch, self.step, f"the loss became {loss}", self.args.lr)
        self.loss_sum += float(loss) * len(labels)
        self.correct += int((probs.argmax(axis=1) == labels).sum())
        self.seen += len(labels)
        self.bar.update(self.step, _metrics({"accuracy": self.correct / self.seen,
                                             "loss": self.loss_sum / self.seen}))

    def end_epoch(self, val_loss, val_accuracy, weights):
        self.epoch_seconds.append(time.perf_counter() - self.start)
        metrics = {"accuracy": self.correct / self.seen, "loss": self.loss_sum / self.seen,
                   "val_accuracy": val_accuracy, "val_loss": val_loss}
        for key in self.history:
            self.history[key].append(metrics[key])
        elapsed = self.epoch_seconds[-1]
        self.bar.close(f"{self.steps}/{self.steps} - {elapsed:.0f}s - "
                       f"{1000 * elapsed / self.steps:.0f}ms/step - {_metrics(metrics)}")
        problem = not_finite(self.history, weights)
        if problem:
            raise diverged(self.epoch, None, problem, self.args.lr)


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


# ---------------------------------------------------------------------------
# The NumPy twin's model: its weights by name, its summary
# ---------------------------------------------------------------------------

class WeightsOfLayers:
    """What the NumPy twin's Sequential does with its layers' weights besides
    learning them: the weights file's keys ("conv1/kernel" is conv1.kernel,
    in Keras's order), loading and saving, counting, and the summary table.
    A subclass sets self.layers and self.dtype."""

    def _weights(self):
        return [(f"{layer.name}/{part}", layer, part)
                for layer in self.layers for part in layer.params + layer.state]

    def weight_shapes(self):
        """{"conv1/kernel": (3, 3, 1, 32), ...}, layer by layer in Keras's order."""
        return {key: getattr(layer, part).shape for key, layer, part in self._weights()}

    def get_weights(self):
        return {key: getattr(layer, part).copy() for key, layer, part in self._weights()}

    def set_weights(self, weights, source="The weights given"):
        """Take {"conv1/kernel": array, ...} in Keras's layouts, as is."""
        check_weights(weights, self.weight_shapes(), source)
        for key, layer, part in self._weights():
            setattr(layer, part, np.array(weights[key], self.dtype))

    def count_params(self):
        return sum(getattr(layer, part).size for _, layer, part in self._weights())

    def summary(self):
        """The same table as Keras's model.summary()."""
        rows = [("Layer (type)", "Output Shape", "Param #")] + [
            (f"{layer.name} ({type(layer).__name__})", str((None,) + layer.output_shape),
             f"{sum(getattr(layer, part).size for part in layer.params + layer.state):,}")
            for layer in self.layers]
        widths = (33, 24, 15)
        print('Model: "sequential"')
        print("┏" + "┳".join("━" * w for w in widths) + "┓")
        for i, (a, b, c) in enumerate(rows):
            bar = "┃" if i == 0 else "│"
            print(f"{bar} {a:<{widths[0] - 2}} {bar} {b:<{widths[1] - 2}} "
                  f"{bar} {c:>{widths[2] - 2}} {bar}")
            left, mid, right, dash = ("┡", "╇", "┩", "━") if i == 0 else ("├", "┼", "┤", "─")
            if i < len(rows) - 1:
                print(left + mid.join(dash * w for w in widths) + right)
        print("└" + "┴".join("─" * w for w in widths) + "┘")
        learned = sum(getattr(layer, part).size for layer in self.layers
                      for part in layer.params)
        total = self.count_params()
        for label, n in (("Total", total), ("Trainable", learned),
                         ("Non-trainable", total - learned)):
            print(f" {label} params: {n:,} ({_memory(n * self.dtype.itemsize)})")


def _memory(size):
    """Bytes as Keras's summary writes them: 879.04 KB."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.2f} {unit}"
        size /= 1024


def default_layer_name(class_name, taken):
    """Keras's default layer name: the class name in snake_case (Conv2D ->
    conv2d, BatchNormalization -> batch_normalization), then _1, _2, ..."""
    base = "".join("_" + c.lower() if c.isupper() and i and not class_name[i - 1].isupper()
                   else c.lower() for i, c in enumerate(class_name))
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


# ---------------------------------------------------------------------------
# main: the same steps, files and printed lines for both twins
# ---------------------------------------------------------------------------

@dataclass
class Twin:
    """The part of main that differs between the twins: how each builds its
    model (with the starting weights for args.seed), reads and writes its
    weights, trains, evaluates and predicts, and what it shows in figures."""
    name: str                     # "keras" or "numpy": the files' prefix
    title: str                    # "Keras twin"
    description: str              # the first line of --help
    build: Callable               # (args) -> model
    weight_shapes: Callable       # (model) -> {"conv1/kernel": shape, ...}
    set_weights: Callable         # (model, weights, source)
    get_weights: Callable         # (model) -> {"conv1/kernel": array, ...}
    train: Callable               # (model, train_set, val_set, args) -> history, seconds
    evaluate: Callable            # (model, x, y) -> loss, accuracy, probs
    predict: Callable             # (model, x) -> probs
    first_kernel: Callable        # (model) -> the first conv layer's kernel
    feature_maps: Callable        # (model, image) -> [(layer name, (H, W, C)), ...]
    layers: Callable              # (model) -> [(name, type, output shape), ...]


def main(twin, argv=None):
    """Both twins' main: the model, the data, training, the test set, the
    report and weights, the figures, and the user's own images. It either
    completes and writes its files as one set, or says what went wrong in
    one line and leaves --out as it was."""
    args = parse_args(twin.description, argv)
    report_name = f"{twin.name}{'.eval' if args.eval_only else ''}.json"
    out = prepare_out_dir(results_folder(args.out, args.dataset), args.dataset, [report_name])
    spec = data_utils.DATASETS[args.dataset]
    title = f"{twin.title}, {spec['title']}"

    # The model: the shared starting weights for the seed, or a weights
    # file written by either twin (checked against this network first).
    model = twin.build(args)
    if args.load_weights:
        twin.set_weights(model, load_weights(args.load_weights, twin.weight_shapes(model)))
        if args.predict:                          # only classify the user's images
            return _predict(twin, model, args.predict, spec, out, title)

    train_set, val_set, (x_test, y_test) = load_splits(args)
    model.summary()
    history, epoch_seconds = {}, []
    if not args.eval_only:
        print(f"Training on {len(train_set[0]):,} {spec['title']} images, "
              f"validating on {len(val_set[0]):,}.")
        history, epoch_seconds = twin.train(model, train_set, val_set, args)
    test_loss, test_accuracy, probs = twin.evaluate(model, x_test, y_test)
    problem = did_not_learn(history, test_accuracy, test_loss, len(spec["classes"]),
                            len(train_set[0]) * len(epoch_seconds))
    if problem:
        raise UserError(problem + (f" If it was training, the learning rate --lr {args.lr:g} "
                                   f"is probably too large: try --lr {args.lr / 10:g}."
                                   if epoch_seconds else "") + " Nothing was written.")

    # The report, the weights and the figures: the same files for both twins,
    # written as one set. An evaluation alone gets its own report file, so
    # that the training report stays.
    report = make_report(twin.name, args, twin.layers(model), model.count_params(),
                         len(train_set[0]), test_accuracy, test_loss, epoch_seconds, history)
    with ResultSet(out) as results:
        write_report(results.path(report_name), report)
        names = [report_name]
        if not args.eval_only:
            names.append(f"{twin.name}.weights.npz")
            save_weights(results.path(names[-1]), twin.get_weights(model))
        if not args.no_plots:
            from helpers import plots
            names += [path.name for path in plots.all_figures(
                twin.name, results.staging, report["history"], x_test, y_test, probs,
                spec["classes"], title, twin.first_kernel(model),
                twin.feature_maps(model, x_test[0]))]
    print("Wrote " + ", ".join(str(out / name) for name in names))
    print(summary_line(report))
    if args.predict:
        return _predict(twin, model, args.predict, spec, out, title)
    return 0


def did_not_learn(history, test_accuracy, test_loss, classes, examples_seen):
    """What says that a run did not learn, or None: a test loss that is not a
    number, a training loss that ended far above guessing's (log of the
    number of classes), or chance-level accuracy after 20,000 examples."""
    guessing = math.log(classes)
    if not math.isfinite(test_loss):
        return f"The test loss is {test_loss}: the weights give no usable probabilities."
    if history.get("loss") and history["loss"][-1] > 2 * guessing:
        return (f"Training did not learn: its loss ended at {history['loss'][-1]:.3g}, far "
                f"above the {guessing:.2f} of guessing, with a test accuracy of "
                f"{100 * test_accuracy:.2f}%.")
    if examples_seen >= 20_000 and test_accuracy < 1.2 / classes:
        return (f"Training did not learn: its test accuracy is {100 * test_accuracy:.2f}%, "
                f"what guessing among {classes} classes gives.")
    return None


def _predict(twin, model, paths, spec, out, title):
    """--predict: one line per image, and the figure of them all."""
    from helpers import own_digits, plots          # need Pillow and matplotlib
    inputs, names, probs, status = own_digits.report(paths, lambda x: twin.predict(model, x),
                                                     spec["classes"])
    if len(inputs):
        name = f"{twin.name}_own_images.png"
        with ResultSet(out) as results:
            plots.own_images_figure(inputs, names, probs, spec["classes"], title,
                                    results.path(name))
        print(f"Wrote {out / name}")
    return status


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
    except KeyboardInterrupt:                 # Ctrl-C in the first seconds: one line too
        os.dup2(saved, 2)
        print("\nInterrupted (Ctrl-C) while TensorFlow was loading; nothing was written.",
              file=sys.stderr)
        sys.exit(130)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras, tf


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt, so that every
    temporary file is removed on the way out."""


def _terminate(signum, frame):
    raise Terminated()


def run(main):
    """Call main(); turn a user's mistake into one message and exit status 1.

    Only UserError, DataError, Ctrl-C and SIGTERM are caught: a bug still
    shows its traceback, as it should. A signal stops the run as an error
    does: the temporary files are removed, and nothing half-written stays.
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except (UserError, data_utils.DataError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nInterrupted (Ctrl-C); nothing was written.", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("\nStopped (SIGTERM); nothing was written.", file=sys.stderr)
        sys.exit(143)
