"""draw.py in a real browser: headless Chromium (Debian's package), driven
by Playwright, draws real MNIST test digits on the page's canvas as strokes
of the pointer and reads what the page shows; it uploads a photo and the
kinds of bad input a user sends, and takes the screenshots of the README and docs/page.md.

Without Chromium the browser test is skipped with how to install it, except
where MNIST_TWINS_REQUIRE_BROWSER is set (CI), where it fails instead.
"""

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import common
import data_utils
import draw
import mnist_cnn_numpy as nt
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import faults  # noqa: E402
from faults import children as _children  # noqa: E402
from faults import raw_request  # noqa: E402
from faults import vm_hwm as _vm_hwm  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


@pytest.fixture(scope="module")
def trained(real_data_dir, tmp_path_factory):
    """The NumPy twin trained quickly (one pass over 6,000 images, about 95%
    on the test set), its weights written as a twin writes them."""
    (x, y), test = data_utils.load_dataset("mnist", real_data_dir, progress=False)
    model, optimizer = nt.build_model(seed=0), nt.Adam()
    for xb, yb in data_utils.iterate_minibatches(x[:6000], y[:6000], 64,
                                                 np.random.default_rng(0)):
        nt.train_step(model, optimizer, xb, yb)
    path = tmp_path_factory.mktemp("weights") / "numpy.weights.npz"
    common.save_weights(path, model.get_weights())
    return path, test


