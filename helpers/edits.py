"""The edits docs/change.md tells a learner to make, made to copies of the
twins (never to the repo's files): the tests prove the edited twins, the
docs count their parameters, benchmarks/default_runs.py trains them.

    smaller       conv1 to 16 filters, dense1 to 64 units, in both twins
    batchnorm     a BatchNormalization layer after conv1 and after dense1
"""

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TWINS = {"keras": "mnist_cnn_keras.py", "numpy": "mnist_cnn_numpy.py"}

# docs/change.md, "Change the network": text replacements in build_model.
SMALLER = [("Conv2D(32,", "Conv2D(16,"), ("Dense(128,", "Dense(64,")]

# docs/change.md, "Adding batch normalization": the import, and a
# BatchNormalization line after each of these layers.
BN_IMPORT = ("from helpers import common", "from batchnorm import BatchNormalization")
BN_AFTER = ['Conv2D(32, 3, activation="relu", name="conv1"),',
            'Dense(128, activation="relu", name="dense1"),']
BN_NEW = ['BatchNormalization(name="bn1"),', 'BatchNormalization(name="bn2"),']


def copy_repo(folder):
    """The repo's scripts and helpers in folder, as a learner's copy."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for path in REPO.glob("*.py"):
        shutil.copy(path, folder)
    shutil.copytree(REPO / "helpers", folder / "helpers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def smaller(folder, twins=("keras", "numpy")):
    """A copy in folder with the SMALLER edits made in the twins named."""
    copy_repo(folder)
    for twin in twins:
        path = Path(folder) / TWINS[twin]
        text = path.read_text()
        for old, new in SMALLER:
            if text.count(old) != 1:
                raise ValueError(f"{TWINS[twin]}: {old!r} should appear once")
            text = text.replace(old, new)
        path.write_text(text)
    return Path(folder)


def batchnorm(folder):
    """A copy in folder with batch normalization added to both twins."""
    copy_repo(folder)
    for twin, prefix in (("keras", "layers."), ("numpy", "")):
        path = Path(folder) / TWINS[twin]
        lines = path.read_text().splitlines()
        if twin == "numpy":
            lines.insert(lines.index(BN_IMPORT[0]) + 1, BN_IMPORT[1])
        for after, new in zip(BN_AFTER, BN_NEW):
            (i,) = [k for k, line in enumerate(lines) if after in line]
            indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
            lines.insert(i + 1, indent + prefix + new)
        path.write_text("\n".join(lines) + "\n")
    return Path(folder)


NETWORKS = {"smaller": smaller, "batchnorm": batchnorm}


def load(path, name):
    """A module from a file, under a name of its own."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_twin(folder, twin, prefix):
    """A twin of an edited copy as a module (its own imports, batchnorm
    included, found in folder first)."""
    sys.path.insert(0, str(folder))
    try:
        return load(Path(folder) / TWINS[twin], f"{prefix}_{twin}")
    finally:
        sys.path.remove(str(folder))


def numpy_model(network):
    """The NumPy twin's model of an edited copy (built, then the copy removed)."""
    with tempfile.TemporaryDirectory() as tmp:
        NETWORKS[network](tmp)
        return load_twin(tmp, "numpy", f"edited_{network}").build_model()
