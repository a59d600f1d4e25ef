"""The benchmark and compare.py still work (the full benchmark is run by hand)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

import compare
import mnist_cnn_numpy as nt

sys.path.insert(0, str(REPO / "benchmarks"))
import benchmark  # noqa: E402
import tables  # noqa: E402


def test_benchmark_quick(real_data_dir, tmp_path, monkeypatch):
    env = dict(os.environ, MNIST_DATA_DIR=str(real_data_dir))
    proc = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--quick", "--out", tmp_path],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NumPy / Keras time per epoch:" in proc.stdout and "trust this one" in proc.stdout
    results = json.loads((tmp_path / "benchmark.json").read_text())
    for twin in ("keras", "numpy"):
        r = results[twin]
        assert 0 < r["fastest_epoch_seconds"] <= r["median_epoch_seconds"]
        assert r["peak_memory_mb"] > 50 and r["cpu_ms_per_image"] > 0
        assert results["settings"]["train_images"] == 300
        assert r["images_per_second"] * r["fastest_epoch_seconds"] == pytest.approx(300)
        assert 0 < r["test_accuracy"] <= 1
        # every twin sleeps at least once a step: waiting for its batch, its helper or its pool
        assert r["context_switches_per_step"]["voluntary"] >= 1
        assert set(r["context_switches_per_step"]) == {"voluntary", "involuntary"}
    assert "Context switches / step, vol." in proc.stdout
    assert results["ratio_fastest_epochs"] == (results["numpy"]["fastest_epoch_seconds"]
                                               / results["keras"]["fastest_epoch_seconds"])
    assert len(results["ratio_fastest_per_round"]) == 1 and "round by round:" in proc.stdout
    assert results["matmul_gflops"]["square 2048"] > 1
    assert results["machine"]["blas"][0]["architecture"] and "BLAS: " in proc.stdout
    assert results["machine"]["cpu"] and "CPU: " in proc.stdout
    assert 0 < results["numpy_fraction_of_matmul_peak"] < 1
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    line = tables.context_switches("benchmark")
    keras_sleeps = results["keras"]["context_switches_per_step"]["voluntary"]
    assert line.startswith(f"Context switches per training step: Keras {keras_sleeps:.0f} ")
    assert "a run of 2 epochs on 300 images" in line and results["machine"]["cpu"] in line


def test_blas_kernels_reach_the_twins():
    """--blas-kernels sets or removes OPENBLAS_CORETYPE for the children."""
    assert "OPENBLAS_CORETYPE" not in benchmark.child_environment("cpu")
    assert benchmark.child_environment("SkylakeX")["OPENBLAS_CORETYPE"] == "SkylakeX"
    assert benchmark.blas_info("Haswell")[0]["architecture"] == "Haswell"


def test_layer_table_runs(real_data_dir):
    env = dict(os.environ, MNIST_DATA_DIR=str(real_data_dir))
    proc = subprocess.run([sys.executable, "benchmarks/layers.py", "--repeats", "1",
                           "--blas-kernels", "Haswell"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(BLAS: Haswell kernels" in proc.stdout     # run again with the kernels asked for
    rows = [line.split() for line in proc.stdout.splitlines()]
    names = {row[0] for row in rows}
    for layer in nt.build_model().layers:
        assert layer.name in names
    assert "loss" in names and "Adam" in names and "share" in proc.stdout


def test_default_runs_and_their_table(real_data_dir, tmp_path, monkeypatch):
    """benchmarks/default_runs.py on an edited copy (quick settings): both
    twins, each on the other's weights, and the table the docs print from it."""
    env = dict(os.environ, MNIST_DATA_DIR=str(real_data_dir))
    proc = subprocess.run([sys.executable, "benchmarks/default_runs.py", "--seeds", "3",
                           "--network", "smaller", "--epochs", "1", "--train-limit", "300",
                           "--out", tmp_path, "--name", "quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "quick.json").read_text())
    assert [(r["twin"], r["seed"], r["params"]) for r in data["runs"]] == [
        ("keras", 3, 112_554), ("numpy", 3, 112_554)]
    assert {(c["twin"], c["weights_of"]) for c in data["cross"]} == {
        ("numpy", "keras"), ("keras", "numpy")}
    for c in data["cross"]:
        assert abs(c["test_accuracy"] - c["trainer_accuracy"]) <= 2e-4
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    table = tables.default_runs("quick")
    keras_run = data["runs"][0]
    assert f"| 3 | {100 * keras_run['test_accuracy']:.2f}% / " in table
    assert "The smaller network (112,554 parameters), 1 epoch on 300 MNIST" in table
    assert data["machine"]["cpu"] in table


def report(twin, accuracy, seconds):
    model = nt.build_model()
    return {"implementation": twin, "dataset": "mnist", "epochs": 2, "batch_size": 128,
            "network": [[layer.name, type(layer).__name__, list(layer.output_shape)]
                        for layer in model.layers],
            "learning_rate": 1e-3, "seed": 0, "train_images": 55000,
            "params": nt.build_model().count_params(),
            "test_accuracy": accuracy, "test_loss": 0.03, "train_seconds": seconds,
            "epoch_seconds": [seconds / 2] * 2,
            "history": {k: [0.5, 0.6] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}}


def test_compare_table_and_figure(tmp_path, capsys):
    (tmp_path / "keras.json").write_text(json.dumps(report("keras", 0.9912, 20.0)))
    (tmp_path / "numpy.json").write_text(json.dumps(report("numpy", 0.9905, 30.0)))
    assert compare.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Test accuracy          99.12%       99.05%" in out
    assert "Time per epoch         10.0 s       15.0 s" in out
    assert "1.50x" in out
    assert (tmp_path / "compare_curves.png").stat().st_size > 1000


def test_compare_says_which_script_to_run(tmp_path):
    (tmp_path / "keras.json").write_text(json.dumps(report("keras", 0.99, 20.0)))
    proc = subprocess.run([sys.executable, "compare.py", "--results", tmp_path], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "numpy.json is missing: run `python mnist_cnn_numpy.py` first" in proc.stderr