@pytest.fixture(scope="module")
def server(trained):
    srv = draw.make_server(trained[0])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(server, body, headers=None):
    """POST /read straight over HTTP: (status, the JSON answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.request("POST", "/read", body=body, headers=headers or {})
    response = conn.getresponse()
    answer = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, answer


def test_the_server_answers_bad_input_and_keeps_serving(server, trained, tmp_path):
    _, (x_test, _) = trained
    assert post(server, b"this is not an image")[1]["error"].startswith("not an image")
    status, answer = post(server, b"")
    assert status == 400 and "draw a digit first" in answer["error"]
    white = tmp_path / "white.png"
    Image.new("L", (280, 280), 255).save(white)
    assert post(server, white.read_bytes())[1]["error"] == "blank image: no ink found"
    status, answer = post(server, b"\0" * (draw.MAX_BODY + 1))
    assert status == 413 and "the limit is 5 MB" in answer["error"]
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.putrequest("POST", "/read")
    conn.endheaders()                                    # no Content-Length
    assert conn.getresponse().status == 411
    conn.close()
    # Still serving: a real digit is read, with every step, both twins and the maps.
    digit = tmp_path / "digit.png"
    ink = (255 - x_test[0, :, :, 0] * 255).astype(np.uint8)           # dark on light
    Image.fromarray(ink).resize((140, 140)).save(digit)
    status, answer = post(server, digit.read_bytes())
    assert status == 200, answer
    assert [s["title"] for s in answer["steps"]][0] == "as drawn" and len(answer["steps"]) == 5
    assert len(answer["numpy"]) == 10 and abs(sum(answer["numpy"]) - 1) < 1e-5
    assert answer["keras"] and np.allclose(answer["keras"], answer["numpy"], atol=1e-5)
    assert [m["layer"] for m in answer["maps"]] == [
        layer.name for layer in nt.build_model().layers if len(layer.output_shape) == 3]


def test_no_weights_gives_one_message(tmp_path):
    proc = subprocess.run([sys.executable, "draw.py", "--weights", tmp_path / "none.npz"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "No weights at" in proc.stderr and "python mnist_cnn_numpy.py" in proc.stderr


# --- The server as a user starts it ---------------------------------------------

@pytest.fixture(scope="module")
def served(trained):
    """draw.py as a user starts it, in a process of its own: (port, process)."""
    proc = subprocess.Popen([sys.executable, "draw.py", "--weights", str(trained[0])],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert "Serving the page at http://127.0.0.1:" in line, proc.stderr.read()
    port = int(line.split("127.0.0.1:")[1].split("/")[0])
    yield port, proc
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)



# --- In the browser ------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        how = "install it (Debian or Ubuntu: apt-get install chromium), then run pytest again"
        if os.environ.get("MNIST_TWINS_REQUIRE_BROWSER"):
            pytest.fail(f"the browser test needs Chromium: {how}")
        pytest.skip(f"the browser test needs Chromium: {how}")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def open_page(browser, port):
    page = browser.new_page(viewport={"width": 1150, "height": 1000})
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_function("document.getElementById('about').textContent != 'Loading...'")
    return page


@pytest.fixture(scope="module")
def page(browser, served):
    page = open_page(browser, served[0])
    yield page
    page.close()


def wait_for_reading(page, before, count=1):
    page.wait_for_function(f"document.body.dataset.read === '{before + count}'", timeout=60000)


def draw_digit(page, digit):
    """Draw a 28 x 28 digit on the canvas as the pointer would: one stroke
    along each run of ink in each row. Returns the number of strokes."""
    page.click("#clear")
    box = page.locator("#pad").bounding_box()
    cell_w, cell_h = box["width"] / 28, box["height"] / 28
    strokes = 0
    for row in range(28):
        ink = np.flatnonzero(digit[row] > 0.5)
        for run in np.split(ink, np.flatnonzero(np.diff(ink) > 1) + 1) if len(ink) else []:
            y = box["y"] + (row + 0.5) * cell_h
            page.mouse.move(box["x"] + (run[0] + 0.5) * cell_w, y)
            page.mouse.down()
            page.mouse.move(box["x"] + (run[-1] + 0.5) * cell_w, y, steps=3)
            page.mouse.up()
            strokes += 1
    return strokes


def test_drawn_digits_are_read_by_both_twins(page, trained, tmp_path):
    _, (x_test, y_test) = trained
    right = []
    for i in range(10):
        before = int(page.evaluate("sequence"))
        strokes = draw_digit(page, x_test[i, :, :, 0])
        wait_for_reading(page, before, strokes)
        shown = page.text_content("#prediction-numpy")
        assert page.text_content("#prediction-keras") == shown   # the same weights
        right.append(shown == str(y_test[i]))
        if i == 0:
            assert page.locator("#steps figure").count() == 5
            assert page.locator("#bars tr").count() == 11          # a header row, 10 classes
            assert page.locator("#maps .maps").count() == 4
            assert page.text_content("#message") == ""
            shot = tmp_path / "draw.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("DRAW_SCREENSHOT"):             # refreshing the docs'
                shutil.copy(shot, os.environ["DRAW_SCREENSHOT"])
    assert sum(right) >= 9, f"read right: {right}"


def test_a_photo_and_bad_uploads_in_the_browser(page, trained, tmp_path):
    _, (x_test, y_test) = trained
    # A photo: dark ink on light paper, off-centre on a larger page, JPEG.
    digit = Image.fromarray((x_test[3, :, :, 0] * 255).astype(np.uint8)).resize((168, 168))
    paper = Image.new("L", (500, 400), 0)
    paper.paste(digit, (260, 90))
    photo = tmp_path / "photo.jpg"
    Image.eval(paper, lambda v: 235 - v * 0.85).convert("RGB").save(photo, quality=90)
    for path, expected in [
            (photo, None),
            (tmp_path / "notes.png", "not an image that can be read"),
            (tmp_path / "huge.png", "the limit is 5 MB")]:
        if path.name == "notes.png":
            path.write_text("shopping list")
        if path.name == "huge.png":
            path.write_bytes(np.random.default_rng(0).bytes(draw.MAX_BODY + 100_000))
        before = int(page.evaluate("sequence"))
        page.set_input_files("#photo", str(path))
        wait_for_reading(page, before)
        if expected is None:
            assert page.text_content("#prediction-numpy") == str(y_test[3])
            assert page.text_content("#message") == ""
        else:
            assert expected in page.text_content("#message")
            assert page.text_content("#prediction-numpy") == "-"
    # An empty canvas, read on purpose.
    page.click("#clear")
    before = int(page.evaluate("sequence"))
    page.click("#read")
    wait_for_reading(page, before)
    assert page.text_content("#message") == "blank image: no ink found"
    # And the server still answers: the next drawing is read.
    before = int(page.evaluate("sequence"))
    wait_for_reading(page, before, draw_digit(page, x_test[1, :, :, 0]))
    assert page.text_content("#message") == ""
    assert page.text_content("#prediction-numpy") == str(y_test[1])


# --- Backward, one unit, teaching: in the browser, on two networks ------------------

TIMES = {}                     # what the server took, per kind of request (for the note)


def wait_for(page, counter, value):
    page.wait_for_function(f"document.body.dataset.{counter} === '{value}'", timeout=120000)


def count(page, counter):
    return int(page.evaluate(f"document.body.dataset.{counter} || '0'"))


def check_backward(page, expected_layers):
    """The backward view on the page: its layers, from the loss back to the
    input, and both twins' gradients within 1e-4 of the largest entry."""
    parts = page.locator("#backward .layer")
    names = [parts.nth(i).get_attribute("data-layer") for i in range(parts.count())]
    assert names == expected_layers
    worst = 0.0
    for i in range(parts.count()):
        difference = float(parts.nth(i).get_attribute("data-difference"))
        largest = float(parts.nth(i).get_attribute("data-largest"))
        assert largest > 0 and difference / largest < 1e-4, (names[i], difference, largest)
        worst = max(worst, difference / largest)
        assert parts.nth(i).locator("img").count() >= 2             # both twins' pictures
    assert "NumPy" in page.text_content("#loss-numpy") and page.locator("#loss-keras").count()
    return worst


