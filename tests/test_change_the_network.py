"""Change the network, exactly as docs/change.md tells a learner to: the same
edit in both twins' build_model gives two twins that train, exchange weights
and pass the proof; the edit in one twin only gives one clear message.

The edits are made to copies of the scripts, never to the repo's files.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import common, edits
import mnist_cnn_keras as kt
import mnist_cnn_numpy as nt
import proof

# docs/change.md, "Change the network": conv1 to 16 filters, dense1 to 64 units.
TWINS = edits.TWINS
load = edits.load


def copy_with_edits(folder, edit):
    """The repo's scripts in folder, with edits.SMALLER made in the twins named."""
    return edits.smaller(folder, twins=edit)


@pytest.fixture(scope="module")
def both_edited(tmp_path_factory):
    return copy_with_edits(tmp_path_factory.mktemp("both"), ["keras", "numpy"])


def load_twins(folder, prefix):
    """Both twins of folder as modules, under names of their own."""
    return (load(folder / TWINS["keras"], f"{prefix}_keras"),
            load(folder / TWINS["numpy"], f"{prefix}_numpy"))


@pytest.fixture(scope="module")
def edited_modules(both_edited):
    return load_twins(both_edited, "edited")


def test_the_edit_changes_the_network(edited_modules):
    ek, en = edited_modules
    shapes = en.build_model().weight_shapes()
    assert shapes["conv1/kernel"][-1] == 16 and shapes["dense1/kernel"][-1] == 64
    assert en.build_model().count_params() != nt.build_model().count_params()
    assert ek.build_model().count_params() == en.build_model().count_params()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edited_twins_pass_the_proof(edited_modules, mnist_head, tmp_path, dtype):
    ek, en = edited_modules
    x, y = mnist_head[0].astype(dtype), mnist_head[1]
    proof.edited_twins_agree(ek, en, x, y, dtype, tmp_path)


def run(folder, twin, *args, data_dir):
    env = dict(os.environ, MNIST_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, TWINS[twin], *map(str, args)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=600)


def train_and_exchange(folder, data_dir, tmp_path):
    """Both (edited) twins in folder train briefly; each evaluates the other's
    weights file and reports the same accuracy and loss. Returns
    {twin: (its training output, its report)}."""
    runs = {}
    for twin in TWINS:
        proc = run(folder, twin, "--train-limit", 300, "--epochs", 1, "--no-plots",
                   "--out", tmp_path / twin, data_dir=data_dir)
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / twin / f"{twin}.json").read_text())
        weights = np.load(tmp_path / twin / f"{twin}.weights.npz", allow_pickle=False)
        params = sum(weights[k].size for k in weights.files)
        assert report["params"] == params and f"Total params: {params:,}" in proc.stdout
        runs[twin] = (proc.stdout, report)
    assert runs["keras"][1]["params"] == runs["numpy"][1]["params"]
    for writer, loader in (("keras", "numpy"), ("numpy", "keras")):
        out = tmp_path / f"{writer}_in_{loader}"
        weights = tmp_path / writer / f"{writer}.weights.npz"
        proc = run(folder, loader, "--load-weights", weights, "--eval-only", "--no-plots",
                   "--out", out, data_dir=data_dir)
        assert proc.returncode == 0, proc.stderr
        swapped = json.loads((out / f"{loader}.eval.json").read_text())
        original = runs[writer][1]
        assert abs(swapped["test_accuracy"] - original["test_accuracy"]) <= 2e-4
        assert abs(swapped["test_loss"] - original["test_loss"]) < 1e-4
    return runs


def test_edited_twins_train_and_exchange_weights(both_edited, real_data_dir, tmp_path):
    runs = train_and_exchange(both_edited, real_data_dir, tmp_path)
    assert runs["numpy"][1]["params"] != nt.build_model().count_params()


def test_one_twin_edited_gives_one_clear_message(tmp_path, real_data_dir):
    """The NumPy twin edited, the Keras twin not: its weights do not load into
    the other twin, and the twin tests say which layers differ."""
    folder = copy_with_edits(tmp_path, ["numpy"])
    proc = run(folder, "numpy", "--train-limit", 100, "--epochs", 1, "--no-plots",
               "--out", tmp_path / "n", data_dir=real_data_dir)
    assert proc.returncode == 0, proc.stderr
    weights = tmp_path / "n" / "numpy.weights.npz"
    proc = run(folder, "keras", "--load-weights", weights, "--eval-only", "--out",
               tmp_path / "k", data_dir=real_data_dir)
    en = load(folder / TWINS["numpy"], "numpy_only_edited")
    edited = en.build_model().weight_shapes()["conv1/kernel"]        # read off each model
    original = kt.weight_shapes(kt.build_model())["conv1/kernel"]
    assert edited != original
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert (f"conv1/kernel has shape {edited}, but this model's layer conv1 needs "
            f"{original}") in proc.stderr
    assert "make the same change in the other" in proc.stderr
    assert not (tmp_path / "k").exists() or not any((tmp_path / "k").iterdir())

    with pytest.raises(AssertionError) as failure:
        proof.same_network(kt, en, kt.build_model(), en.build_model())
    message = str(failure.value)
    assert "edit both build_model functions the same way" in message
    assert f"weight conv1/kernel: Keras twin {original}, NumPy twin {edited}" in message
    assert "weight dense1/kernel" in message and "layer dense1 output" in message
    # And the weights file says the same when loaded in Python.
    with pytest.raises(common.UserError, match="conv1/kernel has shape"):
        common.load_weights(weights, kt.weight_shapes(kt.build_model()))
