"""Draw a digit in your browser and watch both twins read it, step by step.

    python draw.py                                  # then open the address it prints
    python draw.py --weights results/keras.weights.npz --port 8000
    python draw.py --dataset fashion --weights results/fashion/numpy.weights.npz

The page (draw.html) has a canvas to draw on with a mouse, a finger or a
pen, and a way to upload a photo instead. After each stroke it shows every
step of preparing the drawing the way MNIST was made (own_digits.steps, the
same code as --predict), the NumPy twin's ten probabilities beside the Keras
twin's (when TensorFlow is installed; both hold the same weights, so the bars
should match), and the feature maps after each conv and pool layer.

Needs the weights a twin has written: train them first with
`python mnist_cnn_numpy.py` (or the Keras twin); either twin's file works.
The server is the standard library's; it listens on 127.0.0.1 only, nothing
is fetched from the internet, and it answers bad input (not an image, an
empty canvas, a file over 5 MB) with a message the page shows.
"""

import argparse
import base64
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import common
import data_utils
import mnist_cnn_numpy as nt
from helpers import own_digits

PAGE = Path(__file__).resolve().parent / "helpers" / "draw.html"
MAX_BODY = 5_000_000           # bytes: a drawing is a few kB, a phone photo a few MB
SHOWN = 280                    # pixels: the longest side of each step's picture
MAPS = 8                       # channels shown per layer


class Reader:
    """The two twins, holding the same weights, and what the page asks of them."""

    def __init__(self, weights, dataset):
        self.numpy = nt.build_model()
        path = Path(weights)
        if not path.exists():
            raise common.UserError(
                f"No weights at {path}: train them first with `python mnist_cnn_numpy.py`"
                + (" --dataset fashion" if dataset == "fashion" else "")
                + " (or mnist_cnn_keras.py), or point --weights at a weights file.")
        loaded = common.load_weights(path, self.numpy.weight_shapes())
        self.numpy.set_weights(loaded)
        self.keras, self.keras_missing = None, None
        try:
            import mnist_cnn_keras as kt                 # needs TensorFlow
        except ImportError as e:
            self.keras_missing = f"the Keras twin needs TensorFlow, which is not installed ({e})"
        else:
            self.keras = kt.build_model()
            kt.set_weights(self.keras, loaded, f"Weights file {path}")
        self.classes = data_utils.DATASETS[dataset]["classes"]
        self.weights, self.dataset = str(path), dataset
        self.lock = threading.Lock()                     # one reading at a time

    def info(self):
        return {"classes": self.classes, "weights": Path(self.weights).name,
                "dataset": data_utils.DATASETS[self.dataset]["title"],
                "keras": self.keras is not None, "keras_missing": self.keras_missing}

    def read(self, data):
        """An image file's bytes -> the steps, both twins' probabilities and
        the feature maps, as the page draws them."""
        shown = own_digits.steps(own_digits.load_gray(io.BytesIO(data)))
        x = shown[-1][2][None, :, :, None].astype(np.float32)           # (1, 28, 28, 1)
        with self.lock:
            numpy_probs = nt.predict(self.numpy, x)[0]
            keras_probs = None
            if self.keras is not None:
                keras_probs = np.asarray(self.keras(x, training=False))[0]
            maps = nt.feature_maps(self.numpy, x[0])
        return {
            "steps": [{"title": title, "why": why, "image": _png(image)}
                      for title, why, image in shown],
            "numpy": [float(p) for p in numpy_probs],
            "keras": None if keras_probs is None else [float(p) for p in keras_probs],
            "maps": [{"layer": name, "shape": list(out.shape),
                      "channels": [_png(out[:, :, c] / max(float(out[:, :, c].max()), 1e-12),
                                        viridis=True)
                                   for c in range(min(MAPS, out.shape[2]))]}
                     for name, out in maps],
        }


def _png(image, viridis=False):
    """A 2-D array in [0, 1] as a data: URL of a PNG, at most SHOWN pixels a side."""
    image = np.clip(np.asarray(image, np.float64), 0, 1)
    if viridis:
        import matplotlib
        pixels = (matplotlib.colormaps["viridis"](image)[..., :3] * 255).astype(np.uint8)
    else:
        pixels = (image * 255).astype(np.uint8)
    picture = Image.fromarray(pixels)
    if max(picture.size) > SHOWN:
        picture.thumbnail((SHOWN, SHOWN))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Handler(http.server.BaseHTTPRequestHandler):
    """GET / (the page), GET /info, POST /read (an image file as the body)."""

    timeout = 30                               # seconds a silent connection is kept

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/info":
            self._json(200, self.server.reader.info())
        else:
            self._json(404, {"error": f"nothing at {self.path}"})

    def do_POST(self):
        if self.path != "/read":
            return self._json(404, {"error": f"nothing at {self.path}"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._json(411, {"error": "send the image with its length"})
        if length > MAX_BODY:
            self._drain(length)
            return self._json(413, {"error": f"the file is {length / 1e6:.1f} MB; the limit "
                                             f"is {MAX_BODY / 1e6:.0f} MB: scale the photo "
                                             "down first"})
        data = self.rfile.read(length)
        if not data:
            return self._json(400, {"error": "nothing was sent: draw a digit first"})
        try:
            self._json(200, self.server.reader.read(data))
        except own_digits.ImageError as e:
            self._json(400, {"error": str(e)})
        except Exception as e:                   # keep serving; say what happened
            self._json(500, {"error": f"the server could not read it ({type(e).__name__}: "
                                      f"{e})"})

    def _drain(self, length):
        """Read and drop a body that is too large (up to 10 times the limit),
        so that the client, still sending, gets the answer; beyond that the
        connection is closed."""
        left = length
        while 0 < left <= 10 * MAX_BODY:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        self.close_connection = True

    def _json(self, status, value):
        self._send(status, json.dumps(value).encode(), "application/json")

    def _send(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):                # quiet: the page shows what matters
        pass


def make_server(weights, dataset="mnist", port=0):
    """The page's server on 127.0.0.1 (port 0: any free port), not yet serving."""
    reader = Reader(weights, dataset)
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as e:
        raise common.UserError(f"Cannot listen on 127.0.0.1:{port} ({e.strerror or e}): "
                               "choose another --port, or leave it out for a free one.") \
            from None
    server.daemon_threads = True
    server.reader = reader
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="a weights file written by either twin "
                        "(default: results/numpy.weights.npz)")
    p.add_argument("--dataset", choices=sorted(data_utils.DATASETS), default="mnist",
                   help="which dataset the weights were trained on (for the class names)")
    p.add_argument("--port", type=int, default=0,
                   help="the port on 127.0.0.1; 0 picks a free one")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    weights = args.weights or str(Path(common.DEFAULTS["out"]) / "numpy.weights.npz")
    server = make_server(weights, args.dataset, args.port)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(f"Serving the page at {url}  (weights: {weights}"
          + ("" if server.reader.keras else "; NumPy twin only: TensorFlow is not installed")
          + ")\nOpen it in your browser; Ctrl-C stops the server.", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    common.run(main)
