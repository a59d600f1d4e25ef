"""Draw a digit in your browser and watch both twins read it, forward and backward.

    python draw.py                                  # then open the address it prints
    python draw.py --weights results/mnist/keras.weights.npz --port 8000
    python draw.py --dataset fashion                # results/fashion/numpy.weights.npz

The page (helpers/draw.html) has a canvas to draw on with a mouse, a finger
or a pen, and a way to upload a photo instead. After each stroke it shows:
- every step of preparing the drawing the way MNIST was made
  (own_digits.steps, the same code as --predict);
- both twins' ten probabilities, the NumPy twin's beside the Keras twin's
  (both hold the same weights, so the bars match);
- the feature maps after each conv and pool layer; click a position in a
  conv layer's map to see how that one number was made (the window, the
  kernel, their products and sum, the bias, the ReLU);
- the backward pass of your own digit, for the label you pick: the loss,
  and layer by layer from the loss back to the input the gradient maps
  dLoss/d(output), the NumPy twin's (its hand-written backward functions,
  named beside each layer) beside the Keras twin's (tf.GradientTape), with
  their largest difference, down to dLoss/d(pixels): which pixels would
  move the answer;
- "teach it": one Adam step on your digit with that label, in both twins,
  and the probabilities before and after (on copies of the served weights,
  never written to disk; reset goes back to them).
Every view is built from the layers the twins' build_model declares: a
changed network's weights show that network.

Needs the weights a twin has written: train them first with
`python mnist_cnn_numpy.py` (or the Keras twin); either twin's file works.
The server is the standard library's; it listens on 127.0.0.1 only, answers
only its own page, fetches nothing from the internet, and answers bad or
hostile input with a message (see Handler). Without TensorFlow the page
shows the NumPy twin alone.
"""

import argparse
import base64
import http.server
import io
import json
import multiprocessing
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import data_utils
import mnist_cnn_numpy as nt
from helpers import common, own_digits

PAGE = Path(__file__).resolve().parent / "helpers" / "draw.html"
MAX_BODY = 5_000_000           # bytes: a drawing is a few kB, a phone photo a few MB
MAX_PIXELS = 2_000_000         # decoded: a phone's JPEG is read at 1/2, 1/4 or 1/8 its size
CONNECTIONS = 16               # connections served at once; more get 503 at once
WORKERS = 2                    # requests worked on at once; others wait up to BUSY_WAIT s
BUSY_WAIT = 20
SHOWN = 280                    # pixels: the longest side of each step's picture
MAPS = 8                       # channels shown per layer

# What computes each kind of layer in the NumPy twin, forward and backward:
# the page names them beside each layer, so that it points into the code.
FUNCTIONS = {
    "Conv2D": ("conv2d_forward (im2col), relu_forward",
               "relu_backward, conv2d_backward (col2im)"),
    "MaxPooling2D": ("maxpool2d_forward", "maxpool2d_backward"),
    "Flatten": ("flatten_forward", "flatten_backward"),
    "Dense": ("dense_forward, relu_forward", "relu_backward, dense_backward"),
    "Dropout": ("nothing at inference", "nothing at inference"),
    "BatchNormalization": ("batchnorm forward, with the moving statistics",
                           "its backward at inference: dout * gamma / sqrt(var + eps)"),
}


# =============================================================================
# The Keras twin, in a process of its own
# =============================================================================

class KerasTwin:
    """The Keras twin for the page, in a process of its own (TensorFlow
    alone takes about 570 MB). It gets only the prepared 28 x 28 inputs,
    never a request's bytes, so what a request costs is bounded in the
    server's own process, and the Keras twin's memory stays what loading it
    took. call(name, *args) runs KERAS_CALLS[name](state, *args) there."""

    def __init__(self, weights):
        context = multiprocessing.get_context("spawn")     # a fresh process, not a fork
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_keras_worker, args=(theirs, str(weights)),
                                       daemon=True)
        self.process.start()
        theirs.close()
        self.lock = threading.Lock()
        try:
            status, self.missing = self.connection.recv()
        except EOFError:
            status, self.missing = "missing", "its process ended while loading"
        if status == "error":
            raise common.UserError(self.missing)

    def call(self, name, *args):
        with self.lock:
            self.connection.send((name, args))
            status, value = self.connection.recv()
        if status != "ok":
            raise RuntimeError(f"the Keras twin: {value}")
        return value

    def close(self):
        try:
            self.connection.send(None)
        except OSError:
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


