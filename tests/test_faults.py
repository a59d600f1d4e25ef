"""Nothing lost, nobody in: faults and hostile input on the command line and
on disk end with one clear message, a non-zero exit, no traceback, and every
file that was there before left as it was. (The page's server: test_draw.py;
downloads: test_data_utils.py.)"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data_utils
import mnist_cnn_numpy as nt
from conftest import REPO, SCRIPT, run_twin, run_twin_cases
from helpers import common

sys.path.insert(0, str(REPO / "benchmarks"))
import faults  # noqa: E402


def snapshot(folder):
    """{name: bytes} of every file in folder (hidden ones too)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_message(proc, code=1):
    """The run ended with exactly one line on stderr, "Error: ..." or the
    signal's, the given status, and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


@pytest.fixture(scope="module")
def previous(real_data_dir, tmp_path_factory):
    """A folder holding a NumPy twin's complete results, as a run left them."""
    out = tmp_path_factory.mktemp("previous")
    proc = run_twin("numpy", "--train-limit", 200, "--epochs", 1, "--out", out,
                    data_dir=real_data_dir)
    assert proc.returncode == 0, proc.stderr
    return out


# --- Weights files: damaged or hostile, each one message, memory bounded ---------

def test_every_damaged_or_hostile_weights_file_gets_one_message(tmp_path):
    """In-process (benchmarks/faults.py's cases), with the memory each load
    used: none beyond what the model's own weights need (about 1 MB; the
    limit here is 8 MB)."""
    rows = faults.try_weights(tmp_path)
    assert len(rows) >= 10
    for row in rows:
        assert row["as_expected"], row
        assert row["peak_mb"] < 8, row


@pytest.mark.parametrize("twin", ["numpy", "keras"])
def test_hostile_weights_on_the_command_line(twin, tmp_path, real_data_dir):
    _, files = faults.hostile_weights(tmp_path)
    cases = ("one byte flipped", "a plain .npy", "declares a 3.6 GB array (60 kB file)",
             "float64 values beyond float32")
    runs = run_twin_cases(twin, [["--load-weights", files[case][0], "--eval-only"]
                                 for case in cases], tmp_path, real_data_dir)
    for case, (proc, out) in zip(cases, runs):
        assert files[case][1] in one_message(proc), case
        assert not out.exists() or not any(out.iterdir()), case


# --- Results: written as a set, or not at all -------------------------------------

def test_a_full_disk_changes_nothing(previous, tmp_path, monkeypatch, real_data_dir):
    """The disk fills up while the weights are written (an injected ENOSPC):
    one message, and the previous run's files are byte for byte as they were
    (no new report beside the old weights, no temporary files)."""
    before = snapshot(previous)

    def full(path, weights):
        with open(path, "wb") as f:
            f.write(b"partly")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common, "save_weights", full)
    monkeypatch.setenv("MNIST_DATA_DIR", str(real_data_dir))
    with pytest.raises(common.UserError, match="No space left on device") as failure:
        common.main(nt.TWIN, ["--train-limit", "100", "--epochs", "1", "--out", str(previous)])
    assert "nothing there was changed" in str(failure.value)
    assert snapshot(previous) == before


