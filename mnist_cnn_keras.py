"""A small convolutional network for MNIST, in Keras: the reference twin.

    python mnist_cnn_keras.py                 # train 12 epochs, about 99.2%
    python mnist_cnn_keras.py --help          # every flag, with its default

The same network is built from scratch in mnist_cnn_numpy.py, with the same
flags, the same starting weights, the same batches and the same report. Read
this file first for *what* the network is; then read the NumPy twin for
*how* each line below is computed. Beside each layer, a comment names the
NumPy function that does the same arithmetic.

Writes to --out (default results/): keras.json (the report),
keras.weights.npz (the weights, loadable by either twin) and the figures.
"""

# =============================================================================
# Setup
# =============================================================================
import os
import sys
import time

# TensorFlow prints start-up chatter from C++ (CUDA probing, CPU features).
# Silence it before the import; a GPU, if present, is still used.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np                                          # noqa: E402

import common                                               # noqa: E402
import data_utils                                           # noqa: E402
import own_digits                                           # noqa: E402


def import_keras():
    """Import TensorFlow and Keras with the C++ start-up log lines hidden.

    Some of those lines are written before TensorFlow reads its log level, so
    stderr is pointed at /dev/null at the file-descriptor level during the
    import, and restored right after.
    """
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


keras, tf = import_keras()


# =============================================================================
# Data
# =============================================================================
# Both twins get their data through common.load_splits (from data_utils): the
# same arrays, the same 5,000 validation images, and, in Train below, the same
# batches in the same order for the same seed.


# =============================================================================
# Model
# =============================================================================
def build_model(lr=common.DEFAULTS["lr"], dropout=0.5, dtype="float32"):
    """The twins' network. Layer names key the weights file (common.LAYERS)."""
    layers = keras.layers
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        # conv2d_forward + relu_forward:                     (N, 26, 26, 32)
        layers.Conv2D(32, 3, activation="relu", name="conv1", dtype=dtype),
        # maxpool2d_forward:                                 (N, 13, 13, 32)
        layers.MaxPooling2D(2, name="pool1", dtype=dtype),
        # conv2d_forward + relu_forward:                     (N, 11, 11, 64)
        layers.Conv2D(64, 3, activation="relu", name="conv2", dtype=dtype),
        # maxpool2d_forward (the odd last row/column is dropped): (N, 5, 5, 64)
        layers.MaxPooling2D(2, name="pool2", dtype=dtype),
        # flatten_forward:                                   (N, 1600)
        layers.Flatten(name="flatten", dtype=dtype),
        # dense_forward + relu_forward:                      (N, 128)
        layers.Dense(128, activation="relu", name="dense1", dtype=dtype),
        # dropout_forward (inverted dropout, training only): (N, 128)
        layers.Dropout(dropout, name="dropout", dtype=dtype),
        # dense_forward + softmax_forward:                   (N, 10)
        layers.Dense(10, activation="softmax", name="dense2", dtype=dtype),
    ])
    # adam_update; softmax_cross_entropy (the loss and its gradient p - y)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(dtype=dtype),
                  metrics=["accuracy"])
    return model


def set_weights(model, weights):
    """Copy {"conv1/kernel": array, ...} into the model, layer by layer.

    The arrays are already in Keras's layouts, so nothing is transposed.
    """
    for name in common.WEIGHT_SHAPES:
        model.get_layer(name).set_weights(
            [weights[f"{name}/kernel"], weights[f"{name}/bias"]])


def get_weights(model):
    weights = {}
    for name in common.WEIGHT_SHAPES:
        kernel, bias = model.get_layer(name).get_weights()
        weights[f"{name}/kernel"], weights[f"{name}/bias"] = kernel, bias
    return weights