def backward_unit_and_teach(page, digit, module, weights, shots=None):
    """Draw a real digit; the backward view for the predicted label, then
    for another; a conv1 unit's arithmetic; a teach step and a reset.
    Returns the worst relative gradient difference seen."""
    model = module.build_model()
    expected = [layer.name for layer in reversed(model.layers)
                if len(layer.output_shape) == 3] + ["input"]
    before = int(page.evaluate("sequence"))
    wait_for_reading(page, before, draw_digit(page, digit))
    reading = int(page.evaluate("sequence"))
    page.wait_for_function(f"(document.body.dataset.backward || '').startsWith('{reading}:')",
                           timeout=120000)
    predicted = page.text_content("#prediction-numpy")
    assert page.text_content("#labels button.chosen") == predicted
    worst = check_backward(page, expected)
    other = next(b for b in range(10) if str(b) != predicted)
    loss_before = page.text_content("#loss-numpy")
    page.click(f"#labels button[data-label='{other}']")
    wait_for(page, "backward", f"{reading}:{other}")
    assert page.text_content("#labels button.chosen") == str(other)
    assert page.text_content("#loss-numpy") != loss_before
    worst = max(worst, check_backward(page, expected))
    if shots:
        page.locator("#backward").screenshot(path=str(shots / "backward.png"))

    # One conv1 unit, the most active of channel 1 (so that its gradient
    # passes): its products, summed with the bias, are the shown value.
    model.set_weights(weights)
    conv1 = model.layers[0]
    x = np.array(page.evaluate("reading.input"), np.float32)[None, :, :, None]
    i, j = np.unravel_index(int(np.argmax(conv1.forward(x)[0, :, :, 1])), conv1.output_shape[:2])
    units = count(page, "unit")
    image = page.locator(f"img[data-layer='{conv1.name}'][data-channel='1']")
    image.scroll_into_view_if_needed()
    box = image.bounding_box()
    H, W, _ = conv1.output_shape
    image.click(position={"x": box["width"] * (j + 0.5) / W, "y": box["height"] * (i + 0.5) / H})
    wait_for(page, "unit", units + 1)
    assert f"position ({i}, {j}), filter 1" in page.text_content("#unit")
    assert abs(float(page.get_attribute("#unit-out", "data-value"))) > 0
    products = [float(v) for v in page.eval_on_selector_all(
        "#unit table.products td", "cells => cells.map(c => c.dataset.value)")]
    assert len(products) == conv1.kernel_size ** 2 * conv1.kernel.shape[2]
    bias, z, out = (float(page.get_attribute(f"#unit-{k}", "data-value"))
                    for k in ("bias", "z", "out"))
    assert abs(sum(products) + bias - z) < 1e-5 * max(1.0, abs(z))
    assert abs(max(z, 0.0) - out) < 1e-5 * max(1.0, abs(z))
    assert page.locator("#unit table.dkernel").count() >= 1          # the backward view is open
    if shots:
        page.locator("#unit").screenshot(path=str(shots / "unit.png"))

    # A teach step: the chosen label's probability rises by the same amount in both.
    taught = count(page, "teach")
    page.click("#teach")
    wait_for(page, "teach", taught + 1)
    rises = {}
    for twin in ("numpy", "keras"):
        row = page.locator(f"#teach-result tr[data-twin='{twin}']")
        rises[twin] = float(row.get_attribute("data-after")) - \
            float(row.get_attribute("data-before"))
    assert rises["numpy"] > 0 and abs(rises["numpy"] - rises["keras"]) < 1e-4, rises
    before = int(page.evaluate("sequence"))
    page.click("#reset")
    wait_for_reading(page, before)
    return worst, rises