def test_a_signal_leaves_nothing_behind(previous, real_data_dir):
    """SIGTERM during training: the run says so, exits 143, and the folder is
    as it was (no hidden temporary file either)."""
    before = snapshot(previous)
    proc = subprocess.Popen([sys.executable, SCRIPT["numpy"], "--train-limit", "3000",
                             "--epochs", "50", "--out", str(previous)], cwd=REPO,
                            env=dict(os.environ, MNIST_DATA_DIR=str(real_data_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while "Epoch 2/" not in line:                        # it is training
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr
    assert stderr.strip() == "Stopped (SIGTERM); nothing was written."
    assert snapshot(previous) == before


def test_ctrl_c_while_tensorflow_loads_is_one_line(tmp_path, real_data_dir):
    proc = subprocess.Popen([sys.executable, SCRIPT["keras"], "--out", str(tmp_path)],
                            cwd=REPO, env=dict(os.environ, MNIST_DATA_DIR=str(real_data_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)                                      # TensorFlow takes seconds to load
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Interrupted (Ctrl-C)" in stderr


def test_results_of_another_dataset_are_never_overwritten(previous, tmp_path, real_data_dir):
    before = snapshot(previous)
    proc = run_twin("numpy", "--dataset", "fashion", "--train-limit", "100", "--epochs", 1,
                    "--out", previous, data_dir=real_data_dir)
    message = one_message(proc)
    assert "holds the results of a run on mnist; this run is on fashion" in message
    assert snapshot(previous) == before
    assert common.results_folder(None, "fashion") == Path("results") / "fashion"


def test_a_run_that_did_not_learn_says_so(tmp_path, real_data_dir):
    proc = run_twin("numpy", "--lr", "50", "--train-limit", "2000", "--epochs", 1, "--no-plots",
                    "--out", tmp_path / "out", data_dir=real_data_dir)
    message = one_message(proc)
    assert "did not learn" in message and "--lr 50" in message and "Nothing was written" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_did_not_learn_rules():
    """Far above guessing's loss, or chance accuracy after enough examples;
    a short run that learned a little is not blamed."""
    assert common.did_not_learn({"loss": [6e11]}, 0.11, 9.0, 10, 2000)
    assert common.did_not_learn({"loss": [2.2]}, 0.098, 2.3, 10, 55000)
    assert common.did_not_learn({}, 0.1, float("nan"), 10, 0)
    assert common.did_not_learn({"loss": [2.2]}, 0.11, 2.2, 10, 300) is None
    assert common.did_not_learn({"loss": [0.05]}, 0.99, 0.03, 10, 660000) is None


def test_reports_are_strict_json(tmp_path):
    with pytest.raises(ValueError):
        common.write_report(tmp_path / "r.json", {"test_loss": float("nan")})
    assert not list(tmp_path.iterdir())


# --- compare.py refuses what cannot be compared ---------------------------------

def _report(previous, **changes):
    report = json.loads((previous / "numpy.json").read_text())
    report.update(changes)
    return report


@pytest.mark.parametrize("change, words", [
    ({"dataset": "fashion"}, "different datasets (Keras on fashion, NumPy on mnist)"),
    ({"network": [["conv1", "Conv2D", [26, 26, 16]]]}, "different networks"),
    (None, "it has no 'history'"),
])
def test_compare_refuses_runs_it_cannot_compare(previous, tmp_path, change, words):
    keras = _report(previous, implementation="keras", **(change or {}))
    if change is None:
        del keras["history"]
    (tmp_path / "keras.json").write_text(json.dumps(keras))
    (tmp_path / "numpy.json").write_text(json.dumps(_report(previous)))
    proc = subprocess.run([sys.executable, "compare.py", "--results", tmp_path], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert words in one_message(proc)
    assert not (tmp_path / "compare_curves.png").exists()


# --- The data cache: a file that cannot be read is not a corrupt one --------------

def test_an_unreadable_data_file_is_never_deleted(tmp_path, monkeypatch):
    """A data file that is there but cannot be read (permissions: injected,
    since the tests may run as root): one message, and the file stays."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"whatever is in it")
    real_open = open

    def refusing(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing)
    with pytest.raises(data_utils.DataError, match="is there but cannot be read "
                                                   r"\(Permission denied\)"):
        data_utils.load_file("mnist", "test_labels", tmp_path, progress=False)
    monkeypatch.undo()
    assert path.read_bytes() == b"whatever is in it"


def test_the_keras_twin_draws_an_epochs_order_when_it_starts():
    """Huge --epochs cost nothing up front: one order is drawn, the next when
    its epoch begins (the same orders as the NumPy twin's, in turn)."""
    import mnist_cnn_keras as kt
    x, y = np.zeros((10, 28, 28, 1), np.float32), np.arange(10)
    rng = common.random_streams(4)["batches"]
    batches = kt.SharedBatches(x, y, 4, rng)
    expected = common.random_streams(4)["batches"]
    assert np.array_equal(batches.order, data_utils.epoch_order(10, expected))
    batches.start_epoch(0)
    batches.start_epoch(1)
    assert np.array_equal(batches.order, data_utils.epoch_order(10, expected))


def helper_pids(pid):
    """The processes pid started (the NumPy twin's helper processes)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def gone(pids, seconds=20):
    """Whether every one of pids has ended (a zombie waiting to be reaped has)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(_state(p) in (None, "Z") for p in pids):
            return True
        time.sleep(0.1)
    return False


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_the_twin_s_helper_processes_end_with_it(how, tmp_path, real_data_dir):
    """The NumPy twin trains a slice of each batch in a helper process on
    each core but one. Ctrl-C (the terminal sends it to the whole process
    group) stops the run with one line and the helpers with it; if the run
    is killed outright, its helpers see it gone and end by themselves."""
    proc = subprocess.Popen([sys.executable, SCRIPT["numpy"], "--train-limit", "3000",
                             "--epochs", "50", "--out", str(tmp_path)], cwd=REPO,
                            env=dict(os.environ, MNIST_DATA_DIR=str(real_data_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = ""
    while "Epoch 2/" not in line:                        # it is training
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    helpers = helper_pids(proc.pid)
    assert len(helpers) == len(os.sched_getaffinity(0)) - 1
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines() == ["Interrupted (Ctrl-C); nothing was written."]
    else:
        proc.kill()
        proc.communicate(timeout=60)
    assert gone(helpers), helpers
    assert not list(tmp_path.iterdir())
