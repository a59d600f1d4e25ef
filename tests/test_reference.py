"""The proof without TensorFlow: the NumPy twin against numbers the Keras
twin computed and stored (tests/reference/keras_reference.npz, written by
`python compare.py --write-reference`), and, with TensorFlow, the check that
Keras still computes those same numbers."""

import os
import subprocess
import sys

import numpy as np
import pytest

import compare
import mnist_cnn_numpy as nt
from conftest import REPO


def test_the_numpy_twin_matches_the_stored_keras_reference(real_data_dir):
    rows = compare.against_reference(real_data_dir)
    assert len(rows) == 8
    for what, dtype, difference, tol in rows:
        assert difference < tol, (what, dtype, difference, tol)


def test_a_wrong_gradient_fails_against_the_reference(real_data_dir, monkeypatch):
    """Not vacuous: a dense layer whose bias gradient forgets the batch's sum
    over one example is caught."""
    original = nt.dense_backward

    def wrong(dout, cache):
        dx, dkernel, dbias = original(dout, cache)
        return dx, dkernel, dbias * 1.01

    monkeypatch.setattr(nt, "dense_backward", wrong)
    rows = compare.against_reference(real_data_dir)
    assert any(not difference < tol for what, _, difference, tol in rows if "gradients" in what)


def test_the_reference_script_without_tensorflow(real_data_dir):
    """`python compare.py --reference` in a Python where TensorFlow and Keras
    refuse to import: it passes and says so."""
    code = ("import sys, importlib.abc\n"
            "class Refuse(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('tensorflow', 'keras'):\n"
            "            raise ImportError('no TensorFlow here')\n"
            "sys.meta_path.insert(0, Refuse())\n"
            "sys.argv = ['compare.py', '--reference']\n"
            "import runpy; runpy.run_path('compare.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, MNIST_DATA_DIR=str(real_data_dir)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "every number within its tolerance" in proc.stdout


def test_keras_still_computes_the_stored_reference(real_data_dir):
    """With TensorFlow: the reference computed again equals the stored one
    (the gradients to their float32 storage, the rest to 1e-12), so a new
    TensorFlow or Keras that computed otherwise would show here."""
    fresh = compare.keras_reference(real_data_dir)
    with np.load(compare.REFERENCE, allow_pickle=False) as stored:
        assert set(stored.files) == set(fresh)
        for key, value in fresh.items():
            tol = 1e-6 if key.startswith("grad:") else 1e-12
            scale = max(float(np.abs(stored[key]).max()), 1e-300)
            assert float(np.abs(value - stored[key]).max()) / scale < tol, key


@pytest.mark.parametrize("bad", [b"", b"not a reference"])
def test_a_damaged_reference_gets_one_message(tmp_path, bad, real_data_dir):
    path = tmp_path / "reference.npz"
    path.write_bytes(bad)
    from helpers import common
    with pytest.raises(common.UserError, match="cannot be read"):
        compare.against_reference(real_data_dir, path)
