"""Shared test fixtures: the real datasets, a twin's script run as a learner
runs it, and a real HTTP server on 127.0.0.1."""

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The tests send Ctrl-C (SIGINT) to the scripts they start. A shell that runs
# pytest in the background without job control starts it with SIGINT ignored,
# and an ignored signal stays ignored in every child process, where Ctrl-C
# would then do nothing; a handler is reset to the default in a child instead.
signal.signal(signal.SIGINT, signal.default_int_handler)

SCRIPT = {"keras": "mnist_cnn_keras.py", "numpy": "mnist_cnn_numpy.py"}


def run_twin(twin, *args, data_dir):
    """One twin's script with these flags, on data_dir's data: its finished process."""
    return subprocess.run([sys.executable, SCRIPT[twin], *map(str, args)], cwd=REPO,
                          env=dict(os.environ, MNIST_DATA_DIR=str(data_dir)),
                          capture_output=True, text=True, timeout=600)


def run_twin_cases(twin, flag_lists, folder, data_dir):
    """Each list of flags in a process of its own, two at a time (most of a
    Keras run is TensorFlow's import, on one core), each with an --out folder
    of its own under folder unless its flags name one: [(process, out folder)]."""
    outs = [folder / f"out{i}" for i in range(len(flag_lists))]

    def one(flags, out):
        extra = [] if "--out" in flags else ["--out", out]
        return run_twin(twin, *flags, *extra, data_dir=data_dir)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(zip(pool.map(one, flag_lists, outs), outs))


@pytest.fixture(scope="session")
def real_data_dir():
    """The folder with the real MNIST and Fashion-MNIST files, verified.

    MNIST_DATA_DIR if set, else the per-user cache (downloaded on first use).
    A dataset that cannot be had fails the test instead of skipping it: these
    tests are the proof that the loader reads the real files.
    """
    import data_utils

    root = data_utils.data_root()
    for name in ("mnist", "fashion"):
        for role in data_utils.FILE_NAMES:
            try:
                data_utils.load_file(name, role, root)
            except data_utils.DataError as e:
                pytest.fail(f"the real {name} files are needed: {e}")
    return root.resolve()


@pytest.fixture(scope="module")
def mnist_head(real_data_dir):
    """The first 1,300 real MNIST training images and labels: the twin
    tests' lockstep batches."""
    import data_utils

    (x, y), _ = data_utils.load_dataset("mnist", real_data_dir, progress=False)
    return x[:1300], y[:1300]


# --- A local HTTP server whose answers each test scripts -------------------
#
# server.routes maps a URL path to a list of actions; each request takes the
# next action, and the last one repeats. An action is a function that writes
# the whole answer through the request handler.

def serve(body, content_type="application/octet-stream"):
    def action(h):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return action


def status(code):
    def action(h):
        h.send_response(code)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return action


def stall(body, seconds):
    """Send the headers and a little of the body, then go silent."""
    def action(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:10])
        h.wfile.flush()
        time.sleep(seconds)
    return action


def truncated(body):
    """Promise the whole body, send half, close the connection."""
    def action(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[: len(body) // 2])
        h.close_connection = True
    return action


def unsized(body):
    """Send a body with no Content-Length (ends when the connection closes)."""
    def action(h):
        h.send_response(200)
        h.end_headers()
        h.wfile.write(body)
        h.close_connection = True
    return action


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        owner = self.server.owner
        with owner.lock:
            owner.requests.append((self.path, self.headers.get("User-Agent")))
            actions = owner.routes.get(self.path)
            action = None
            if actions:
                action = actions.pop(0) if len(actions) > 1 else actions[0]
        if action is None:
            self.send_error(404)
        else:
            action(self)

    def log_message(self, *args):      # keep pytest's output clean
        pass


class LocalServer:
    def __init__(self):
        self.routes, self.requests, self.lock = {}, [], threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = LocalServer()
    yield s
    s.close()


@pytest.fixture
def refused_url():
    """A URL on 127.0.0.1 where nothing listens: the connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
