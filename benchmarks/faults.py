"""Faults and hostile input, tried on the twins' weights files and on the
page's server: what each case gets, and the memory it costs.

    python benchmarks/faults.py            # writes --out/faults.json (default: results/)

Every hostile weights file is loaded the way the twins load one
(helpers/common.load_weights), its message and the memory the load took
recorded (tracemalloc: what Python allocated, NumPy's arrays included).
Then draw.py is started as a user starts it, every attack is sent to it
over a real socket, one at a time and the heavy ones three at once, and
the status each got is recorded, with the peak memory of the server's
process and of the Keras twin's process beside it (Linux's VmHWM), and
whether a normal drawing is read afterwards. tests/test_faults.py and
tests/test_draw.py run the same cases as tests.
"""

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_utils  # noqa: E402
import machine  # noqa: E402
import mnist_cnn_numpy as nt  # noqa: E402
from helpers import common  # noqa: E402


# --- Weights files ---------------------------------------------------------------

def _npz(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _npy_header(shape, descr="<f4"):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


def hostile_weights(folder):
    """(the model's shapes, {case: (file, words its message must hold)}): the
    damaged and hostile weights files, each written into folder."""
    folder = Path(folder)
    model = nt.build_model()
    shapes, good = model.weight_shapes(), model.get_weights()
    path = folder / "good.npz"
    common.save_weights(path, good)
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    plain = io.BytesIO()
    np.save(plain, np.zeros(3))
    declared = _npy_header((30000, 30000))                     # 3.6 GB, if it were read
    nan = dict(good, **{"dense2/bias": np.full(shapes["dense2/bias"], np.nan, np.float32)})
    cases = {
        "truncated to half": (raw[:len(raw) // 2], "cannot be read as a weights file"),
        "one byte flipped": (bytes(flipped), "is damaged"),
        "a plain .npy": (plain.getvalue(), "not a plain .npy"),
        "a member that is not .npy": (_npz({"conv1/kernel.txt": b"hello"}), "is not an array"),
        "declares a 3.6 GB array (60 kB file)": (
            _npz({"dense1/kernel.npy": declared + b"\0" * 60_000_000}), "declares (30000, 30000)"),
        "headers that lie about the sizes": (
            _npz({f"{k}.npy": _npy_header(v.shape) + b"\0" * 8 for k, v in good.items()}),
            "a damaged or foreign file"),
        "float64 values beyond float32": (
            dict(good, **{"conv1/kernel": good["conv1/kernel"].astype(np.float64) * 1e300}),
            "beyond what the twin's float32 can hold"),
        "integers": (dict(good, **{"conv1/bias": np.zeros(shapes["conv1/bias"], np.int64)}),
                     "expected floats"),
        "NaN": (nan, "holds NaN or infinite values"),
        "a weight missing": ({k: v for k, v in good.items() if k != "conv2/bias"},
                             "has no 'conv2/bias'"),
        "a wrong shape": (dict(good, **{"conv2/kernel": np.zeros((3, 3, 32, 65), np.float32)}),
                          "conv2/kernel has shape (3, 3, 32, 65)"),
        "an empty file": (b"", "cannot be read as a weights file"),
    }
    files = {}
    for i, (case, (content, words)) in enumerate(cases.items()):
        target = folder / f"case{i}.npz"
        if isinstance(content, dict):
            common.save_weights(target, content)
        else:
            target.write_bytes(content)
        files[case] = (target, words)
    return shapes, files


def try_weights(folder):
    """[{case, message, peak_mb}] for every hostile weights file."""
    shapes, files = hostile_weights(folder)
    rows = []
    for case, (path, words) in files.items():
        tracemalloc.start()
        try:
            common.load_weights(path, shapes)
            message = "LOADED"
        except common.UserError as e:
            message = str(e).replace(str(path), "FILE")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append({"case": case, "message": message, "expected": words,
                     "as_expected": words in message, "peak_mb": peak / 1e6})
    return rows


# --- The page's server -------------------------------------------------------------

def server_attacks(port):
    """{case: (request bytes, the status it must get)}."""
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    big_png = io.BytesIO()
    Image.new("L", (7000, 7000), 255).save(big_png, format="PNG")      # about 170 kB
    phone = io.BytesIO()
    Image.new("RGB", (4000, 3000), "white").save(phone, format="JPEG", quality=60)

    def post(body, extra=b"", length=True):
        size = f"Content-Length: {len(body)}\r\n".encode() if length else b""
        return b"POST /read HTTP/1.1\r\n" + host + size + extra + b"\r\n" + body

    return {
        "Content-Length -1, then 40 MB": (
            b"POST /read HTTP/1.1\r\n" + host + b"Content-Length: -1\r\n\r\n" + b"\0" * 40_000_000,
            400),
        "Content-Length -5": (b"POST /read HTTP/1.1\r\n" + host + b"Content-Length: -5\r\n\r\n",
                              400),
        "no Content-Length": (post(b"abc", length=False), 411),
        "chunked": (post(b"", b"Transfer-Encoding: chunked\r\n", length=False)
                    + b"3\r\nabc\r\n0\r\n\r\n", 411),
        "Content-Length 10^12": (b"POST /read HTTP/1.1\r\n" + host
                                 + b"Content-Length: 1000000000000\r\n\r\n" + b"\0" * 1000, 413),
        "a 7000 x 7000 PNG (170 kB)": (post(big_png.getvalue()), 400),
        "a 12-megapixel JPEG": (post(phone.getvalue()), 400),          # blank: no ink
        "another Host (DNS rebinding)": (
            b"GET /info HTTP/1.1\r\nHost: attacker.example:80\r\n\r\n", 403),
        "another page's Origin": (post(b"abc", b"Origin: http://attacker.example\r\n"), 403),
        "a body shorter than its length": (b"POST /read HTTP/1.1\r\n" + host
                                           + b"Content-Length: 100\r\n\r\nabc", 400),
        "not HTTP at all": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 100, 400),
        "a JSON request that is not an object": (
            b"POST /backward HTTP/1.1\r\n" + host + b"Content-Length: 6\r\n\r\n[1, 2]", 400),
    }


HEAVY = ["Content-Length -1, then 40 MB", "a 7000 x 7000 PNG (170 kB)", "a 12-megapixel JPEG"]


def raw_request(port, data, timeout=60):
    """Send raw bytes, read the whole answer: (status, body), or (None, b"")
    if the server closed the connection without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)                # all sent: the server sees the end
        except OSError:                                  # it answered and closed first
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:                                  # reset, or timed out
            pass
    if not answer.startswith(b"HTTP/"):
        return None, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def vm_hwm(pid):
    """The peak resident memory of a process, in MB (Linux's VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid):
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def drawing(port, digit):
    """A real test digit, as the page sends it: (status, JSON answer)."""
    png = io.BytesIO()
    Image.fromarray((255 - digit * 255).astype(np.uint8)).resize((140, 140)).save(png, "PNG")
    status, body = raw_request(port, f"POST /read HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                     f"Content-Length: {len(png.getvalue())}\r\n\r\n".encode()
                               + png.getvalue())
    return status, json.loads(body or b"{}")


def attack_server(weights, digit):
    """Start draw.py, send every attack, then the heavy ones three at once,
    then a drawing: {"cases": [...], "three_at_once": [...], peaks, ...}."""
    proc = subprocess.Popen([sys.executable, "draw.py", "--weights", str(weights)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "127.0.0.1:" not in line:
            raise common.UserError("draw.py did not start: " + proc.stderr.read()[-500:])
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        keras = children(proc.pid)
        start = {"server_mb": vm_hwm(proc.pid), "keras_mb": [vm_hwm(p) for p in keras]}
        cases = server_attacks(port)
        rows = []
        for case, (request, expected) in cases.items():
            t = time.perf_counter()
            status = raw_request(port, request)[0]
            rows.append({"case": case, "status": status, "expected": expected,
                         "seconds": time.perf_counter() - t})
        together = [None] * len(HEAVY)

        def attack(i):
            together[i] = raw_request(port, cases[HEAVY[i]][0])[0]

        threads = [threading.Thread(target=attack, args=(i,)) for i in range(len(HEAVY))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after, answer = drawing(port, digit)
        result = {"cases": rows, "three_at_once": [
                      {"case": c, "status": s, "expected": cases[c][1]}
                      for c, s in zip(HEAVY, together)],
                  "drawing_afterwards": after, "drawing_read": bool(answer.get("numpy")),
                  "at_start": start, "server_peak_mb": vm_hwm(proc.pid),
                  "keras_peak_mb": [vm_hwm(p) for p in keras]}
    finally:
        proc.send_signal(signal.SIGINT)
        t = time.perf_counter()
        try:
            _, stderr = proc.communicate(timeout=60)
            stopped = time.perf_counter() - t
        except subprocess.TimeoutExpired:              # recorded, not hidden: then stopped
            proc.kill()
            _, stderr = proc.communicate()
            stopped = None
    result["traceback_in_log"] = "Traceback" in stderr
    result["seconds_to_stop_after_ctrl_c"] = stopped
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=common.HelpWithDefaults)
    p.add_argument("--out", default="results", help="folder for faults.json")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    # The server is stopped with Ctrl-C (SIGINT). Started in the background by
    # a shell without job control, this script has SIGINT ignored, and so
    # would draw.py (an ignored signal stays ignored in a child; a handler is
    # reset to the default): Ctrl-C would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = common.prepare_out_dir(args.out)
    _, (x_test, _) = data_utils.load_dataset("mnist", args.data_dir, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        weights_rows = try_weights(tmp)
        model, optimizer = nt.build_model(), nt.Adam()
        (x, y), _ = data_utils.load_dataset("mnist", args.data_dir, progress=False)
        for xb, yb in data_utils.iterate_minibatches(x[:3000], y[:3000], 64,
                                                     np.random.default_rng(0)):
            nt.train_step(model, optimizer, xb, yb)
        weights = Path(tmp) / "numpy.weights.npz"
        common.save_weights(weights, model.get_weights())
        server = attack_server(weights, x_test[0, :, :, 0])
    results = {"machine": machine.machine(), "weights_files": weights_rows, "server": server}
    for row in weights_rows:
        print(f"{row['case']:<40} {row['peak_mb']:6.2f} MB  {row['message'][:90]}")
    for row in server["cases"] + server["three_at_once"]:
        print(f"{row['case']:<40} HTTP {row['status']} (expected {row['expected']})")
    print(f"server peak {server['server_peak_mb']:.0f} MB; Keras twin's process "
          f"{server['at_start']['keras_mb']} -> {server['keras_peak_mb']} MB; drawing read "
          f"afterwards: {server['drawing_read']}; traceback in the log: "
          f"{server['traceback_in_log']}")
    path = out / "faults.json"
    common.write_report(path, results)
    print(f"Wrote {path}")
    failed = [r["case"] for r in weights_rows if not r["as_expected"]] + [
        r["case"] for r in server["cases"] + server["three_at_once"]
        if r["status"] != r["expected"]]
    if failed or not server["drawing_read"] or server["traceback_in_log"]:
        raise common.UserError(f"not as expected: {', '.join(failed) or 'the drawing or log'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    common.run(main)
