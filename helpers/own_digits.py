"""Your own handwriting: turn a PNG or JPEG into MNIST-style input.

Both twins' `--predict IMAGE ...` use this module, so a drawing is prepared
the same way for both. The steps are the ones used to make MNIST itself:

1. grayscale, scaled to [0, 1];
2. ink must be bright on dark, as in MNIST: dark ink on light paper is
   inverted (told apart by the border, which is mostly paper);
3. crop to the ink;
4. scale the digit to fit a 20 x 20 box, keeping its aspect ratio;
5. place it in a 28 x 28 image so that its centre of mass is at the centre
   (pixel (14, 14), as in MNIST).

Needs NumPy and Pillow (which matplotlib already installs); never TensorFlow.
"""

import math
import sys

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 50_000_000           # a 50-megapixel photo is plenty for one digit
INK = 0.2                         # after inversion, a pixel above this is ink


class ImageError(Exception):
    """A file that cannot be turned into a digit; the message says why."""


def load_gray(path, max_pixels=MAX_PIXELS):
    """Read an image file (a path or an open binary file) as a float array
    in [0, 1], shape (height, width), of at most max_pixels pixels: a larger
    JPEG is decoded at a fraction of its size (1/2, 1/4 or 1/8, which JPEG
    gives almost for free), any other larger image is refused before it is
    decoded. 16-bit images are read at their full range."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels and img.format == "JPEG":
                ratio = math.sqrt(img.width * img.height / max_pixels)
                scale = min(8, 1 << math.ceil(math.log2(ratio)))      # JPEG's 1/2, 1/4, 1/8
                img.draft("L", (img.width // scale, img.height // scale))
            if img.width * img.height > max_pixels:
                raise ImageError(f"image is {img.width} x {img.height} pixels, more than "
                                 f"{max_pixels / 1e6:g} million; scale it down first")
            if img.mode in ("RGBA", "LA", "P", "PA"):
                # Transparent areas become white paper, not black.
                rgba = img.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(paper, rgba)
            if img.mode.startswith("I;16") or img.mode == "I":      # 16 bits a pixel
                gray = np.asarray(img, dtype=np.float32) / 65535.0
            elif img.mode == "F":                                  # floats: their own range
                gray = np.asarray(img, dtype=np.float32)
                gray = gray / max(float(np.nanmax(np.abs(gray))), 1e-12)
            else:
                gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except UnidentifiedImageError:
        raise ImageError("not an image that can be read (PNG or JPEG expected)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read the image ({e})") from None
    if not np.all(np.isfinite(gray)):
        raise ImageError("the image holds values that are not numbers")
    return np.clip(gray, 0.0, 1.0)


def steps(gray):
    """The preparation, one step at a time: [(title, why, image), ...].

    gray: a grayscale image in [0, 1], (height, width). The last image is
    the network's input, (28, 28). draw.py shows every step; to_mnist keeps
    the last.
    """
    shown = [("as drawn", "your image, in grey", gray)]
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 0.5:                     # light paper: make the ink bright
        gray = 1.0 - gray
    # Stretch the contrast so that faint pencil and grey paper still work.
    low, high = np.percentile(gray, 1), gray.max()
    if high - low < 0.1:
        raise ImageError("blank image: no ink found")
    gray = np.clip((gray - low) / (high - low), 0.0, 1.0)
    shown.append(("grey and inverted", "MNIST's digits are bright ink on black; "
                  "the contrast is stretched to the full range", gray))
    rows, cols = np.nonzero(gray > INK)
    if len(rows) == 0:
        raise ImageError("blank image: no ink found")
    digit = gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]   # crop to the ink
    shown.append(("cropped to the ink", "where the digit is on the page does not matter",
                  digit))

    # Longest side to 20 pixels, the other in proportion (at least 1).
    h, w = digit.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))          # PIL: (width, height)
    small = Image.fromarray((digit * 255).astype(np.uint8)).resize(size, Image.LANCZOS)
    small = np.asarray(small, dtype=np.float32) / 255.0
    shown.append(("scaled into 20x20", "MNIST's digits fit a 20 x 20 box, keeping "
                  "their shape", small))

    # Centre of mass to the centre of the 28 x 28 frame: pixel (14, 14),
    # where MNIST's digits have theirs (measured: 14.0 +- 0.3 on both axes).
    canvas = np.zeros((28, 28), np.float32)
    top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    total = canvas.sum()
    ys, xs = np.indices(canvas.shape)
    dy = int(round(14 - (ys * canvas).sum() / total))
    dx = int(round(14 - (xs * canvas).sum() / total))
    canvas = np.clip(shift(canvas, dy, dx), 0.0, 1.0)
    shown.append(("placed in 28x28 by its centre of mass", "as MNIST's digits are: "
                  "the network's input", canvas))
    return shown


def to_mnist(gray):
    """Turn a grayscale image in [0, 1] into one MNIST-style input, (28, 28, 1)."""
    return steps(gray)[-1][2][..., None]


def shift(image, dy, dx):
    """Move an image by (dy, dx) pixels, filling with zeros (no wrap-around)."""
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def prepare(paths):
    """Load and prepare every file: (inputs (M, 28, 28, 1), names, errors).

    A file that fails does not stop the others; errors maps its name to why.
    """
    inputs, names, errors = [], [], {}
    for path in paths:
        try:
            inputs.append(to_mnist(load_gray(path)))
            names.append(str(path))
        except ImageError as e:
            errors[str(path)] = str(e)
    stacked = np.stack(inputs) if inputs else np.zeros((0, 28, 28, 1), np.float32)
    return stacked, names, errors


def top3(name, probs, class_names):
    """One line per file: `digit.png: 7 (98.1%), 1 (1.2%), 9 (0.3%)`."""
    best = np.argsort(probs)[::-1][:3]
    return f"{name}: " + ", ".join(f"{class_names[k]} ({100 * probs[k]:.1f}%)" for k in best)


def report(paths, predict, class_names):
    """Prepare and predict every file, and print one line for each (an
    error on stderr). Returns (inputs, names, probs, exit status: 1 if any
    failed); the caller draws the figure.

    predict: a function from inputs (M, 28, 28, 1) to probabilities (M, 10),
    so each twin passes its own model.
    """
    inputs, names, errors = prepare(paths)
    probs = predict(inputs) if len(inputs) else np.zeros((0, len(class_names)))
    done = dict(zip(names, probs))
    for path in map(str, paths):                        # in the order given
        if path in done:
            print(top3(path, done[path], class_names))
        else:
            print(f"Error: {path}: {errors[path]}", file=sys.stderr)
    return inputs, names, probs, 1 if errors else 0
