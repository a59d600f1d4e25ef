"""Both twins end to end, as a user runs them: real MNIST, a few hundred
training images, one epoch; then reloading, swapping weights between the
twins, and every kind of bad input."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import common
import mnist_cnn_numpy as nt
from conftest import REPO, run_twin, run_twin_cases

TWINS = ["keras", "numpy"]
REPORT_KEYS = {"implementation", "dataset", "network", "epochs", "batch_size", "learning_rate",
               "seed", "train_images", "params", "test_accuracy", "test_loss",
               "train_seconds", "epoch_seconds", "history"}


@pytest.fixture(scope="module")
def trained(real_data_dir, tmp_path_factory):
    """One short training run of each twin: {twin: (completed process, out dir)}."""
    import data_utils
    from PIL import Image

    # An image of a digit for --predict: a test digit, white on black, enlarged.
    _, (x_test, _) = data_utils.load_dataset("mnist", real_data_dir, progress=False)
    digit = tmp_path_factory.mktemp("images") / "digit.png"
    Image.fromarray((x_test[0, :, :, 0] * 255).astype(np.uint8)).resize((112, 112)).save(digit)
    runs = {}
    for twin in TWINS:
        out = tmp_path_factory.mktemp(twin)
        runs[twin] = (run_twin(twin, "--train-limit", 300, "--epochs", 1, "--seed", 3,
                               "--out", out, "--predict", digit, data_dir=real_data_dir), out)
    return runs


@pytest.mark.parametrize("twin", TWINS)
def test_training_run(trained, twin):
    proc, out = trained[twin]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    weights = np.load(out / f"{twin}.weights.npz", allow_pickle=False)
    params = sum(weights[k].size for k in weights.files)
    assert f"Total params: {params:,}" in proc.stdout
    assert "Training on 300 MNIST images, validating on 5,000." in proc.stdout
    # After training, --predict: one line per image with the top 3 classes.
    assert re.fullmatch(r".*digit\.png: \d \(\d+\.\d%\), \d \(\d+\.\d%\), \d \(\d+\.\d%\)",
                        lines[-2]), lines[-2]
    assert lines[-1].endswith(f"{twin}_own_images.png")
    summary = lines[-3]
    assert summary.startswith("Test accuracy: ") and "s/epoch)" in summary
    assert proc.stderr.strip() == "", proc.stderr            # a quiet start

    report = json.loads((out / f"{twin}.json").read_text())
    assert set(report) == REPORT_KEYS
    assert report["implementation"] == twin and report["dataset"] == "mnist"
    assert (report["epochs"], report["batch_size"], report["seed"]) == (1, 128, 3)
    assert report["train_images"] == 300 and report["params"] == params
    assert report["learning_rate"] == 1e-3 and len(report["epoch_seconds"]) == 1
    assert all(len(v) == 1 for v in report["history"].values())
    # 300 images and 3 Adam steps: well above chance (10%), far from trained.
    assert 0.15 < report["test_accuracy"] < 0.95
    assert f"{100 * report['test_accuracy']:.2f}%" in summary

    shapes = nt.build_model().weight_shapes()                 # the declared network
    assert sorted(weights.files) == sorted(shapes)
    assert all(weights[key].shape == shape for key, shape in shapes.items())
    # Files get the user's usual permissions (as open() would make them).
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for fig in ("curves", "predictions", "confusion", "filters", "feature_maps", "mistakes",
                "own_images"):
        assert (out / f"{twin}_{fig}.png").stat().st_size > 1000
    assert not list(out.glob("*.part"))


def test_same_start_same_batches(trained):
    """Same seed: both twins start from the same weights and see the same
    batches, so after 3 steps they are close (dropout masks differ)."""
    k = json.loads((trained["keras"][1] / "keras.json").read_text())
    n = json.loads((trained["numpy"][1] / "numpy.json").read_text())
    assert abs(k["history"]["val_accuracy"][0] - n["history"]["val_accuracy"][0]) < 0.1


@pytest.mark.parametrize("loader", TWINS)
@pytest.mark.parametrize("writer", TWINS)
def test_reload_and_swap_weights(trained, real_data_dir, tmp_path, writer, loader):
    """Weights written by either twin, evaluated by either twin: same accuracy."""
    weights = trained[writer][1] / f"{writer}.weights.npz"
    proc = run_twin(loader, "--load-weights", weights, "--eval-only", "--no-plots",
                    "--out", tmp_path, data_dir=real_data_dir)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / f"{loader}.eval.json").read_text())
    original = json.loads((trained[writer][1] / f"{writer}.json").read_text())
    # float32 rounding may flip a near-tie between two classes on an image
    # or two of the 10,000; a real mismatch would be far larger.
    assert abs(report["test_accuracy"] - original["test_accuracy"]) <= 2e-4
    assert abs(report["test_loss"] - original["test_loss"]) < 1e-4
    assert report["epochs"] == 0 and not list(tmp_path.glob("*.npz"))


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def bad_weights(tmp_path):
    shapes = nt.build_model().weight_shapes()
    good = common.initial_weights(shapes, 0)
    key = [k for k in shapes if k.endswith("/kernel")][1]        # the second kernel
    layer, shape = key.split("/")[0], shapes[key]
    wrong = shape[:-1] + (shape[-1] + 1,)
    bias = [k for k in shapes if k.endswith("/bias")][-2]
    nan = dict(good, **{key: np.where(np.arange(good[key].size).reshape(shape) == 5,
                                      np.nan, good[key])})
    (tmp_path / "text.npz").write_text("not a weights file")
    return {
        "missing_file": (tmp_path / "nope.npz", "Weights file not found"),
        "not_npz": (tmp_path / "text.npz", "cannot be read as a weights file"),
        "wrong_shape": (write_npz(tmp_path / "shape.npz", **dict(good, **{key: np.zeros(wrong)})),
                        f"{key} has shape {wrong}, but this model's layer {layer} needs {shape}"),
        "missing_key": (write_npz(tmp_path / "key.npz",
                                  **{k: v for k, v in good.items() if k != bias}),
                        f"has no {bias!r}, which this model's layer {bias.split('/')[0]} needs"),
        "extra_key": (write_npz(tmp_path / "extra.npz", **good, **{"bn/gamma": np.ones(3)}),
                      "has 'bn/gamma' (shape (3,)), but this model has no such weight"),
        "nan": (write_npz(tmp_path / "nan.npz", **nan), f"{key} holds NaN or infinite values"),
    }


BAD_FLAGS = [
    (["--epochs", "0"], "--epochs: must be a number greater than 0"),
    (["--batch-size", "-5"], "--batch-size: must be a number greater than 0"),
    (["--train-limit", "0"], "--train-limit: must be a number greater than 0"),
    (["--lr", "0"], "--lr: must be a number greater than 0"),
    (["--lr", "nan"], "--lr: must be a number greater than 0"),
    (["--lr", "inf"], "--lr: must be a number greater than 0"),
    (["--lr", "fast"], "--lr: 'fast' is not a number"),
    (["--seed", "-1"], "--seed: must be between 0 and 4,294,967,295, got -1"),
    (["--seed", str(2**32)], "--seed: must be between 0 and 4,294,967,295"),
    (["--seed", "1.5"], "--seed: '1.5' is not a whole number"),
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["--eval-only"], "--eval-only needs --load-weights"),
]


@pytest.mark.parametrize("twin", TWINS)
def test_bad_input(twin, real_data_dir, tmp_path):
    """One clear message, a non-zero exit, no traceback, nothing written."""
    cases = [(flags, msg, 2) for flags, msg in BAD_FLAGS]
    for path, msg in bad_weights(tmp_path).values():
        cases.append((["--load-weights", path, "--eval-only"], msg, 1))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases.append((["--out", blocker / "sub", "--epochs", "1"], "Cannot write to --out", 1))
    # A learning rate that makes the weights blow up: stopped, nothing written.
    cases.append((["--lr", "1e30", "--train-limit", "300", "--epochs", "1", "--no-plots"],
                  "is probably too large: try a smaller one, e.g. --lr 1e+29", 1))
    runs = run_twin_cases(twin, [flags for flags, _, _ in cases], tmp_path, real_data_dir)
    for (flags, message, code), (proc, out) in zip(cases, runs):
        assert proc.returncode == code, (flags, proc.stderr)
        assert message in proc.stderr, (flags, proc.stderr)
        assert "Traceback" not in proc.stderr, (flags, proc.stderr)
        if code == 1:                                   # exactly one line: the message
            assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, \
                (flags, proc.stderr)
        assert not out.exists() or not any(out.iterdir()), flags
    assert blocker.is_file() and blocker.read_text() == ""


@pytest.mark.parametrize("script", ["mnist_cnn_keras.py", "mnist_cnn_numpy.py", "draw.py",
                                    "compare.py", "exercises.py", "data_utils.py"])
def test_help_says_each_default_once(script):
    """--help: every flag's default at most once, never "(default: None)",
    and a default of 0 shown like any other."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    flags = []
    for line in proc.stdout.split("options:", 1)[1].split("\n\n")[0].splitlines():
        if line.startswith("  -"):
            flags.append("")
        if flags:
            flags[-1] += " " + line
    assert len(flags) > 2
    for flag in flags:
        words = " ".join(flag.split())
        assert words.count("default") <= 1, words
        assert "(default: None)" not in words and "(default: False)" not in words, words
    if script.startswith("mnist_cnn"):
        assert re.search(r"--seed SEED\s+seed for the initial weights.*\(default: 0\)",
                         " ".join(proc.stdout.split()))
