"""MNIST and Fashion-MNIST for both twins: find, download, verify, parse.

Both `mnist_cnn_keras.py` and `mnist_cnn_numpy.py` get their data from this
one module, so the two networks see byte-for-byte identical arrays and, for
the same seed, the same mini-batches in the same order.

    (x_train, y_train), (x_test, y_test) = load_dataset("mnist")
    x_train.shape == (60000, 28, 28, 1)   float32 in [0, 1], channels-last
    y_train.shape == (60000,)             uint8 class labels 0..9

Where the files live (first match wins):
  1. the `data_dir` argument (the scripts' `--data-dir`),
  2. the MNIST_DATA_DIR environment variable,
  3. a per-user cache: $XDG_CACHE_HOME/mnist-twins, else ~/.cache/mnist-twins.
Each dataset has its own subfolder (`mnist/`, `fashion/`) because both use
the same four file names. A file may be the canonical `.gz` or already
unpacked; the four files may also sit directly in the data root.

Every file is checked on every load: the SHA-256 of its *decompressed* bytes
must match the published value. A missing or corrupt file is downloaded again
from HTTPS mirrors (replace them with MNIST_MIRRORS="url1,url2").

Run `python data_utils.py [--dataset fashion]` to download and verify ahead
of time, e.g. before going offline.

This module needs only NumPy and requests (never TensorFlow).
"""

import argparse
import gzip
import hashlib
import ipaddress
import os
import secrets
import sys
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import requests

from helpers.progress import ProgressBar


class DataError(Exception):
    """Anything wrong with getting or reading a dataset. The message says what
    went wrong and what to do; the scripts print it instead of a traceback."""


class UnreadableFile(DataError):
    """A file that is there but cannot be read (permissions, an I/O error):
    never taken for a corrupt one, so never removed or replaced."""


# ---------------------------------------------------------------------------
# What each dataset is: its files, their checksums, where to download them
# ---------------------------------------------------------------------------

IMAGE_SIZE = 28                  # every image is 28 x 28 grey pixels
IMAGES_MAGIC = 2051              # IDX header: 0x00000803 = unsigned bytes, 3 dims
LABELS_MAGIC = 2049              # IDX header: 0x00000801 = unsigned bytes, 1 dim
VALIDATION_SIZE = 5000           # the last 5,000 training images validate

# The four files of a dataset, by role, under their canonical (unpacked) names.
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Unpacked sizes in bytes: a 16-byte header + N*28*28 pixels, or 8 + N labels.
# Both datasets have 60,000 training and 10,000 test images.
RAW_SIZES = {
    "train_images": 16 + 60000 * 28 * 28,
    "train_labels": 8 + 60000,
    "test_images": 16 + 10000 * 28 * 28,
    "test_labels": 8 + 10000,
}

