"""draw.py in a real browser: headless Chromium (Debian's package), driven
by Playwright, draws real MNIST test digits on the page's canvas as strokes
of the pointer and reads what the page shows; it uploads a photo and the
kinds of bad input a user sends, and takes the README's screenshot.

Without Chromium the browser test is skipped with how to install it, except
where MNIST_TWINS_REQUIRE_BROWSER is set (CI), where it fails instead.
"""

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from helpers import common
import data_utils
import draw
import mnist_cnn_numpy as nt
from conftest import REPO

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


# --- In the browser ------------------------------------------------------------

@pytest.fixture(scope="module")
def page(server):
    if CHROMIUM is None:
        how = "install it (Debian or Ubuntu: apt-get install chromium), then run pytest again"
        if os.environ.get("MNIST_TWINS_REQUIRE_BROWSER"):
            pytest.fail(f"the browser test needs Chromium: {how}")
        pytest.skip(f"the browser test needs Chromium: {how}")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1150, "height": 1000})
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_function("document.getElementById('about').textContent != 'Loading...'")
        yield page
        browser.close()


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
            assert page.locator("#bars tr").count() == 10
            assert page.locator("#maps .maps").count() == 4
            assert page.text_content("#message") == ""
            shot = tmp_path / "draw.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("DRAW_SCREENSHOT"):             # refreshing the README's
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
