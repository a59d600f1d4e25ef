"""The named checks of helpers/checks.py pass on the NumPy twin and on every
speed-up, and each classic mistake of bug_gallery.py, planted in the twin or
in a speed-up, is caught by the check meant for it, with the diagnosis a
learner is meant to read. So a change that weakens a check fails here."""

import subprocess
import sys

import pytest

import numpy as np

import bug_gallery
import mnist_cnn_numpy as nt
import speedup
from conftest import REPO
from helpers import checks


@pytest.mark.parametrize("check", checks.CHECKS, ids=checks.name)
def test_check_passes_on_the_twin(check):
    check()


@pytest.fixture(scope="module")
def gallery():
    """Every mistake planted in turn, and what caught it: [(mistake, check, message)]."""
    return bug_gallery.run()


def test_every_gallery_mistake_is_caught_where_it_happens(gallery):
    rows = gallery
    assert len(rows) >= 12
    problems = []
    for m, check, message in rows:
        if check != m.caught_by or m.says not in (message or ""):
            problems.append(f"{m.target} ({m.wrong}): expected {m.caught_by!r} to say "
                            f"{m.says!r}; got {check!r}: {message}")
    assert not problems, "\n".join(problems)
    # Every kind of layer, forward and backward, the optimizer and initialiser,
    # and the machine's drop-ins.
    targets = {m.name for m, _, _ in rows}
    for part in ("conv2d_forward", "conv2d_backward", "im2col", "col2im", "maxpool2d_forward",
                 "maxpool2d_backward", "relu_backward", "dropout_mask", "dropout_backward",
                 "flatten_forward", "dense_backward", "softmax_cross_entropy",
                 "softmax_cross_entropy_backward", "batchnorm_backward", "Adam.update",
                 "glorot_uniform"):
        assert part in targets, part
    assert sum(name.startswith("speedup.") for name in targets) >= 3


def test_every_check_is_for_something_and_every_fast_variant_has_a_check():
    """The registry: each check names what it checks; each drop-in of
    speedup.py (its fast functions and layer classes) has a check of its own."""
    subjects = {s for c in checks.CHECKS for s in c.subjects}
    assert all(c.subjects for c in checks.CHECKS)
    machine = [name for name in ("im2col_with_ones", "conv2d_forward", "conv2d_backward",
                                 "maxpool2d_forward", "maxpool2d_backward", "conv_pool_forward",
                                 "conv_pool_backward", "shifted_images", "winograd_tiles",
                                 "winograd_corners",
                                 "winograd_backward",
                                 "batchnorm_forward", "batchnorm_backward", "train_in_slices",
                                 "logits_in_slices", "ShareOfBatch", "InPlaceReLU", "FastConv2D",
                                 "FastMaxPooling2D", "BatchNormOverSlices", "SliceProcesses")
               if hasattr(speedup, name)]
    assert len(machine) == 21
    for name in machine:
        assert f"speedup.{name}" in subjects, name


def test_a_diagnosis_names_only_what_it_sees():
    """A result equal to a mistake's is named by it; a correct one passes,
    and a wrong one that is no known mistake gets the general words."""
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 3))
    lookalikes = checks.mistakes_like("im2col", lambda f: f(x, 3))
    assert len(lookalikes) == 1
    with pytest.raises(checks.CheckFailed, match="channel by channel"):
        checks.compare("im2col", lookalikes[0][0], nt.im2col(x, 3), lookalikes=lookalikes)
    checks.compare("im2col", nt.im2col(x, 3), nt.im2col(x, 3), lookalikes=lookalikes)
    with pytest.raises(checks.CheckFailed, match="wrong values at") as failure:
        checks.compare("im2col", nt.im2col(x, 3) + 1e-3, nt.im2col(x, 3), lookalikes=lookalikes)
    assert "channel by channel" not in str(failure.value)


ORIGINALS = [getattr(m.module, m.target.split(".")[0]) for m in bug_gallery.MISTAKES]
METHODS = [(nt.Adam.update, speedup.ShareOfBatch.backward)]


def test_planting_leaves_the_twin_as_it_was(gallery):
    """After the gallery has planted every mistake: every function is the
    twin's own again, and every check passes."""
    assert ORIGINALS == [getattr(m.module, m.target.split(".")[0]) for m in bug_gallery.MISTAKES]
    assert METHODS == [(nt.Adam.update, speedup.ShareOfBatch.backward)]
    assert all(message is None for _, message in checks.run())


def test_the_gallery_script():
    proc = subprocess.run([sys.executable, "bug_gallery.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(bug_gallery.MISTAKES)
    assert f"{n} of {n} caught." in proc.stdout
    assert proc.stdout.count("Caught by check") == n
    proc = subprocess.run([sys.executable, "bug_gallery.py", "--markdown"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("\n| ") == n + 1
    assert "NOT CAUGHT" not in proc.stdout


def test_the_gallery_fails_when_a_mistake_goes_uncaught(monkeypatch):
    """If the checks stopped catching a mistake, the script says so and exits 1."""
    first = bug_gallery.MISTAKES[0]
    monkeypatch.setattr(first, "variant", getattr(first.module, first.target))
    monkeypatch.setattr(bug_gallery, "MISTAKES", bug_gallery.MISTAKES[:2])
    assert bug_gallery.main([]) == 1
