"""A small convolutional network for MNIST, in Keras: the reference twin.

    python mnist_cnn_keras.py                 # train 12 epochs (README: Results)
    python mnist_cnn_keras.py --help          # every flag, with its default

The same network is built from scratch in mnist_cnn_numpy.py, with the same
flags, the same starting weights, the same batches and the same report. Read
this file first for *what* the network is (build_model); then read the NumPy
twin for *how* each line of it is computed. Beside each layer, a comment
names the NumPy function that does the same arithmetic.

Writes to --out (default results/): keras.json (the report),
keras.weights.npz (the weights, loadable by either twin) and the figures.
"""

# =============================================================================
# Setup
# =============================================================================
import math
import sys
import time
from contextlib import contextmanager

import numpy as np

import data_utils
from helpers import common

keras, tf = common.import_keras()       # (with TensorFlow's start-up log lines hidden)


# =============================================================================
# Data: the NumPy twin's batches, in its order
# =============================================================================
class SharedBatches(keras.utils.PyDataset):
    """The training batches, in the order the NumPy twin visits them: each
    epoch's permutation comes from data_utils and the seed's stream, drawn
    when the epoch starts (EpochClock, below, says when), as the NumPy twin
    draws it."""

    def __init__(self, x, y, batch_size, rng):
        super().__init__()
        self.x, self.y, self.batch_size, self.rng = x, y, batch_size, rng
        self.epoch, self.order = 0, data_utils.epoch_order(len(x), rng)

    def start_epoch(self, epoch):
        if epoch != self.epoch:                        # epoch 0's order is drawn already
            self.epoch, self.order = epoch, data_utils.epoch_order(len(self.x), self.rng)

    def __len__(self):
        return -(-len(self.x) // self.batch_size)      # the last batch may be smaller

    def __getitem__(self, i):
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


# =============================================================================
# Model
# =============================================================================
def build_model(lr=common.DEFAULTS["lr"], dropout=0.5, dtype="float32"):
    """The twins' network, declared once. Compare mnist_cnn_numpy.build_model:
    the same layers, in the same words. Edit both the same way to change the
    network (docs/change.md: "Change the network"): every shape follows from these
    lines, and model.summary() prints them."""
    layers = keras.layers
    with float_type(dtype):              # float32, or float64 in some tests
        model = keras.Sequential([
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu", name="conv1"),  # conv2d_forward, relu_forward
            layers.MaxPooling2D(2, name="pool1"),                   # maxpool2d_forward
            layers.Conv2D(64, 3, activation="relu", name="conv2"),  # conv2d_forward, relu_forward
            layers.MaxPooling2D(2, name="pool2"),                   # maxpool2d_forward
            layers.Flatten(name="flatten"),                         # flatten_forward
            layers.Dense(128, activation="relu", name="dense1"),    # dense_forward, relu_forward
            layers.Dropout(dropout, name="dropout"),                # dropout_mask, dropout_forward
            layers.Dense(10, activation="softmax", name="dense2"),  # dense_forward, softmax
        ])
    # Adam.update; softmax_cross_entropy (the loss and its gradient p - y).
    # Compiled with the default float32 settings: Keras's Adam then rounds
    # its learning rate and betas to float32, which the NumPy Adam copies.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(dtype=dtype),
                  metrics=["accuracy"])
    return model


@contextmanager
def float_type(dtype):
    """Layers and inputs made inside take this float type (Keras's default
    float type and dtype policy, restored afterwards)."""
    saved = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(saved[0])
        keras.config.set_dtype_policy(saved[1])


def weight_shapes(model):
    """{"conv1/kernel": (3, 3, 1, 32), ...}, layer by layer in Keras's order:
    the keys of the weights file, read off the model."""
    return {f"{layer.name}/{w.name}": tuple(w.shape)
            for layer in model.layers for w in layer.weights}


