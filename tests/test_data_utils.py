"""data_utils: finding, downloading, verifying and parsing the IDX files.

Downloads go to a real HTTP server on 127.0.0.1 (conftest.py); requests itself
is never mocked. Small synthetic datasets keep these tests fast; the last
tests read the real MNIST and Fashion-MNIST files.
"""

import gzip
import hashlib
import os
import signal
import shutil
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data_utils
from conftest import REPO, serve, stall, status, truncated, unsized
from data_utils import DataError

GZ = {role: name + ".gz" for role, name in data_utils.FILE_NAMES.items()}


def idx_images(pixels):
    n, h, w = pixels.shape
    header = (2051).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in (n, h, w))
    return header + pixels.astype(np.uint8).tobytes()


def idx_labels(labels):
    return ((2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
            + np.asarray(labels, np.uint8).tobytes())


@pytest.fixture
def tiny(monkeypatch):
    """A 12 + 5 image dataset named 'tiny', registered like the real ones.

    Returns {role: unpacked bytes}. Network timeouts and retry pauses are
    shortened so that the failure cases run in about a second.
    """
    rng = np.random.default_rng(0)
    raw = {
        "train_images": idx_images(rng.integers(0, 256, (12, 28, 28))),
        "train_labels": idx_labels(rng.integers(0, 10, 12)),
        "test_images": idx_images(rng.integers(0, 256, (5, 28, 28))),
        "test_labels": idx_labels(rng.integers(0, 10, 5)),
    }
    monkeypatch.setitem(data_utils.DATASETS, "tiny", {
        "title": "Tiny", "classes": [str(d) for d in range(10)],
        "mirrors": ["https://unused.invalid/"],
        "sha256": {r: hashlib.sha256(b).hexdigest() for r, b in raw.items()},
        "sizes": {r: len(b) for r, b in raw.items()},
    })
    monkeypatch.setattr(data_utils, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(data_utils, "READ_TIMEOUT", 0.5)
    monkeypatch.setattr(data_utils, "BACKOFF", 0.01)
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    return raw


def serve_all(server, raw, prefix="/"):
    for role, body in raw.items():
        server.routes[prefix + GZ[role]] = [serve(gzip.compress(body))]


def assert_clean(folder, raw):
    """No temporary file is left, and every file under a final name verifies."""
    names = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith(".part")], names
    for role, body in raw.items():
        path = folder / GZ[role]
        if path.exists():
            assert gzip.decompress(path.read_bytes()) == body


def assert_tiny_arrays(result, raw):
    (x, y), (xt, yt) = result
    assert x.shape == (12, 28, 28, 1) and x.dtype == np.float32
    assert xt.shape == (5, 28, 28, 1) and y.dtype == np.uint8
    pixels = np.frombuffer(raw["train_images"], np.uint8, offset=16)
    np.testing.assert_array_equal(x.ravel(), pixels / np.float32(255))
    np.testing.assert_array_equal(y, np.frombuffer(raw["train_labels"], np.uint8, offset=8))
    assert 0.0 <= x.min() and x.max() <= 1.0


# --- Downloads ---------------------------------------------------------------

def test_first_mirror_404_then_second_ok(tiny, server, tmp_path, monkeypatch):
    serve_all(server, tiny, prefix="/b/")          # /a/ answers 404 for all
    monkeypatch.setenv("MNIST_MIRRORS", f"{server.url}a/,{server.url}b/")
    result = data_utils.load_dataset("tiny", tmp_path, progress=False)
    assert_tiny_arrays(result, tiny)
    assert_clean(tmp_path / "tiny", tiny)
    paths = [p for p, _ in server.requests]
    assert paths.count("/a/" + GZ["train_images"]) == 1     # 404: no retry
    assert all(ua.startswith("mnist-twins/") for _, ua in server.requests)


def test_500_then_ok_after_retry(tiny, server, tmp_path, monkeypatch):
    serve_all(server, tiny)
    path = "/" + GZ["train_labels"]
    server.routes[path] = [status(500), status(503)] + server.routes[path]
    monkeypatch.setenv("MNIST_MIRRORS", server.url)
    assert_tiny_arrays(data_utils.load_dataset("tiny", tmp_path, progress=False), tiny)
    assert [p for p, _ in server.requests].count(path) == 3
    assert_clean(tmp_path / "tiny", tiny)


def test_connection_refused_then_next_mirror(tiny, server, refused_url, tmp_path, monkeypatch):
    serve_all(server, tiny)
    monkeypatch.setenv("MNIST_MIRRORS", f"{refused_url},{server.url}")
    assert_tiny_arrays(data_utils.load_dataset("tiny", tmp_path, progress=False), tiny)
    assert_clean(tmp_path / "tiny", tiny)


@pytest.mark.parametrize("bad_action, reason", [
    (lambda body: stall(body, 3.0), "timed out"),
    (truncated, "connection failed"),
    (lambda body: serve(b"<html><body>Not found</body></html>", "text/html"), "HTML page"),
    (lambda body: serve(b"<html>Error</html>", "application/octet-stream"), "gzip"),
    (lambda body: serve(gzip.compress(body[:-1] + b"\x07")), "checksum mismatch"),
    (lambda body: serve(gzip.compress(body) * 30), "larger than the file can be"),
    (lambda body: unsized(os.urandom(len(body) * 2)), "exceeds"),
])
def test_bad_answer_then_next_mirror(tiny, server, tmp_path, monkeypatch, bad_action, reason):
    """A mirror that misbehaves is left for the next one, and the error says why."""
    serve_all(server, tiny, prefix="/good/")
    for role, body in tiny.items():
        server.routes["/bad/" + GZ[role]] = [bad_action(body)]
    monkeypatch.setenv("MNIST_MIRRORS", f"{server.url}bad/,{server.url}good/")
    assert_tiny_arrays(data_utils.load_dataset("tiny", tmp_path, progress=False), tiny)
    assert_clean(tmp_path / "tiny", tiny)

    # Now with the bad mirror alone: the clear error, and nothing left behind.
    shutil.rmtree(tmp_path / "tiny")
    monkeypatch.setenv("MNIST_MIRRORS", f"{server.url}bad/")
    with pytest.raises(DataError) as err:
        data_utils.load_dataset("tiny", tmp_path, progress=False)
    assert reason in str(err.value)
    assert f"{server.url}bad/" in str(err.value)
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == []


def test_every_mirror_fails_gives_one_clear_message(tiny, server, refused_url, tmp_path,
                                                    monkeypatch):
    monkeypatch.setenv("MNIST_MIRRORS", f"{server.url}missing/,{refused_url}")
    with pytest.raises(DataError) as err:
        data_utils.load_dataset("tiny", tmp_path, progress=False)
    msg = str(err.value)
    assert f"{server.url}missing/{GZ['train_images']}: HTTP 404" in msg
    assert f"{refused_url}{GZ['train_images']}: connection failed" in msg
    assert f"after {data_utils.ATTEMPTS} attempts" in msg
    assert str(tmp_path / "tiny") in msg                   # where to put files
    for name in GZ.values():
        assert name in msg                                 # which files


def test_plain_http_mirror_refused_unless_local(monkeypatch):
    monkeypatch.setenv("MNIST_MIRRORS", "http://mirror.example.org/mnist/")
    with pytest.raises(DataError, match="https"):
        data_utils.mirrors_for("mnist")
    monkeypatch.setenv("MNIST_MIRRORS", "https://m.example.org/{dataset} , http://localhost:8000/x/")
    assert data_utils.mirrors_for("fashion") == [
        "https://m.example.org/fashion/", "http://localhost:8000/x/"]


def test_builtin_mirrors_are_https():
    for spec in data_utils.DATASETS.values():
        assert spec["mirrors"] and all(m.startswith("https://") for m in spec["mirrors"])


# --- The cache ---------------------------------------------------------------

def test_valid_cache_makes_no_request(tiny, server, refused_url, tmp_path, monkeypatch):
    serve_all(server, tiny)
    monkeypatch.setenv("MNIST_MIRRORS", server.url)
    data_utils.load_dataset("tiny", tmp_path, progress=False)
    assert len(server.requests) == 4
    monkeypatch.setenv("MNIST_MIRRORS", refused_url)       # offline now
    assert_tiny_arrays(data_utils.load_dataset("tiny", tmp_path, progress=False), tiny)
    assert len(server.requests) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_file_is_replaced(tiny, server, tmp_path, monkeypatch, damage, capsys):
    serve_all(server, tiny)
    monkeypatch.setenv("MNIST_MIRRORS", server.url)
    data_utils.load_dataset("tiny", tmp_path, progress=False)
    path = tmp_path / "tiny" / GZ["test_images"]
    good = path.read_bytes()
    path.write_bytes({"truncate": good[: len(good) // 2],
                      "flip": gzip.compress(tiny["test_images"][:-1] + b"\x01"),
                      "garbage": b"\x00" * 100}[damage])
    assert_tiny_arrays(data_utils.load_dataset("tiny", tmp_path, progress=False), tiny)
    assert len(server.requests) == 5                       # only that file again
    assert "Removed a corrupt file" in capsys.readouterr().err
    assert_clean(tmp_path / "tiny", tiny)


def test_unpacked_and_dotted_names_and_flat_root(tiny, tmp_path, refused_url, monkeypatch):
    """Files already unpacked, spelled train-images.idx3-ubyte, directly in the root."""
    monkeypatch.setenv("MNIST_MIRRORS", refused_url)
    for role, body in tiny.items():
        name = data_utils.FILE_NAMES[role].replace("-idx", ".idx")
        (tmp_path / name).write_bytes(body)
    assert_tiny_arrays(data_utils.load_dataset("tiny", tmp_path, progress=False), tiny)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_utils.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_utils.data_root() == tmp_path / "env"
    monkeypatch.delenv("MNIST_DATA_DIR")
    assert data_utils.data_root() == tmp_path / "xdg" / "mnist-twins"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_utils.data_root() == tmp_path / "home" / ".cache" / "mnist-twins"


def test_two_processes_fill_the_same_empty_cache(server, real_data_dir, tmp_path):
    """Real MNIST served locally; two loaders start at once on one empty cache."""
    for role, name in GZ.items():
        raw = data_utils.load_file("mnist", role, real_data_dir)
        server.routes["/" + name] = [serve(gzip.compress(raw, compresslevel=1))]
    env = dict(os.environ, MNIST_MIRRORS=server.url)
    env.pop("MNIST_DATA_DIR", None)
    code = ("import sys, data_utils; "
            "(x, y), (xt, yt) = data_utils.load_dataset('mnist', sys.argv[1], progress=False); "
            "print(len(x), len(xt))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.split() == ["60000", "10000"]
    files = sorted(p.name for p in (tmp_path / "mnist").iterdir())
    assert files == sorted(GZ.values())                    # no .part left over


def test_script_prints_error_without_traceback(tmp_path, refused_url):
    env = dict(os.environ, MNIST_MIRRORS=refused_url)
    r = subprocess.run([sys.executable, "data_utils.py", "--data-dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: Could not download MNIST file")
    assert "Traceback" not in r.stderr


def test_sigterm_during_a_download_leaves_no_part_file(server, tmp_path):
    """A download that stalls half way, and SIGTERM meanwhile: one line, exit
    143, and no hidden .part file in the data folder."""
    body = b"\0" * 2_000_000
    for name in GZ.values():
        server.routes[f"/{name}"] = [stall(body, 60)]
    env = dict(os.environ, MNIST_MIRRORS=server.url)
    proc = subprocess.Popen([sys.executable, "data_utils.py", "--data-dir", str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    folder = tmp_path / "mnist"
    deadline = time.monotonic() + 60
    while not (folder.exists() and list(folder.glob(".*.part"))):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "Stopped (SIGTERM); nothing was written."
    assert list(folder.iterdir()) == []


# --- Verification and parsing --------------------------------------------------

def test_gzip_bomb_is_not_unpacked(tmp_path):
    """A small .gz that unpacks to 200 MB is rejected after raw_size + 1 bytes."""
    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb") as f:
        for _ in range(200):
            f.write(bytes(1 << 20))
    tracemalloc.start()
    with pytest.raises(DataError, match="wrong size"):
        data_utils.read_verified(path, "0" * 64, 1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 << 20


def test_parse_valid_files():
    pixels = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    np.testing.assert_array_equal(data_utils.parse_idx(idx_images(pixels), 2051), pixels)
    np.testing.assert_array_equal(data_utils.parse_idx(idx_labels([3, 9]), 2049), [3, 9])


@pytest.mark.parametrize("data, magic, message", [
    (idx_labels([1, 2]), 2051, "magic number 2049, expected 2051"),
    (idx_images(np.zeros((2, 28, 28))), 2049, "magic number 2051, expected 2049"),
    (idx_images(np.zeros((2, 28, 27))), 2051, "28x27, expected 28x28"),
    (idx_images(np.zeros((2, 28, 28)))[:-1], 2051, "truncated"),
    (idx_images(np.zeros((2, 28, 28))) + b"\x00", 2051, "too long"),
    (idx_labels([1, 10]), 2049, "label 10"),
    (b"\x00\x00\x08", 2049, "too short"),
])
def test_parse_rejects(data, magic, message):
    with pytest.raises(DataError, match=message):
        data_utils.parse_idx(data, magic, where="f")


def test_mismatched_image_and_label_counts(tiny, tmp_path, monkeypatch, refused_url):
    monkeypatch.setenv("MNIST_MIRRORS", refused_url)
    tiny["test_labels"] = idx_labels([1, 2, 3])           # 5 images, 3 labels
    spec = data_utils.DATASETS["tiny"]
    spec["sha256"]["test_labels"] = hashlib.sha256(tiny["test_labels"]).hexdigest()
    spec["sizes"]["test_labels"] = len(tiny["test_labels"])
    for role, body in tiny.items():
        (tmp_path / data_utils.FILE_NAMES[role]).write_bytes(body)
    with pytest.raises(DataError, match="5 images but 3 labels"):
        data_utils.load_dataset("tiny", tmp_path, progress=False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([2051, 2049]))
def test_parse_arbitrary_bytes(data, magic):
    try:
        out = data_utils.parse_idx(data, magic)
    except DataError:
        return
    assert out.dtype == np.uint8


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 15), st.integers(0, 255), st.integers(0, 40), st.sampled_from([2051, 2049]))
def test_parse_mutated_headers(position, value, cut, magic):
    """Any header byte changed, any tail cut: an array or DataError, never a big allocation."""
    good = idx_images(np.ones((3, 28, 28))) if magic == 2051 else idx_labels([1, 2, 3])
    data = bytearray(good)
    data[position % len(data)] = value
    data = bytes(data[: len(data) - cut])
    tracemalloc.start()
    try:
        out = data_utils.parse_idx(data, magic)
        assert out.nbytes <= len(data)
    except DataError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 20


# --- Splits and batches ------------------------------------------------------

def test_split_and_batches_are_reproducible():
    x = np.arange(20, dtype=np.float32).reshape(20, 1)
    y = np.arange(20) % 10
    (xtr, ytr), (xv, yv) = data_utils.split_validation(x, y, 5)
    assert len(xtr) == 15 and xv[0, 0] == 15 and yv.tolist() == [5, 6, 7, 8, 9]
    run = [lambda: [b[1].tolist() for b in data_utils.iterate_minibatches(
        xtr, ytr, 4, np.random.default_rng(7))] for _ in range(2)]
    first, second = run[0](), run[1]()
    assert first == second and [len(b) for b in first] == [4, 4, 4, 3]
    assert sorted(sum(first, [])) == sorted(ytr.tolist())
    other = [b[1].tolist() for b in data_utils.iterate_minibatches(
        xtr, ytr, 4, np.random.default_rng(8))]
    assert other != first
    with pytest.raises(DataError):
        data_utils.split_validation(x, y, 20)


# --- The real files (these run in CI, never skipped) -------------------------

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist(real_data_dir):
    (x, y), (xt, yt) = data_utils.load_dataset("mnist", real_data_dir, progress=False)
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert np.bincount(y).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(yt).tolist() == MNIST_TEST_COUNTS
    # The published facts are given to 4 decimals.
    assert abs(float(x.mean()) - 0.1307) < 5e-5
    assert abs(float(x.std()) - 0.3081) < 5e-5


def test_real_fashion(real_data_dir):
    (x, y), (xt, yt) = data_utils.load_dataset("fashion", real_data_dir, progress=False)
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert np.bincount(y).tolist() == [6000] * 10
    assert np.bincount(yt).tolist() == [1000] * 10


def test_real_files_flat_in_root_are_told_apart(real_data_dir, tmp_path, refused_url, monkeypatch):
    """MNIST files unpacked directly in the root: MNIST loads, Fashion does not."""
    monkeypatch.setenv("MNIST_MIRRORS", refused_url)
    monkeypatch.setattr(data_utils, "BACKOFF", 0.01)
    for role, name in data_utils.FILE_NAMES.items():
        (tmp_path / name).write_bytes(data_utils.load_file("mnist", role, real_data_dir))
    (x, _), _ = data_utils.load_dataset("mnist", tmp_path, progress=False)
    assert len(x) == 60000
    with pytest.raises(DataError, match="Could not download Fashion-MNIST"):
        data_utils.load_dataset("fashion", tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 5              # 4 files + empty fashion/