DATASETS = {
    "mnist": {
        "title": "MNIST",
        "classes": [str(d) for d in range(10)],
        # Tried in order. The original site (yann.lecun.com) is left out: it
        # often answers 403/404 or an HTML page, and it has no valid HTTPS.
        "mirrors": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ],
        # SHA-256 of the decompressed bytes: a fresh download, a recompressed
        # copy and an unpacked copy all pass.
        "sha256": {
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        "sizes": RAW_SIZES,
    },
    "fashion": {
        "title": "Fashion-MNIST",
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        "mirrors": [
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ],
        "sha256": {
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        "sizes": RAW_SIZES,
    },
}

# Network settings. Module constants, so a test can shorten them.
USER_AGENT = "mnist-twins/1.0 (educational CNN twins; dataset downloader)"
CONNECT_TIMEOUT = 10.0           # seconds to open a connection
READ_TIMEOUT = 30.0              # seconds of silence allowed while reading
ATTEMPTS = 3                     # tries per mirror on connection errors and 5xx
BACKOFF = 1.0                    # seconds before the 2nd try, doubled after
CHUNK = 1 << 16                  # bytes read from the network at a time


# ---------------------------------------------------------------------------
# Where the files live
# ---------------------------------------------------------------------------

def data_root(data_dir=None):
    """The folder that holds the datasets: argument, MNIST_DATA_DIR, or cache."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("MNIST_DATA_DIR"):
        return Path(os.environ["MNIST_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "mnist-twins"


def candidate_paths(root, name, raw_name):
    """Every place a file may already be, in the order they are tried.

    `train-images-idx3-ubyte` is also accepted as `.gz` and in the common
    `train-images.idx3-ubyte` spelling, in root/<name>/ and directly in root/.
    """
    dotted = raw_name.replace("-idx", ".idx")
    spellings = [raw_name + ".gz", raw_name, dotted, dotted + ".gz"]
    return [folder / s for folder in (root / name, root) for s in spellings]


def mirrors_for(name):
    """Base URLs to download from: MNIST_MIRRORS if set, else the built-ins.

    MNIST_MIRRORS is a comma-separated list of base URLs; a file's URL is base
    + file name, and `{dataset}` in a base is replaced by the dataset's name.
    """
    env = os.environ.get("MNIST_MIRRORS", "").strip()
    if not env:
        return list(DATASETS[name]["mirrors"])
    bases = []
    for base in (b.strip() for b in env.split(",")):
        if not base:
            continue
        base = base.replace("{dataset}", name)
        if not base.endswith("/"):
            base += "/"
        _check_url_scheme(base)
        bases.append(base)
    return bases


def _check_url_scheme(url):
    """HTTPS everywhere; plain HTTP only to this machine (a local test server)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http":
        host = parts.hostname or ""
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
    raise DataError(f"MNIST_MIRRORS: {url!r} is not an https:// URL "
                    "(plain http is accepted only for localhost).")


# ---------------------------------------------------------------------------
# Verification: decompress (if gzip) and compare the SHA-256
# ---------------------------------------------------------------------------

def read_verified(path, sha256, raw_size):
    """Return the unpacked bytes of `path` if their SHA-256 is `sha256`.

    Works for gzip and unpacked files alike (gzip is recognised by its first
    two bytes, not by the file name). Never unpacks more than raw_size + 1
    bytes, so a corrupt or hostile file cannot fill the memory.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                data = _gunzip_limited(f, raw_size + 1, path)
            else:
                data = f.read(raw_size + 1)
    except OSError as e:
        raise UnreadableFile(f"{path} is there but cannot be read ({e.strerror or e}): fix "
                             "its permissions, or remove it to download it again.") from None
    if len(data) != raw_size:
        raise DataError(f"{path}: wrong size: {len(data):,}"
                        f"{'+' if len(data) > raw_size else ''} bytes of content, "
                        f"expected {raw_size:,}.")
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise DataError(f"{path}: checksum mismatch (SHA-256 {found[:16]}..., "
                        f"expected {sha256[:16]}...).")
    return data


def _gunzip_limited(f, limit, path):
    """Unpack a gzip stream, but never more than `limit` bytes."""
    try:
        with gzip.GzipFile(fileobj=f) as gz:
            return gz.read(limit)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}).") from None


# ---------------------------------------------------------------------------
# Download: mirrors in order, retries, temporary file, verify, then rename
# ---------------------------------------------------------------------------

def download(name, role, dest_dir, progress=True):
    """Fetch one file of dataset `name` into `dest_dir`; return its bytes.

    Each mirror is tried in turn. Connection errors, timeouts and 5xx answers
    are retried with a doubling pause; anything else (404, an HTML page, a
    wrong checksum) moves straight on to the next mirror. The body is streamed
    to a temporary file in `dest_dir`, verified, and only then renamed to its
    final name with os.replace (atomic), so no run, however interrupted, ever
    leaves a partial or unverified file under the final name.
    """
    spec = DATASETS[name]
    raw_name = FILE_NAMES[role]
    gz_name = raw_name + ".gz"
    sha, raw_size = spec["sha256"][role], spec["sizes"][role]
    # A gzip file is never much larger than its content; anything beyond this
    # is not the file we want and is refused while streaming.
    max_body = raw_size + raw_size // 100 + 4096
    failures = []
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    try:
        for base in mirrors_for(name):
            url = base + gz_name
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    return _fetch_one(session, url, dest_dir, gz_name, sha,
                                      raw_size, max_body, progress)
                except _Retry as e:
                    reason = str(e)
                    if attempt < ATTEMPTS:
                        time.sleep(BACKOFF * 2 ** (attempt - 1))
                        continue
                    failures.append(f"{url}: {reason} "
                                    f"(after {ATTEMPTS} attempts)")
                except _NextMirror as e:
                    failures.append(f"{url}: {e}")
                break
    finally:
        session.close()
    raise DataError(_offline_help(name, raw_name, dest_dir, failures))


def new_part_file(folder, name):
    """Create `.<name>.<random>.part` in folder for writing: (path, fd).

    It is made with mode 0666 and the user's umask, like any file open()
    creates, so that the file it becomes by os.replace has the usual
    permissions (tempfile.mkstemp would make it private, 0600). O_EXCL: a
    name that exists already is never reused.
    """
    path = Path(folder) / f".{name}.{secrets.token_hex(4)}.part"
    return str(path), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


class _Retry(Exception):
    """A failure worth trying again on the same mirror (network, 5xx)."""


class _NextMirror(Exception):
    """A failure that the same mirror will repeat (404, bad content)."""


def _fetch_one(session, url, dest_dir, gz_name, sha, raw_size, max_body,
               progress):
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp, fd = new_part_file(dest_dir, gz_name)
    except OSError as e:
        raise DataError(f"Cannot write to {dest_dir} ({e.strerror or e}). "
                        "Choose a writable folder with --data-dir or "
                        "MNIST_DATA_DIR.") from None
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(session, url, out, max_body, progress, gz_name)
        try:
            data = read_verified(tmp, sha, raw_size)
        except DataError as e:
            raise _NextMirror(str(e).replace(tmp, "downloaded file")) from None
        os.replace(tmp, dest_dir / gz_name)    # atomic: all or nothing
        return data
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _stream(session, url, out, max_body, progress, label):
    """Copy the body of GET `url` into the open file `out`."""
    try:
        with session.get(url, stream=True,
                         timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as r:
            if r.status_code >= 500:
                raise _Retry(f"HTTP {r.status_code} {r.reason}")
            if r.status_code != 200:
                raise _NextMirror(f"HTTP {r.status_code} {r.reason}")
            if "text/html" in r.headers.get("Content-Type", ""):
                raise _NextMirror("answered with an HTML page, not the file")
            total = int(r.headers.get("Content-Length") or 0)
            if total > max_body:
                raise _NextMirror(f"body of {total:,} bytes is larger than "
                                  f"the file can be ({max_body:,})")
            bar = _download_bar(label, total) if progress else None
            done = 0
            for chunk in r.iter_content(CHUNK):
                done += len(chunk)
                if done > max_body:
                    raise _NextMirror(f"body exceeds {max_body:,} bytes, "
                                      "larger than the file can be")
                out.write(chunk)
                if bar:
                    bar.update(done)
            if bar:
                bar.close(f"Downloaded {label} ({done / 1e6:.1f} MB).")
    except requests.exceptions.Timeout:
        raise _Retry("timed out") from None
    except (requests.exceptions.ConnectionError,
            requests.exceptions.ChunkedEncodingError) as e:
        raise _Retry(f"connection failed ({_short(e)})") from None
    except requests.exceptions.RequestException as e:
        raise _NextMirror(f"request failed ({_short(e)})") from None


def _download_bar(label, total):
    """The progress bar of a download of `total` bytes, on stderr; small
    files (under 1 MB) download silently."""
    if total < 1_000_000:
        return None
    bar = ProgressBar(total, sys.stderr,
                      lambda done, total: f"Downloading {label} {done / 1e6:5.1f}/"
                                          f"{total / 1e6:.1f} MB")
    if not bar.tty:
        print(f"Downloading {label} ({total / 1e6:.1f} MB)...", file=sys.stderr, flush=True)
    return bar


def _short(exc):
    """The innermost, most specific reason of a requests exception."""
    while exc.__context__ is not None and str(exc.__context__):
        exc = exc.__context__
    text = str(exc).split("(Caused by")[0].strip()
    return (text[:150] + "...") if len(text) > 150 else text


def _offline_help(name, raw_name, dest_dir, failures):
    spec = DATASETS[name]
    tried = "\n".join("  " + f for f in failures) or "  (no mirrors configured)"
    files = "\n".join(f"  {n}.gz" for n in FILE_NAMES.values())
    return (f"Could not download {spec['title']} file {raw_name}.gz.\n"
            f"Tried:\n{tried}\n"
            f"To work offline, put these four files (gzip or unpacked) in "
            f"{dest_dir}:\n{files}\n"
            f"or point --data-dir or MNIST_DATA_DIR at a folder that has "
            f"them (in a '{name}/' subfolder or directly). To use other "
            f"mirrors, set MNIST_MIRRORS to a comma-separated list of base "
            f"URLs.")


# ---------------------------------------------------------------------------
# IDX parsing: header checks first, then a zero-copy view of the pixels
# ---------------------------------------------------------------------------

def parse_idx(data, magic, where="IDX data"):
    """Parse IDX bytes into a uint8 array, checking everything on the way.

    IDX layout (big-endian): a 4-byte magic number (0, 0, type 0x08 =
    unsigned byte, number of dimensions), one 4-byte size per dimension, then
    the values. Images: magic 2051, sizes (N, 28, 28). Labels: magic 2049,
    size (N,), values 0..9. The byte count must be exactly what the header
    promises; that is checked before anything is allocated.
    """
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    header = 4 + 4 * ndim
    found = int.from_bytes(data[0:4], "big")
    if len(data) >= 4 and found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DataError(f"{where}: magic number {found}, expected {magic} "
                        f"(IDX {kind}); not an MNIST {kind} file.")
    if len(data) < header:
        raise DataError(f"{where}: only {len(data)} bytes, too short for an "
                        f"IDX header of {header} bytes.")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big")
            for i in range(ndim)]
    if ndim == 3 and dims[1:] != [IMAGE_SIZE, IMAGE_SIZE]:
        raise DataError(f"{where}: images are {dims[1]}x{dims[2]}, "
                        f"expected {IMAGE_SIZE}x{IMAGE_SIZE}.")
    expected = header + int(np.prod(dims, dtype=object))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "too long"
        raise DataError(f"{where}: {problem}: {len(data):,} bytes, the header "
                        f"promises {expected:,}.")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    if ndim == 1 and array.size and array.max() > 9:
        raise DataError(f"{where}: label {int(array.max())} found; "
                        "labels must be 0..9.")
    return array


# ---------------------------------------------------------------------------
# The public entry points
# ---------------------------------------------------------------------------

def load_file(name, role, data_dir=None, progress=True):
    """Return the verified, unpacked bytes of one file; download if needed."""
    if name not in DATASETS:
        raise DataError(f"Unknown dataset {name!r}; choose from "
                        f"{', '.join(sorted(DATASETS))}.")
    spec = DATASETS[name]
    root = data_root(data_dir)
    own_dir = root / name                      # downloads go here
    sha, raw_size = spec["sha256"][role], spec["sizes"][role]
    for path in candidate_paths(root, name, FILE_NAMES[role]):
        if not path.is_file():
            continue
        try:
            return read_verified(path, sha, raw_size)
        except UnreadableFile:
            raise
        except DataError as e:
            if path.parent != own_dir:
                continue       # in the shared root: maybe another dataset's
            # A corrupt or partial file in this dataset's own folder: remove
            # it so it is fetched again below.
            try:
                path.unlink()
            except OSError:
                raise DataError(f"{e} It cannot be removed; replace it with "
                                "a good copy.") from None
            print(f"Removed a corrupt file: {e}", file=sys.stderr)
    return download(name, role, own_dir, progress)


def load_dataset(name="mnist", data_dir=None, progress=True):
    """Load a dataset as ((x_train, y_train), (x_test, y_test)).

    Images: float32 in [0, 1], shape (N, 28, 28, 1) (channels-last, as Keras
    expects). Labels: uint8 class numbers, shape (N,). Raises DataError with a
    message meant for the user when anything goes wrong.
    """
    arrays = {}
    for role, raw_name in FILE_NAMES.items():
        data = load_file(name, role, data_dir, progress)
        magic = IMAGES_MAGIC if role.endswith("images") else LABELS_MAGIC
        arrays[role] = parse_idx(data, magic, where=raw_name)
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{name} {split}: {len(images):,} images but "
                            f"{len(labels):,} labels.")
        # uint8 0..255 -> float32 0..1, plus a channel axis: (N, 28, 28, 1).
        # Divided in place, so only one float32 copy of the images exists.
        x = images.astype(np.float32)
        x /= np.float32(255.0)
        x = x[..., None]
        out.append((x, labels.copy()))
    return tuple(out)


def split_validation(x, y, size=VALIDATION_SIZE):
    """Hold out the last `size` training examples: ((x_tr, y_tr), (x_val, y_val)).

    Both twins call this, so they validate on exactly the same images.
    """
    if not 0 < size < len(x):
        raise DataError(f"Cannot hold out {size:,} of {len(x):,} examples "
                        "for validation.")
    return (x[:-size], y[:-size]), (x[-size:], y[-size:])


def epoch_order(n, rng):
    """The order in which one epoch visits n examples: a permutation from rng.

    Both twins draw it from `np.random.default_rng(seed)`, one call per epoch,
    so the same seed gives the same batches in the same order.
    """
    return rng.permutation(n)


def iterate_minibatches(x, y, batch_size, rng=None):
    """Yield (x_batch, y_batch) over one epoch, shuffled if rng is given.

    The last batch is smaller when batch_size does not divide len(x), as in
    Keras's model.fit.
    """
    order = epoch_order(len(x), rng) if rng is not None else np.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Download (if needed) and verify a dataset, then print "
                    "where it is and what it holds.")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                        help="which dataset (default: mnist)")
    parser.add_argument("--data-dir", default=None,
                        help="data folder (default: $MNIST_DATA_DIR, else "
                             "~/.cache/mnist-twins)")
    args = parser.parse_args(argv)
    (x_train, y_train), (x_test, y_test) = load_dataset(args.dataset, args.data_dir)
    print(f"{DATASETS[args.dataset]['title']} in "
          f"{data_root(args.data_dir) / args.dataset}: verified.")
    print(f"  train: {x_train.shape} images, labels {np.bincount(y_train)}")
    print(f"  test:  {x_test.shape} images, labels {np.bincount(y_test)}")
    return 0


if __name__ == "__main__":
    # One message for Ctrl-C and SIGTERM too, as for the twins; the imported
    # module's main, so that its DataError is the one common.run knows.
    import data_utils
    from helpers import common
    common.run(data_utils.main)