def set_weights(model, weights, source="The weights given"):
    """Copy {"conv1/kernel": array, ...} into the model, layer by layer.

    The arrays are already in Keras's layouts, so nothing is transposed.
    """
    common.check_weights(weights, weight_shapes(model), source)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([weights[f"{layer.name}/{w.name}"] for w in layer.weights])


def get_weights(model):
    return {f"{layer.name}/{w.name}": value for layer in model.layers
            for w, value in zip(layer.weights, layer.get_weights())}


# =============================================================================
# Train
# =============================================================================
class EpochClock(keras.callbacks.Callback):
    """Tells the batches which epoch it is and times each epoch. It also
    stops training that blows up (like TerminateOnNaN, and more): a loss
    that is no longer a number after any step, or a validation loss or a
    weight after any epoch; it notes what and where, for the message."""

    def __init__(self, batches):
        super().__init__()
        self.batches, self.seconds, self.diverged = batches, [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.start_epoch(epoch)
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            self.diverged = (self.batches.epoch + 1, batch + 1, f"the loss became {loss}")
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):          # after validation
        self.seconds.append(time.perf_counter() - self.start)
        problem = common.not_finite({"val_loss": [float(logs["val_loss"])]},
                                    get_weights(self.model))
        if problem and not self.diverged:
            self.diverged = (epoch + 1, None, problem)
            self.model.stop_training = True


def train(model, train_set, val_set, args):
    """model.fit on the batch order shared with the NumPy twin."""
    (x, y), rng = train_set, common.random_streams(args.seed)["batches"]
    batches = SharedBatches(x, y, args.batch_size, rng)
    clock = EpochClock(batches)
    fit = model.fit(batches, epochs=args.epochs, validation_data=val_set,
                    shuffle=False, callbacks=[clock],
                    verbose=1 if sys.stdout.isatty() else 2)   # a bar, or a line per epoch
    if clock.diverged:
        raise common.diverged(*clock.diverged, args.lr)
    history = {k: fit.history[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
    return history, clock.seconds


# =============================================================================
# Evaluate
# =============================================================================
def evaluate(model, x, y, batch_size=1000):
    """Test loss and accuracy, and the class probabilities of every image."""
    probs = model.predict(x, batch_size=batch_size, verbose=0)
    loss, accuracy = model.evaluate(x, y, batch_size=batch_size, verbose=0)
    return loss, accuracy, probs


def predict(model, x):
    return model.predict(x, batch_size=256, verbose=0)


def feature_maps(model, image):
    """What each conv and pool layer (each layer with an (H, W, C) output)
    makes of one image, for the figure: [(layer name, (H, W, C)), ...]."""
    out, maps = image[None], []
    for layer in model.layers:
        out = layer(out)
        if len(out.shape) == 4:
            maps.append((layer.name, np.asarray(out[0])))
    return maps


# =============================================================================
# main: the steps, files and printed lines both twins share (common.main)
# =============================================================================
def start(args):
    """The model for args, holding the shared starting weights for the seed.
    Keras would draw its own; both twins start from the very same numbers."""
    # One seed for Keras's own randomness (dropout) and deterministic ops,
    # so that a run can be repeated exactly.
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    model = build_model(args.lr)
    set_weights(model, common.initial_weights(weight_shapes(model), args.seed))
    return model


TWIN = common.Twin(
    name="keras", title="Keras twin", description=__doc__.splitlines()[0], build=start,
    weight_shapes=weight_shapes, set_weights=set_weights, get_weights=get_weights,
    train=train, evaluate=evaluate, predict=predict,
    first_kernel=lambda model: model.layers[0].get_weights()[0], feature_maps=feature_maps,
    layers=lambda model: [(layer.name, type(layer).__name__, tuple(layer.output.shape[1:]))
                          for layer in model.layers])


def main(argv=None):
    return common.main(TWIN, argv)


if __name__ == "__main__":
    common.run(main)
