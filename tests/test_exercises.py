"""exercises.py: the workbook made from the twin, the checker and training
with the learner's functions."""

import json
import os
import re
import subprocess
import sys

import pytest

import bug_gallery
import exercises
from conftest import REPO
from helpers import checks


def run(*args, cwd=REPO, **env):
    return subprocess.run([sys.executable, str(REPO / "exercises.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **env))


@pytest.fixture
def solved(tmp_path):
    """A workbook made from the twin's own functions."""
    path = tmp_path / "solved.py"
    exercises.start(path, solutions=True)
    return path


def test_the_exercises_come_from_the_twin():
    found = exercises.exercises()
    assert len(found) >= 10
    names = [e.name for e in found]
    for name in ("dense_forward", "dense_backward", "relu_backward",
                 "softmax_cross_entropy_backward", "dropout_mask", "dropout_backward",
                 "maxpool2d_forward", "maxpool2d_backward", "im2col", "conv2d_forward",
                 "conv2d_backward", "Adam.update"):
        assert name in names
    assert names.index("dense_forward") < names.index("conv2d_backward")   # builds up


def test_a_fresh_workbook_stops_at_the_first_exercise(tmp_path):
    path = tmp_path / "workbook.py"
    proc = run("start", "--path", path)
    assert proc.returncode == 0 and path.exists(), proc.stderr
    text = path.read_text()
    assert text.count('raise NotImplementedError("not written yet")') == len(exercises.exercises())
    assert not re.search(r"def \w+_naive\(", text)   # the loop references are not given away
    proc = run("check", "--path", path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    first = exercises.exercises()[0]
    assert f" 1/{len(exercises.exercises())} {first.name}" in proc.stdout
    assert "not written yet" in proc.stdout and "0 of" in proc.stdout
    assert f"Hint: {first.hint}" in proc.stdout


def test_start_never_overwrites_a_workbook(tmp_path):
    path = tmp_path / "workbook.py"
    path.write_text("# my work\n")
    proc = run("start", "--path", path)
    assert proc.returncode == 1 and "exists already" in proc.stderr
    assert path.read_text() == "# my work\n"


def test_the_twins_functions_pass_every_exercise(solved):
    lines = []
    done, total, failure = exercises.run_checks(solved, say=lines.append)
    assert failure is None and done == total
    assert sum("passed" in line for line in lines) == total


IN_EXERCISES = [m for m in bug_gallery.MISTAKES
                if m.name in {e.name for e in exercises.exercises()}]


def test_every_lesson_mistake_is_an_exercise_mistake():
    assert {m.name for m in IN_EXERCISES} == {m.name for m in bug_gallery.MISTAKES
                                              if not m.name.startswith("speedup.")}


@pytest.mark.parametrize("m", IN_EXERCISES, ids=lambda m: m.variant.__name__)
def test_each_gallery_mistake_fails_its_exercise(solved, m):
    """The mistake pasted into a workbook: the checker stops at the exercise
    whose check catches it (its own, but for a max-pool winner chosen in the
    forward pass, which shows in the backward), with the gallery's diagnosis."""
    exercises.replace_function(solved, m.target, bug_gallery.source(m))
    done, total, failure = exercises.run_checks(solved, say=lambda text: None)
    assert failure is not None, "not caught"
    exercise, message = failure
    expected = next(e for e in exercises.exercises()
                    if m.caught_by in {checks.name(c) for c in e.checks})
    assert exercise.name == expected.name and m.says in message, message
    assert done == expected.number - 1


def test_the_first_exercise_is_the_first_in_the_lesson_and_says_what_it_returns(tmp_path):
    """Exercise 1 is the first marked function of mnist_cnn_numpy.py, the
    exercises follow the file's order, and no signature has a parameter
    that exists only for speed."""
    found = exercises.exercises()
    lesson = [e for e in found if e.source.name == "mnist_cnn_numpy.py"]
    assert found[0] is lesson[0] and [e.node.lineno for e in lesson] == \
        sorted(e.node.lineno for e in lesson)
    path = tmp_path / "workbook.py"
    exercises.start(path)
    text = path.read_text()
    first = text[text.index(f"def {found[0].name}("):]
    assert "cache" in first[:first.index("TODO")]
    for word in ("in_place", "need_dx", "batch_size", "total", "batch_mask"):
        assert word not in text, word


def test_a_natural_first_answer_is_told_what_to_return(solved):
    exercises.replace_function(solved, "dense_forward",
                               "def dense_forward(x, kernel, bias):\n"
                               "    return x @ kernel + bias\n")
    _, _, (exercise, message) = exercises.run_checks(solved, say=lambda text: None)
    assert exercise.name == "dense_forward" and "(out, cache)" in message


def test_a_workbook_that_does_not_import_gets_one_message(solved):
    text = solved.read_text()
    solved.write_text(text.replace("def relu_forward(z):", "def relu_forward(z)", 1))
    proc = run("check", "--path", solved)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"Error: {solved}, line ") and "expected ':'" in proc.stderr
    solved.write_text(text + "\nvalue = undefined_name\n")
    proc = run("check", "--path", solved)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "does not import: NameError" in proc.stderr and "`value = undefined_name`" in proc.stderr


def test_an_exception_in_the_learners_code_names_the_line(solved):
    exercises.replace_function(solved, "dense_forward",
                               "def dense_forward(x, kernel, bias):\n"
                               "    return x @ kernel.T + bias, (x, kernel)\n")
    done, _, (exercise, message) = exercises.run_checks(solved, say=lambda text: None)
    assert exercise.name == "dense_forward" and done == 0
    assert "ValueError" in message and "`return x @ kernel.T + bias, (x, kernel)`" in message


def test_train_with_the_learners_functions(solved, tmp_path, real_data_dir):
    out = tmp_path / "out"
    proc = run("train", "--path", solved, "--train-limit", 300, "--epochs", 1, "--no-plots",
               "--out", out, MNIST_DATA_DIR=str(real_data_dir))
    assert proc.returncode == 0, proc.stderr
    assert "Training the NumPy twin with your" in proc.stdout
    report = json.loads((out / "numpy.json").read_text())
    assert report["epochs"] == 1 and 0.15 < report["test_accuracy"] <= 1


def test_train_refuses_an_unfinished_workbook(tmp_path):
    path = tmp_path / "workbook.py"
    exercises.start(path)
    proc = run("train", "--path", path, "--epochs", 1)
    assert proc.returncode == 1 and "0 of" in proc.stderr and "exercises.py check" in proc.stderr