def _keras_worker(connection, weights):
    """The Keras twin's process: load it, say "ready", then answer calls."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)         # Ctrl-C stops the server, not this
    try:
        import mnist_cnn_keras as kt                      # needs TensorFlow
    except ImportError as e:
        connection.send(("missing", f"the Keras twin needs TensorFlow, which is not "
                                    f"installed ({e})"))
        return
    try:
        state = {"kt": kt, "served": weights}
        keras_reset(state)
    except common.UserError as e:
        connection.send(("error", str(e)))
        return
    connection.send(("ready", None))
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        name, args = message
        try:
            connection.send(("ok", KERAS_CALLS[name](state, *args)))
        except Exception as e:                           # the server says what happened
            connection.send(("error", f"{type(e).__name__}: {e}"))


def keras_reset(state):
    """A fresh model with the served weights (dropout 0: a teach step is
    then the same arithmetic as the NumPy twin's), and a fresh Adam."""
    kt = state["kt"]
    state["model"] = model = kt.build_model(dropout=0.0)
    kt.set_weights(model, common.load_weights(state["served"], kt.weight_shapes(model)))
    _keras_float64(state)


def _keras_float64(state):
    """The float64 copy of the model's weights, for the backward view."""
    kt = state["kt"]
    if "model64" not in state:
        state["model64"] = kt.build_model(dropout=0.0, dtype="float64")
    kt.set_weights(state["model64"], {k: v.astype(np.float64)
                                      for k, v in kt.get_weights(state["model"]).items()})


def keras_backward(state, x, label):
    """The loss for `label` and dLoss/d(every layer's output) and d(x), by
    tf.GradientTape, at inference (as the page reads): {name: array}."""
    tf, model = state["kt"].tf, state["model64"]
    inputs = tf.constant(x.astype(np.float64))
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out, outputs = inputs, []
        for layer in model.layers:
            out = layer(out, training=False)
            outputs.append(out)
        loss = model.loss(np.array([label]), out)
    grads = tape.gradient(loss, [inputs] + outputs)
    # (None for the softmax's output: Keras computes the loss from the logits under it.)
    found = {layer.name: np.asarray(g)[0] for layer, g in zip(model.layers, grads[1:])
             if g is not None}
    return float(loss), np.asarray(grads[0])[0], found


def keras_teach(state, x, label):
    state["model"].train_on_batch(x, np.array([label]))
    _keras_float64(state)
    return np.asarray(state["model"](x, training=False))[0]


KERAS_CALLS = {
    "probs": lambda state, x: np.asarray(state["model"](x, training=False))[0],
    "backward": keras_backward,
    "teach": keras_teach,
    "reset": keras_reset,
}


# =============================================================================
# What the page asks of the twins
# =============================================================================

class Reader:
    """The two twins, holding the same weights, and what the page asks of
    them: read a drawing, its backward pass, one unit's arithmetic, a teach
    step and a reset. One request at a time touches the models (lock)."""

    def __init__(self, weights, dataset):
        self.numpy = nt.build_model(dropout=0.0)       # the same at inference
        path = Path(weights)
        if not path.exists():
            raise common.UserError(
                f"No weights at {path}: train them first with `python mnist_cnn_numpy.py`"
                + (" --dataset fashion" if dataset == "fashion" else "")
                + " (or mnist_cnn_keras.py), or point --weights at a weights file.")
        self.served = common.load_weights(path, self.numpy.weight_shapes())
        self.numpy.set_weights(self.served)
        # The backward and unit views in float64, from the same weights: a
        # confident answer's gradient p - y cancels most of float32's seven
        # digits (1 - 0.9999), so only float64 compares the twins there.
        self.numpy64 = nt.build_model(dropout=0.0, dtype="float64")
        self.numpy64.set_weights(self.served)
        self.optimizer = nt.Adam()
        twin = KerasTwin(path)
        self.keras, self.keras_missing = (None, twin.missing) if twin.missing else (twin, None)
        self.classes = data_utils.DATASETS[dataset]["classes"]
        self.weights, self.dataset = str(path), dataset
        self.lock = threading.Lock()

    def info(self):
        return {"classes": self.classes, "weights": Path(self.weights).name,
                "dataset": data_utils.DATASETS[self.dataset]["title"],
                "keras": self.keras is not None, "keras_missing": self.keras_missing,
                "layers": [{"name": layer.name, "type": type(layer).__name__,
                            "shape": list(layer.output_shape),
                            "forward": FUNCTIONS.get(type(layer).__name__, ("?", "?"))[0],
                            "backward": FUNCTIONS.get(type(layer).__name__, ("?", "?"))[1],
                            "unit": isinstance(layer, nt.Conv2D)}
                           for layer in self.numpy.layers]}

    def read(self, data):
        """An image file's bytes -> the steps, the input, both twins'
        probabilities and the feature maps, as the page draws them."""
        start = time.perf_counter()
        shown = own_digits.steps(own_digits.load_gray(io.BytesIO(data), MAX_PIXELS))
        x = shown[-1][2][None, :, :, None].astype(np.float32)           # (1, 28, 28, 1)
        with self.lock:
            probs = self._probs(x)
            maps = nt.feature_maps(self.numpy, x[0])
        return {
            "steps": [{"title": title, "why": why, "image": _png(image)}
                      for title, why, image in shown],
            "input": x[0, :, :, 0].tolist(), **probs,
            "maps": [{"layer": name, "shape": list(out.shape),
                      "channels": [_png(out[:, :, c] / max(float(out[:, :, c].max()), 1e-12),
                                        colours="viridis")
                                   for c in range(min(MAPS, out.shape[2]))]}
                     for name, out in maps],
            "seconds": time.perf_counter() - start,
        }

    def _probs(self, x):
        return {"numpy": nt.predict(self.numpy, x)[0].tolist(),
                "keras": self.keras.call("probs", x).tolist() if self.keras else None}

    def _numpy_backward(self, x, label):
        """The NumPy twin's own backward pass at inference, in float64: the
        loss for label, dLoss/d(x) and {layer name: dLoss/d(its output)},
        each layer's backward taking the gradient its successor gave
        (loss_and_grads' loop, with the gradients kept)."""
        out = nt.forward(self.numpy64.layers, x.astype(np.float64))
        loss, probs = nt.softmax_cross_entropy(out, np.array([label]))
        dout, found = nt.softmax_cross_entropy_backward(probs, np.array([label])), {}
        for layer in reversed(self.numpy64.layers):
            found[layer.name] = dout[0]
            dout = layer.backward(dout)
        return float(loss), dout[0], found

    def backward(self, x, label):
        """The backward view: the loss for `label` in both twins, and from
        the loss back to the input, each conv and pool layer's gradient maps
        in both twins with their largest difference, then dLoss/d(pixels)."""
        start = time.perf_counter()
        x = _batch(x)
        with self.lock:
            loss, dx, grads = self._numpy_backward(x, label)
            theirs = self.keras.call("backward", x, label) if self.keras else None
        view = {"label": label, "loss": {"numpy": loss, "keras": theirs and theirs[0]},
                "layers": [], "seconds": None}
        layers = self.numpy.layers
        for layer, after in reversed(list(zip(layers, layers[1:]))):
            if len(layer.output_shape) == 3:         # conv and pool layers: pictures
                view["layers"].append(_gradient_maps(
                    layer.name, grads[layer.name], theirs[2][layer.name] if theirs else None,
                    after))
        view["input"] = _gradient_maps("input", dx, theirs[1] if theirs else None, layers[0],
                                       every=True)
        view["seconds"] = time.perf_counter() - start
        return view

    def unit(self, x, name, i, j, f, label=None):
        """How one number of a conv layer's output was made, as the NumPy
        twin computes it (in float64, as the backward view); with label,
        how that unit's gradient reaches its kernel and its input window."""
        x = _batch(x)
        with self.lock:
            layers = self.numpy64.layers
            index = [layer.name for layer in layers].index(name)
            layer = layers[index]
            inputs = nt.forward(layers[:index], x.astype(np.float64))[0]    # (H, W, C)
            out = layer.forward(inputs[None])[0]
            K = layer.kernel_size
            if not (0 <= i < out.shape[0] and 0 <= j < out.shape[1] and 0 <= f < out.shape[2]):
                raise ValueError(f"{name} has no unit ({i}, {j}, {f})")
            window, kernel = inputs[i:i + K, j:j + K, :], layer.kernel[:, :, :, f]
            products = window * kernel                                        # (K, K, C)
            z = float(products.sum(dtype=np.float64) + layer.bias[f])
            view = {"layer": name, "i": i, "j": j, "f": f, "K": K,
                    "window": window.transpose(2, 0, 1).tolist(),            # (C, K, K)
                    "kernel": kernel.transpose(2, 0, 1).tolist(),
                    "products": products.transpose(2, 0, 1).tolist(),
                    "channel_sums": products.sum(axis=(0, 1)).tolist(),
                    "bias": float(layer.bias[f]), "z": z,
                    "activation": layer.activation, "out": float(out[i, j, f])}
            if label is not None:
                _, _, grads = self._numpy_backward(x, label)
                g = float(grads[name][i, j, f])                               # dLoss/d(out)
                dz = g if (layer.activation != "relu" or view["out"] > 0) else 0.0
                view.update(label=label, dout=g, dz=dz,
                            dkernel=(dz * window).transpose(2, 0, 1).tolist(),
                            dx=(dz * kernel).transpose(2, 0, 1).tolist())
        return view

    def teach(self, x, label):
        """One Adam step on the drawing with this label, in both twins, from
        what they hold (the served weights, or those of earlier steps):
        the probabilities before and after."""
        start = time.perf_counter()
        x = _batch(x)
        with self.lock:
            before = self._probs(x)
            nt.train_step(self.numpy, self.optimizer, x, np.array([label]))
            self.numpy64.set_weights(self.numpy.get_weights())
            after = {"numpy": nt.predict(self.numpy, x)[0].tolist(),
                     "keras": self.keras.call("teach", x, label).tolist()
                     if self.keras else None}
            self.steps = getattr(self, "steps", 0) + 1
        return {"label": label, "before": before, "after": after, "steps": self.steps,
                "seconds": time.perf_counter() - start}

    def reset(self):
        with self.lock:
            self.numpy.set_weights(self.served)
            self.numpy64.set_weights(self.served)
            self.optimizer, self.steps = nt.Adam(), 0
            if self.keras:
                self.keras.call("reset")
        return {"steps": 0}


def _batch(x):
    """The page's 28 x 28 input as a batch of one, (1, 28, 28, 1) float32."""
    return np.asarray(x, np.float32).reshape(1, 28, 28, 1)


def _gradient_maps(name, mine, theirs, after, every=False):
    """One layer of the backward view: its first channels (all, for the
    input) as pictures on a shared, symmetric scale (red: raising this
    number raises the loss; blue: lowers it), the NumPy twin's beside the
    Keras twin's, their largest difference, and which NumPy functions
    computed it: the backward of the layer after it."""
    channels = range(mine.shape[-1] if every else min(MAPS, mine.shape[-1]))
    scale = max(float(np.abs(mine).max()), 1e-30)
    view = {"layer": name, "shape": list(mine.shape), "largest": scale, "after": after.name,
            "by": FUNCTIONS.get(type(after).__name__, ("?", f"{type(after).__name__}.backward"))[1],
            "numpy": [_png(mine[:, :, c] / scale, colours="RdBu_r") for c in channels]}
    if theirs is not None:
        view["keras"] = [_png(theirs[:, :, c] / scale, colours="RdBu_r") for c in channels]
        view["difference"] = float(np.abs(mine - theirs).max())
    return view


def _png(image, colours=None):
    """A 2-D array as a data: URL of a PNG, at most SHOWN pixels a side:
    grey from [0, 1], or a matplotlib colour map (viridis from [0, 1],
    RdBu_r from [-1, 1])."""
    image = np.asarray(image, np.float64)
    if colours is None:
        pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    else:
        import matplotlib
        if colours == "RdBu_r":
            image = (image + 1) / 2
        pixels = (matplotlib.colormaps[colours](np.clip(image, 0, 1))[..., :3] * 255
                  ).astype(np.uint8)
    picture = Image.fromarray(pixels)
    if max(picture.size) > SHOWN:
        picture.thumbnail((SHOWN, SHOWN))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# =============================================================================
# The server
# =============================================================================

class Handler(http.server.BaseHTTPRequestHandler):
    """GET / (the page), GET /info, POST /read (an image file as the body).

    Every request gets an answer, a refusal included, and nothing it sends
    costs more than a bounded amount of memory: the body must say its
    length, at most MAX_BODY bytes; an image is decoded to at most
    MAX_PIXELS pixels (own_digits.load_gray); at most WORKERS requests are
    worked on at once (Server). Only this machine's own pages may use it:
    the Host must be the server's own address (a page on another site that
    points its name at 127.0.0.1, "DNS rebinding", sends its own name), and
    a browser's Origin, when it sends one, must be too.
    """

    timeout = 30                               # seconds a silent connection is kept
    default_request_version = "HTTP/1.0"       # a garbled request gets a status line too

    def do_GET(self):
        if not self._allowed():
            return
        if self.path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/info":
            self._json(200, self.server.reader.info())
        else:
            self._json(404, {"error": f"nothing at {self.path[:100]}"})

    def do_POST(self):
        if not self._allowed():
            return
        if self.path not in ("/read", "/backward", "/unit", "/teach", "/reset"):
            self.close_connection = True
            return self._json(404, {"error": f"nothing at {self.path[:100]}"})
        length = self._length()
        if length is None:
            return
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            return self._json(400, {"error": "the body ended before its Content-Length"})
        if not data and self.path == "/read":
            return self._json(400, {"error": "nothing was sent: draw a digit first"})
        if not self.server.workers.acquire(timeout=BUSY_WAIT):
            return self._json(503, {"error": "the server is busy with other drawings; try "
                                             "again in a moment"}, {"Retry-After": "2"})
        try:
            reader = self.server.reader
            if self.path == "/read":
                return self._json(200, reader.read(data))
            request = parse_request(data, reader, self.path)
            if self.path == "/backward":
                answer = reader.backward(request["x"], request["label"])
            elif self.path == "/unit":
                answer = reader.unit(request["x"], request["layer"], request["i"],
                                     request["j"], request["f"], request.get("label"))
            elif self.path == "/teach":
                answer = reader.teach(request["x"], request["label"])
            else:
                answer = reader.reset()
            self._json(200, answer)
        except (own_digits.ImageError, ValueError) as e:
            self._json(400, {"error": str(e)})
        finally:
            self.server.workers.release()

    def _allowed(self):
        """Refuse (403) a request from anywhere but this server's own pages."""
        port = self.server.server_address[1]
        own = {f"127.0.0.1:{port}", f"localhost:{port}"}
        host, origin = self.headers.get("Host", ""), self.headers.get("Origin")
        if host in own and (origin is None or origin in {f"http://{h}" for h in own}):
            return True
        self.close_connection = True
        self._json(403, {"error": "this server answers only its own page, at "
                                  f"http://127.0.0.1:{port}/"})
        return False

    def _length(self):
        """The body's length, or None after answering why it cannot be read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._json(411, {"error": "send the image with its length (not chunked)"})
            return None
        text = self.headers.get("Content-Length")
        if text is None:
            self.close_connection = True
            self._json(411, {"error": "send the image with its length"})
            return None
        if not text.strip().isdigit():
            self._drain(10 * MAX_BODY)                 # whatever follows, within the bound
            self._json(400, {"error": "Content-Length must be a whole number of bytes"})
            return None
        length = int(text)
        if length > MAX_BODY:
            self._drain(length)
            self._json(413, {"error": f"the file is {length / 1e6:.1f} MB; the limit is "
                                      f"{MAX_BODY / 1e6:.0f} MB: scale the photo down first"})
            return None
        return length

    def _drain(self, length):
        """Read and drop a body that will not be used (up to 10 times the
        limit, for at most 10 seconds), so that the client, still sending,
        gets the answer; beyond that the connection is closed."""
        left, deadline = length, time.monotonic() + 10
        self.connection.settimeout(2)
        try:
            while 0 < left <= 10 * MAX_BODY and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        self.close_connection = True

    def _json(self, status, value, headers=None):
        self._send(status, json.dumps(value).encode(), "application/json", headers)

    def _send(self, status, body, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def handle_one_request(self):
        """The standard handler, with any error turned into an answer (500)
        and one line on stderr, never a traceback."""
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True               # the client went away
        except Exception as e:                          # keep serving; say what happened
            self.close_connection = True
            print(f"draw.py: {self.command} {self.path[:100]}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            try:
                self._json(500, {"error": f"the server could not read it "
                                          f"({type(e).__name__}: {e})"})
            except OSError:
                pass

    def log_message(self, *args):                # quiet: the page shows what matters
        pass


def parse_request(data, reader, path):
    """A JSON request of the page, checked: x (28 x 28 numbers in [0, 1]),
    label (a class number), and for /unit a conv layer's name and a
    position (i, j) and filter f inside it. Anything else: ValueError."""
    try:
        request = json.loads(data or b"{}")
    except (ValueError, RecursionError):
        raise ValueError("the request is not JSON") from None
    if not isinstance(request, dict):
        raise ValueError("the request must be a JSON object")
    if path == "/reset":
        return request
    x = request.get("x")
    if not (isinstance(x, list) and len(x) == 28 and all(
            isinstance(row, list) and len(row) == 28 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
            for row in x)):
        raise ValueError("x must be the 28 x 28 input the page was given")
    x = np.array(x, np.float64)
    if not (np.all(np.isfinite(x)) and x.min() >= 0 and x.max() <= 1):
        raise ValueError("x must hold numbers from 0 to 1")
    checked = {"x": x}
    needed = {"/backward": ("label",), "/teach": ("label",), "/unit": ("i", "j", "f")}[path]
    optional = ("label",) if path == "/unit" else ()
    tops = {"label": len(reader.classes), "i": 28, "j": 28, "f": 4096}
    for key in needed + optional:
        value = request.get(key)
        if value is None:
            if key in needed:
                raise ValueError(f"the request needs {key!r}")
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < tops[key]):
            raise ValueError(f"{key} must be a whole number from 0 to {tops[key] - 1}")
        checked[key] = value
    if path == "/unit":
        units = [layer["name"] for layer in reader.info()["layers"] if layer["unit"]]
        if request.get("layer") not in units:
            raise ValueError(f"layer must be one of {', '.join(units)}")
        checked["layer"] = request["layer"]
    return checked


class Server(http.server.ThreadingHTTPServer):
    """The standard library's threaded server, with a bound on how many
    connections are served at once (more get 503 at once) and on how many
    readings run at once (workers), so that memory stays bounded."""
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, reader):
        super().__init__(address, Handler)
        self.reader = reader
        self.connections = threading.BoundedSemaphore(CONNECTIONS)
        self.workers = threading.BoundedSemaphore(WORKERS)

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Retry-After: 2\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def server_close(self):
        super().server_close()
        if self.reader.keras:
            self.reader.keras.close()

    def handle_error(self, request, client_address):
        """One line on stderr, not socketserver's traceback."""
        kind, error = sys.exc_info()[:2]
        print(f"draw.py: a connection from {client_address[0]} failed: "
              f"{kind.__name__ if kind else ''}: {error}", file=sys.stderr)


def make_server(weights, dataset="mnist", port=0):
    """The page's server on 127.0.0.1 (port 0: any free port), not yet serving."""
    reader = Reader(weights, dataset)
    try:
        server = Server(("127.0.0.1", port), reader)
    except OSError as e:
        raise common.UserError(f"Cannot listen on 127.0.0.1:{port} ({e.strerror or e}): "
                               "choose another --port, or leave it out for a free one.") \
            from None
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=common.HelpWithDefaults)
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="a weights file written by either twin "
                        "(default: results/<dataset>/numpy.weights.npz)")
    p.add_argument("--dataset", choices=sorted(data_utils.DATASETS), default="mnist",
                   help="which dataset the weights were trained on (for the class names)")
    p.add_argument("--port", type=int, default=0,
                   help="the port on 127.0.0.1; 0 picks a free one")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    weights = args.weights or str(common.results_folder(None, args.dataset) / "numpy.weights.npz")
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