# =============================================================================
# Train
# =============================================================================
class SharedBatches(keras.utils.PyDataset):
    """The training batches, in the NumPy twin's order.

    The permutation of every epoch comes from data_utils and the seed, drawn
    up front; Keras asks for batch i of the current epoch, which EpochClock
    keeps up to date.
    """

    def __init__(self, x, y, batch_size, orders):
        super().__init__()
        self.x, self.y, self.batch_size, self.orders = x, y, batch_size, orders
        self.epoch = 0

    def __len__(self):
        return -(-len(self.x) // self.batch_size)      # the last batch may be smaller

    def __getitem__(self, i):
        idx = self.orders[self.epoch][i * self.batch_size:(i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


class EpochClock(keras.callbacks.Callback):
    """Tells the batches which epoch it is, and times each epoch."""

    def __init__(self, batches):
        super().__init__()
        self.batches, self.seconds = batches, []

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):          # after validation
        self.seconds.append(time.perf_counter() - self.start)


def train(model, train_set, val_set, args):
    """model.fit on the batch order shared with the NumPy twin."""
    (x, y), rng = train_set, common.random_streams(args.seed)["batches"]
    orders = [data_utils.epoch_order(len(x), rng) for _ in range(args.epochs)]
    batches = SharedBatches(x, y, args.batch_size, orders)
    clock = EpochClock(batches)
    fit = model.fit(batches, epochs=args.epochs, validation_data=val_set,
                    shuffle=False, callbacks=[clock],
                    verbose=1 if sys.stdout.isatty() else 2)   # a bar, or a line per epoch
    history = {k: fit.history[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
    return history, clock.seconds


# =============================================================================
# Evaluate and report
# =============================================================================
def evaluate(model, x, y, batch_size=1000):
    """Test loss and accuracy, and the class probabilities of every image."""
    probs = model.predict(x, batch_size=batch_size, verbose=0)
    loss, accuracy = model.evaluate(x, y, batch_size=batch_size, verbose=0)
    return loss, accuracy, probs


def feature_maps(model, image):
    """The outputs of the conv and pool layers for one image, for the figure."""
    out, maps = image[None], []
    for layer in model.layers:
        out = layer(out)
        if layer.name in common.FEATURE_LAYERS:
            maps.append((layer.name, np.asarray(out[0])))
    return maps


def predict_probs(model, x):
    return model.predict(x, batch_size=256, verbose=0)


# =============================================================================
# main
# =============================================================================
def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    out = common.prepare_out_dir(args.out)
    start_weights = (common.load_weights(args.load_weights) if args.load_weights
                     else common.initial_weights(args.seed))

    # Setup: one seed for Keras's own randomness (dropout) and deterministic
    # ops, so that a run can be repeated exactly.
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()

    spec = data_utils.DATASETS[args.dataset]
    title = f"Keras twin, {spec['title']}"
    if args.predict and args.load_weights:       # only classify the user's images
        model = build_model(args.lr)
        set_weights(model, start_weights)
        return own_digits.report(args.predict, lambda x: predict_probs(model, x),
                                 spec["classes"], out, "keras", title)

    # Data: the same arrays, split and batches as the NumPy twin.
    train_set, val_set, (x_test, y_test) = common.load_splits(args)

    # Model: Keras would draw its own random starting weights; we set the
    # shared ones instead, so both twins start from the very same numbers.
    model = build_model(args.lr)
    set_weights(model, start_weights)
    model.summary()

    # Train
    history, epoch_seconds = {}, []
    if not args.eval_only:
        print(f"Training on {len(train_set[0]):,} {spec['title']} images, "
              f"validating on {len(val_set[0]):,}.")
        history, epoch_seconds = train(model, train_set, val_set, args)

    # Evaluate
    test_loss, test_accuracy, probs = evaluate(model, x_test, y_test)

    # Report: the same files and the same last line as the NumPy twin.
    report = common.make_report("keras", args, len(train_set[0]), test_accuracy,
                                test_loss, epoch_seconds, history)
    # An evaluation alone gets its own file, so the training report stays.
    written = [out / ("keras.eval.json" if args.eval_only else "keras.json")]
    common.write_report(written[0], report)
    if not args.eval_only:
        written.append(out / "keras.weights.npz")
        common.save_weights(written[-1], get_weights(model))
    if not args.no_plots:
        import plots
        written += plots.all_figures("keras", out, report["history"], x_test,
                                     y_test, probs, spec["classes"], title,
                                     model.get_layer("conv1").get_weights()[0],
                                     feature_maps(model, x_test[0]))
    print("Wrote " + ", ".join(str(p) for p in written))
    print(common.summary_line(report))
    if args.predict:
        return own_digits.report(args.predict, lambda x: predict_probs(model, x),
                                 spec["classes"], out, "keras", title)
    return 0


if __name__ == "__main__":
    common.run(main)
