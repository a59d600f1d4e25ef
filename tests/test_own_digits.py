"""--predict: your own images, prepared the way MNIST was made."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import common
import data_utils
import mnist_cnn_numpy as nt
from helpers import own_digits
from conftest import REPO


def render(digit, scale, canvas, at, invert=True):
    """A 28x28 MNIST digit as a user might photograph it: enlarged, dark ink
    on light paper, somewhere on a larger page."""
    img = Image.fromarray((digit.squeeze() * 255).astype(np.uint8))
    img = img.resize((28 * scale, 28 * scale), Image.BILINEAR)
    page = Image.new("L", canvas, 0)
    page.paste(img, at)
    return Image.eval(page, lambda v: 255 - v) if invert else page


@pytest.fixture(scope="module")
def mnist_test(real_data_dir):
    return data_utils.load_dataset("mnist", real_data_dir, progress=False)


@pytest.fixture(scope="module")
def model(mnist_test):
    """A NumPy twin trained briefly (one pass over 6,000 images): about 95%."""
    (x, y), _ = mnist_test
    m, opt = nt.build_model(seed=0), nt.Adam()
    for xb, yb in data_utils.iterate_minibatches(x[:6000], y[:6000], 64, np.random.default_rng(0)):
        nt.train_step(m, opt, xb, yb)
    return m


def test_rendered_mnist_digits_come_back(mnist_test, model, tmp_path):
    _, (x_test, y_test) = mnist_test
    rng = np.random.default_rng(1)
    paths, originals = [], []
    for i in range(40):
        scale = int(rng.integers(3, 12))
        canvas = (int(rng.integers(28 * scale + 20, 900)), int(rng.integers(28 * scale + 20, 700)))
        at = (int(rng.integers(0, canvas[0] - 28 * scale)),
              int(rng.integers(0, canvas[1] - 28 * scale)))
        # Dark ink on light paper, but 1 in 4 stays white on black.
        page = render(x_test[i], scale, canvas, at, invert=bool(i % 4))
        path = tmp_path / (f"d{i}.png" if i % 2 else f"d{i}.jpg")
        page.save(path)
        paths.append(path)
        originals.append(x_test[i])
    inputs, names, errors = own_digits.prepare(paths)
    assert not errors and inputs.shape == (40, 28, 28, 1) and inputs.dtype == np.float32
    assert 0 <= inputs.min() and inputs.max() <= 1
    # The preparation undoes the rendering: each input looks like its original.
    similar = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(inputs, originals)]
    assert np.median(similar) > 0.85 and min(similar) > 0.5
    # And the network reads them as the original digits.
    predicted = nt.predict(model, inputs).argmax(axis=1)
    assert (predicted == y_test[:40]).mean() >= 0.85
    # Centre of mass in the middle, ink inside the central 20x20 box.
    ys, xs = np.indices((28, 28))
    for image in inputs[..., 0]:
        assert abs((ys * image).sum() / image.sum() - 14) <= 0.5
        assert abs((xs * image).sum() / image.sum() - 14) <= 0.5


def test_transparent_png_is_drawn_on_white(tmp_path):
    img = Image.new("RGBA", (100, 100), (0, 0, 0, 0))          # transparent ...
    for y in range(20, 80):
        img.putpixel((50, y), (0, 0, 0, 255))                   # ... with a black stroke
    img.save(tmp_path / "t.png")
    x = own_digits.to_mnist(own_digits.load_gray(tmp_path / "t.png"))
    assert x.max() > 0.9 and x[0, 0, 0] == 0                     # bright ink, dark background


def test_a_16_bit_png_is_read_at_its_full_range(mnist_test, tmp_path):
    """A 16-bit greyscale PNG (a scanner's, say): its ink is not clipped to
    white; it becomes the same input as the 8-bit copy of the same image."""
    _, (x_test, _) = mnist_test
    digit = 1.0 - x_test[0, :, :, 0]                            # dark ink on light paper
    sixteen, eight = tmp_path / "digit16.png", tmp_path / "digit8.png"
    big = np.kron(digit, np.ones((4, 4)))
    Image.fromarray((big * 65535).round().astype(np.uint16)).save(sixteen)
    Image.fromarray((big * 255).round().astype(np.uint8)).save(eight)
    assert Image.open(sixteen).mode.startswith("I")
    gray16, gray8 = own_digits.load_gray(sixteen), own_digits.load_gray(eight)
    assert gray16.min() < 0.05 and abs(float(gray16.mean()) - float(gray8.mean())) < 0.01
    assert np.abs(own_digits.to_mnist(gray16) - own_digits.to_mnist(gray8)).max() < 0.02


def test_a_large_image_is_refused_before_it_is_decoded(tmp_path):
    """Over max_pixels: a PNG is refused from its header; a JPEG is decoded
    at a fraction of its size instead."""
    png, jpeg = tmp_path / "big.png", tmp_path / "big.jpg"
    Image.new("L", (3000, 2000), 255).save(png)
    Image.new("L", (3000, 2000), 255).save(jpeg)
    with pytest.raises(own_digits.ImageError, match="more than 2 million"):
        own_digits.load_gray(png, max_pixels=2_000_000)
    assert own_digits.load_gray(jpeg, max_pixels=2_000_000).size <= 2_000_000


def test_top3_line_format():
    probs = np.array([0.001, 0.012, 0, 0, 0, 0, 0, 0.981, 0, 0.006])
    assert own_digits.top3("digit.png", probs, [str(d) for d in range(10)]) == \
        "digit.png: 7 (98.1%), 1 (1.2%), 9 (0.6%)"


@pytest.fixture
def images(tmp_path, mnist_test):
    _, (x_test, _) = mnist_test
    good = tmp_path / "seven.png"
    render(x_test[0], 8, (400, 300), (50, 40)).save(good)
    blank = tmp_path / "blank.png"
    Image.new("L", (300, 300), 255).save(blank)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 7000), 1).save(huge)                  # 56 megapixels, a small file
    return {"good": good, "blank": blank, "text": text, "huge": huge,
            "missing": tmp_path / "nope.png"}


@pytest.mark.parametrize("twin", ["numpy", "keras"])
def test_predict_with_bad_files(twin, images, tmp_path, real_data_dir, model):
    weights = tmp_path / "w.npz"
    common.save_weights(weights, model.get_weights())
    order = ["good", "missing", "text", "blank", "huge"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, f"mnist_cnn_{twin}.py", "--load-weights", weights,
                           "--out", out, "--predict", *[images[k] for k in order]], cwd=REPO,
                          env=dict(os.environ, MNIST_DATA_DIR=str(real_data_dir)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1                                 # some files failed
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith(f"{images['good']}: 7 (")   # the good one is still done
    err = proc.stderr
    assert f"{images['missing']}: no such file" in err
    assert f"{images['text']}: not an image" in err
    assert f"{images['blank']}: blank image: no ink found" in err
    assert f"{images['huge']}: image is 8000 x 7000 pixels" in err
    assert (out / f"{twin}_own_images.png").stat().st_size > 1000
    assert not (out / f"{twin}.json").exists()                 # prediction only: no training


def test_predict_all_good_exits_0(images, tmp_path, model):
    weights = tmp_path / "w.npz"
    common.save_weights(weights, model.get_weights())
    proc = subprocess.run([sys.executable, "mnist_cnn_numpy.py", "--load-weights", weights,
                           "--out", tmp_path / "o", "--predict", images["good"]], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"{images['good']}: 7 (")