def test_backward_unit_and_teach_in_the_browser(page, served, trained, tmp_path):
    _, (x_test, _) = trained
    shots = Path(os.environ["DRAW_SCREENSHOTS"]) if os.environ.get("DRAW_SCREENSHOTS") \
        else tmp_path
    weights = common.load_weights(trained[0], nt.build_model().weight_shapes())
    worst, rises = backward_unit_and_teach(page, x_test[0, :, :, 0], nt, weights, shots)
    for name in ("backward.png", "unit.png"):
        assert (shots / name).stat().st_size > 5000
    print(f"\ndefault network: worst gradient difference {worst:.2e} of the largest entry; "
          f"teach step: NumPy {rises['numpy']:+.6f}, Keras {rises['keras']:+.6f}")


@pytest.fixture(scope="module")
def edited_server(trained, real_data_dir, tmp_path_factory):
    """draw.py from a copy of the repo with docs/change.md's 16-filter edit in
    both twins, serving weights that copy's NumPy twin trained: (port,
    process, the edited NumPy module)."""
    from test_change_the_network import copy_with_edits, load_twins
    folder = copy_with_edits(tmp_path_factory.mktemp("edited"), ["keras", "numpy"])
    _, en = load_twins(folder, "draw_edited")
    (x, y), _ = data_utils.load_dataset("mnist", real_data_dir, progress=False)
    model, optimizer = en.build_model(seed=0), en.Adam()
    for xb, yb in data_utils.iterate_minibatches(x[:4000], y[:4000], 64,
                                                 np.random.default_rng(0)):
        en.train_step(model, optimizer, xb, yb)
    weights = folder / "edited.weights.npz"
    common.save_weights(weights, model.get_weights())
    proc = subprocess.Popen([sys.executable, "draw.py", "--weights", str(weights)], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "Serving the page at" in line, proc.stderr.read()
    yield int(line.split("127.0.0.1:")[1].split("/")[0]), proc, en, model.get_weights()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr


def test_the_page_follows_a_changed_network(browser, edited_server, trained):
    """The same views on the 16-filter network, with no edit to the page:
    its layers, its channel counts, both twins' gradients."""
    port, _, en, weights = edited_server
    page = open_page(browser, port)
    assert "conv1 26x26x16" in page.text_content("#about")
    _, (x_test, _) = trained
    worst, rises = backward_unit_and_teach(page, x_test[1, :, :, 0], en, weights)
    assert page.locator("img[data-layer='conv1']").count() == 8
    page.close()
    print(f"\n16-filter network: worst gradient difference {worst:.2e}; teach step: "
          f"NumPy {rises['numpy']:+.6f}, Keras {rises['keras']:+.6f}")


def test_the_server_says_how_long_each_request_took(served, trained):
    """One read, backward view and teach step straight over HTTP, timed by
    the server (the note quotes these), after which the weights are reset."""
    port, proc = served
    _, (x_test, _) = trained
    digit = io.BytesIO()
    Image.fromarray((255 - x_test[2, :, :, 0] * 255).astype(np.uint8)).resize(
        (140, 140)).save(digit, format="PNG")

    def call(path, body, content_type="application/json"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
        assert response.status == 200, answer
        return answer

    read = call("/read", digit.getvalue(), "image/png")
    request = json.dumps({"x": read["input"], "label": 3})
    for _ in range(2):                    # the second of each: TensorFlow has traced its graph
        TIMES["read"] = call("/read", digit.getvalue(), "image/png")["seconds"]
        TIMES["backward"] = call("/backward", request)["seconds"]
        TIMES["teach"] = call("/teach", request)["seconds"]
    call("/reset", "{}")
    print("\nserver seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in TIMES.items()))
    assert all(0 < v < 30 for v in TIMES.values())


def test_bad_requests_of_the_page(served):
    port, _ = served
    for body, words in [(b"[1, 2]", "a JSON object"), (b"{", "not JSON"),
                        (json.dumps({"x": [[0.5] * 28] * 27, "label": 1}).encode(), "28 x 28"),
                        (json.dumps({"x": [[2.0] * 28] * 28, "label": 1}).encode(), "from 0 to 1"),
                        (json.dumps({"x": [[0.5] * 28] * 28, "label": 10}).encode(),
                         "label must be a whole number from 0 to 9"),
                        (json.dumps({"x": [[0.5] * 28] * 28, "label": True}).encode(), "label")]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/backward", body=body)
        response = conn.getresponse()
        assert response.status == 400 and words in json.loads(response.read())["error"], words
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/unit", body=json.dumps({"x": [[0.0] * 28] * 28, "layer": "dense1",
                                                   "i": 0, "j": 0, "f": 0}))
    response = conn.getresponse()
    assert response.status == 400 and "layer must be one of" in json.loads(response.read())["error"]
    conn.close()


