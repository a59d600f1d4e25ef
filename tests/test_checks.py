"""The named checks of checks.py pass on the NumPy twin, and each classic
mistake of bug_gallery.py, planted in the twin, is caught by the check meant
for it, with the diagnosis a learner is meant to read. So a change that
weakens a check fails here."""

import subprocess
import sys

import pytest

import bug_gallery
import checks
from conftest import REPO


@pytest.mark.parametrize("check", checks.CHECKS, ids=checks.name)
def test_check_passes_on_the_twin(check):
    check()


def test_every_gallery_mistake_is_caught_where_it_happens():
    rows = bug_gallery.run()
    assert len(rows) >= 12
    problems = []
    for m, check, message in rows:
        if check != m.caught_by or m.says not in (message or ""):
            problems.append(f"{m.target} ({m.wrong}): expected {m.caught_by!r} to say "
                            f"{m.says!r}; got {check!r}: {message}")
    assert not problems, "\n".join(problems)
    # Every kind of layer, forward and backward, and the optimizer and initialiser.
    targets = {m.target for m, _, _ in rows}
    for part in ("conv2d_forward", "conv2d_backward", "maxpool2d_forward",
                 "maxpool2d_backward", "relu_backward", "dropout_mask", "dropout_backward",
                 "flatten_forward", "dense_backward", "softmax_cross_entropy",
                 "softmax_cross_entropy_backward", "Adam.update", "glorot_uniform"):
        assert part in targets, part


def test_planting_leaves_the_twin_as_it_was():
    import mnist_cnn_numpy as nt
    before = (nt.conv2d_backward, nt.Adam.update)
    bug_gallery.run()
    assert (nt.conv2d_backward, nt.Adam.update) == before
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


def test_the_gallery_fails_when_a_mistake_goes_uncaught(monkeypatch):
    """If the checks stopped catching a mistake, the script says so and exits 1."""
    monkeypatch.setattr(bug_gallery.MISTAKES[0], "variant",
                        getattr(bug_gallery.MISTAKES[0].module, bug_gallery.MISTAKES[0].target))
    assert bug_gallery.main([]) == 1