# --- The server attacked: every request answered, memory bounded ---------------

def test_the_server_answers_every_attack_with_bounded_memory(served, trained, tmp_path):
    """Each attack alone, then three at once: the right status, always an
    answer, no traceback in the server's log, the server's own process
    under 600 MB and the Keras twin's process as it was (it is given only
    28 x 28 inputs); and a real drawing is read afterwards."""
    port, proc = served
    keras_before = [_vm_hwm(pid) for pid in _children(proc.pid)]
    cases = faults.server_attacks(port)
    for case, (request, status) in cases.items():
        assert raw_request(port, request)[0] == status, case
    heavy = faults.HEAVY
    results = [None] * 3

    def attack(i):
        results[i] = raw_request(port, cases[heavy[i]][0])[0]

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [cases[name][1] for name in heavy]
    server_peak = _vm_hwm(proc.pid)
    keras_after = [_vm_hwm(pid) for pid in _children(proc.pid)]
    print(f"\npeak memory: server {server_peak:.0f} MB, Keras twin {keras_before} -> "
          f"{keras_after} MB")
    assert server_peak < 600
    # (its children: the Keras twin's process, and multiprocessing's resource tracker)
    assert max(keras_after) > 300 and max(keras_after) < max(keras_before) + 50
    # A normal drawing afterwards.
    _, (x_test, _) = trained
    digit = io.BytesIO()
    Image.fromarray((255 - x_test[0, :, :, 0] * 255).astype(np.uint8)).resize(
        (140, 140)).save(digit, format="PNG")
    status, body = raw_request(port, b"POST /read HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode()
                               + b"\r\nConnection: close\r\nContent-Length: "
                               + str(len(digit.getvalue())).encode() + b"\r\n\r\n"
                               + digit.getvalue())
    assert status == 200 and len(json.loads(body)["numpy"]) == 10


def test_many_connections_at_once_are_bounded(served):
    """More connections than the server serves at once: the rest get 503 at
    once (none waits for ever), and the server keeps answering."""
    port, _ = served
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10)
            for _ in range(draw.CONNECTIONS)]
    try:
        time.sleep(0.5)
        assert raw_request(port, f"GET /info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
                           .encode(), timeout=10)[0] == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.5)
    assert raw_request(port, f"GET /info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                       "Connection: close\r\n\r\n".encode())[0] == 200


def test_the_servers_log_has_no_traceback(served):
    """Run last in this file: everything the server wrote so far (the attacks
    above included)."""
    port, proc = served
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
