"""Practise: write the NumPy twin's layers yourself, checked as you go.

    python exercises.py start                  # write workbook.py, the bodies left to you
    python exercises.py check                  # check your functions in order
    python exercises.py check conv2d_backward  # one exercise (and the ones before it)
    python exercises.py train --epochs 1       # all pass? the real network, your functions
    python exercises.py list                   # the exercises, with what to read first

The workbook is made from the twin itself: every function marked
"# Exercise. Hint: ..." in mnist_cnn_numpy.py (then batchnorm.py and
helpers/common.py) becomes an exercise, numbered in the order the files
read, its docstring (shapes, formula, what it returns) kept and its body
replaced by a TODO, so the exercises and the twin cannot drift apart. The
checker runs the same named checks as the tests and the bug gallery
(helpers/checks.py): against the slow reference functions, finite
differences and Adam as the paper writes it, with the gallery's diagnoses in
a learner's words.

The solutions are the twin's own functions, under the same names in
mnist_cnn_numpy.py (batchnorm.py for batchnorm_backward, helpers/common.py
for glorot_uniform): read them after trying.
"""

import argparse
import ast
import importlib.util
import multiprocessing
import textwrap
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import batchnorm
import mnist_cnn_numpy as nt
from helpers import checks, common

REPO = Path(__file__).resolve().parent
# The files whose marked functions are exercises, in order, and the module
# that holds each while the twin runs.
SOURCES = {REPO / "mnist_cnn_numpy.py": nt, REPO / "batchnorm.py": batchnorm,
           REPO / "helpers" / "common.py": common}
DEFAULT_WORKBOOK = REPO / "workbook.py"
MARKER = "# Exercise. Hint: "

# What to read before writing each exercise.
READ = {
    "dense_forward": "the shape legend at the top of mnist_cnn_numpy.py, and "
                     "dense_naive (the definition, in loops)",
    "dense_backward": "dense_naive: which inputs each output touched",
    "relu_backward": "relu_forward, and Layer.activate_backward, which calls it",
    "softmax_cross_entropy": "softmax: why it subtracts each row's maximum",
    "softmax_cross_entropy_backward": "the docstring: why the gradient is just p - y, over N",
    "dropout_mask": "the docstring (inverted dropout), and Keras's Dropout(rate)",
    "dropout_backward": "dropout_forward",
    "flatten_forward": "flatten_backward, and why Keras's channels-last order matters to "
                       "its weights",
    "maxpool2d_forward": "maxpool2d_naive, and maxpool2d_backward's docstring on ties",
    "maxpool2d_backward": "maxpool2d_naive: the first maximum gets it all",
    "im2col": "im2col_naive, and conv2d_forward's docstring (the trick)",
    "col2im": "im2col, whose transpose it is, and conv2d_naive's dx",
    "conv2d_forward": "conv2d_naive: the definition, in loops",
    "conv2d_backward": "conv2d_naive, and the docstring's chain rule",
    "Adam.update": "the Adam class docstring: Keras's update rule, step by step",
    "batchnorm_backward": "batchnorm_forward, and batchnorm_backward's docstring: why "
                          "dx has three terms",
    "glorot_uniform": "common.initial_weights, and Keras's GlorotUniform",
}


@dataclass
class Exercise:
    number: int
    name: str            # "conv2d_backward", or "Adam.update" for a method
    hint: str
    source: Path         # the file whose function is the solution
    node: ast.FunctionDef

    @property
    def checks(self):
        return checks.checks_for(self.name)

    @property
    def module(self):
        return SOURCES[self.source]


def exercises():
    """The marked functions, numbered in the order the files read."""
    found = []
    for path in SOURCES:
        lines = path.read_text().splitlines()
        for qualname, node in _functions(ast.parse("\n".join(lines))):
            first = lines[node.body[0].end_lineno].strip()       # the line after the docstring
            if first.startswith(MARKER):
                found.append(Exercise(len(found) + 1, qualname, first[len(MARKER):],
                                      path, node))
    missing = [e.name for e in found if not e.checks or e.name not in READ]
    assert not missing, f"exercises without checks or reading: {missing}"
    return found


def markdown_table():
    """The exercises as a Markdown table (docs/practise.md's), from the same list."""
    lines = ["| # | write | in | read first |", "| --- | --- | --- | --- |"]
    for e in exercises():
        where = e.source.relative_to(REPO).as_posix()
        lines.append(f"| {e.number} | `{e.name}` | `{where}` | {READ[e.name]} |")
    return "\n".join(lines)


def _functions(tree):
    """(qualified name, node) of every top-level function and class method."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    yield f"{node.name}.{item.name}", item


# -----------------------------------------------------------------------------
# start: write the workbook
# -----------------------------------------------------------------------------

HEADER = '''"""Your workbook: the NumPy twin's layer functions, to write yourself.

Made by `python exercises.py start` from mnist_cnn_numpy.py, batchnorm.py
and helpers/common.py. Each exercise keeps its docstring (shapes, formula,
what it returns) and says what to read first; write its body where the TODO
is, then

    python exercises.py check        # checks your functions in order
    python exercises.py train        # when all pass: the real network, your functions

The other functions are the twin's, as they are; your functions may call
them (conv2d_forward calls im2col, for example). The solutions are the
functions of the same names in those files. Try first.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
'''


def workbook_text(solutions=False):
    """The workbook's source: the twin's math functions (no naive
    references), the Adam class, batch normalization's pair and
    glorot_uniform; each exercise's body replaced by a TODO unless
    solutions=True."""
    todo = {e.name: e for e in exercises()}
    wanted = _workbook_parts()
    parts = [HEADER]
    for path in SOURCES:
        lines = path.read_text().splitlines()
        for node in ast.parse("\n".join(lines)).body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or \
                    node.name not in wanted[path]:
                continue
            block = lines[node.lineno - 1:node.end_lineno]
            if not solutions:
                for qualname, f in sorted(_functions(ast.Module(body=[node], type_ignores=[])),
                                          key=lambda pair: -pair[1].lineno):
                    if qualname in todo:
                        start = f.body[0].end_lineno - node.lineno + 1   # after the docstring
                        end = f.end_lineno - node.lineno + 1
                        block[start:end] = _todo(todo[qualname], len(todo), f.col_offset + 4)
            parts.append("\n\n" + "\n".join(block) + "\n")
    return "".join(parts)


def _workbook_parts():
    """{file: the names of its top-level functions and classes that go in
    the workbook}: the lesson's math (under its banner "Model: the math")
    and Adam, batchnorm.py's functions, and glorot_uniform; never a naive
    reference."""
    lesson, bn_path, common_path = SOURCES
    text = lesson.read_text()
    first = text[:text.index("# Model: the math")].count("\n")
    last = text[:text.index("# Model: Keras-named layers")].count("\n")
    math = {node.name for node in ast.parse(text).body
            if isinstance(node, ast.FunctionDef) and first < node.lineno < last}
    bn = {node.name for node in ast.parse(bn_path.read_text()).body
          if isinstance(node, ast.FunctionDef)}
    wanted = {lesson: math | {"Adam"}, bn_path: bn, common_path: {"glorot_uniform"}}
    return {path: {n for n in names if not n.endswith("_naive")} for path, names in wanted.items()}


def _todo(exercise, total, indent):
    pad = " " * indent
    lines = [f"TODO: exercise {exercise.number} of {total}. Write this function.",
             f"Hint: {exercise.hint}"]
    lines += textwrap.wrap(f"Read first: {READ[exercise.name]}.", 72)
    return ([pad + "# " + line for line in lines]
            + [pad + 'raise NotImplementedError("not written yet")'])


def start(path, solutions=False):
    path = Path(path)
    if path.exists():
        raise common.UserError(f"{path} exists already; it is not overwritten (your work is "
                               f"in it). Check it with `python exercises.py check --path "
                               f"{path}`, or choose another --path.")
    if not path.parent.is_dir():
        raise common.UserError(f"Cannot write {path}: the folder {path.parent} does not exist "
                               "(make it first, or choose another --path).")
    try:
        with common.atomic_write(path) as f:
            f.write(workbook_text(solutions).encode())
    except OSError as e:
        raise common.UserError(f"Cannot write {path} ({e.strerror or e}).") from None
    print(f"Wrote {path}: {len(exercises())} exercises"
          + (" (with the twin's solutions)" if solutions else "") + ".")
    if solutions:
        print(f"Every exercise is solved; check it: python exercises.py check --path {path}")
    else:
        print(f"Write the first one ({exercises()[0].name}), then: python exercises.py check"
              + ("" if path.resolve() == DEFAULT_WORKBOOK else f" --path {path}"))
    return 0


# -----------------------------------------------------------------------------
# check: the learner's functions, in order
# -----------------------------------------------------------------------------

def read_workbook(path):
    """The workbook's text, compiled: a missing file, a folder, a file that
    is not UTF-8 text or a syntax error is one message (with the line). No
    line of it runs here."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise common.UserError(f"No workbook at {path}: make one with `python exercises.py "
                               "start`.") from None
    except IsADirectoryError:
        raise common.UserError(f"{path} is a folder, not a workbook: give the file with "
                               "--path.") from None
    except UnicodeDecodeError as e:
        raise common.UserError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8, "
                               "or start a new workbook with another --path.") from None
    except OSError as e:
        raise common.UserError(f"Cannot read {path} ({e.strerror or e}).") from None
    try:
        compile(source, str(path), "exec")
    except SyntaxError as e:
        line = (e.text or "").rstrip()
        raise common.UserError(f"{path}, line {e.lineno}: {e.msg}\n    {line}") from None
    except ValueError as e:                              # e.g. a NUL byte
        raise common.UserError(f"{path} cannot be read as Python ({e}).") from None
    return source


def load_workbook(path):
    """Import the workbook (this runs the learner's top-level code): an
    exception while importing becomes one message with the file and line."""
    read_workbook(path)
    spec = importlib.util.spec_from_file_location("workbook", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise common.UserError(f"{path} does not import: {_where(e, path)}") from None
    missing = [e.name for e in exercises() if _get(module, e.name) is None]
    if missing:
        raise common.UserError(f"{path} has no {missing[0]}: keep every exercise's name and "
                               "signature (start again with another --path to see them).")
    return module


def _get(module, qualname):
    owner = module
    for part in qualname.split("."):
        owner = getattr(owner, part, None)
    return owner


def _where(error, path):
    """'NameError: name 'x' is not defined (line 12: `return x`)' for the
    innermost place in the workbook that an exception came from."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if Path(f.filename).resolve() == Path(path).resolve()]
    text = f"{type(error).__name__}: {error}"
    if frames:
        text += f" (line {frames[-1].lineno}, in {frames[-1].name}: `{frames[-1].line}`)"
    return text


@contextmanager
def planted(module):
    """The workbook's exercise functions in place of the twin's, in the
    imported modules only (the files are never touched)."""
    saved = []
    for e in exercises():
        owner, *classes, name = [e.module] + e.name.split(".")
        for part in classes:
            owner = getattr(owner, part)
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, _get(module, e.name))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


TIME_LIMIT = 60            # seconds for one exercise's checks (the whole network: 5x)


def run_checks(path, only=None, say=print, time_limit=TIME_LIMIT):
    """Check the workbook's exercises in order (up to `only`, if given).

    Returns (done, total, failure): failure is None, or (exercise, message).
    Exercises before `only` must pass too: later ones use them. The
    learner's code runs in a child process, one per exercise, so that an
    endless loop, sys.exit or os._exit in it is reported (with the
    function's name) instead of hanging or ending the checker.
    """
    read_workbook(path)
    say(f"Checking {path}, exercise by exercise:")
    todo = exercises()
    if only:
        names = [e.name for e in todo]
        if only not in names:
            raise common.UserError(f"No exercise {only!r}; they are: {', '.join(names)}.")
        todo = todo[:names.index(only) + 1]
    total = len(exercises())
    for done, e in enumerate(todo):
        failure = _in_child(path, e.name, time_limit, f"checking {e.name}")
        if failure:
            return done, total, (e, failure)
        say(f"  {e.number:2d}/{total} {e.name:<32} passed")
    if not only:
        failure = _in_child(path, None, 5 * time_limit, "checking the whole network")
        if failure:
            return total, total, (None, failure)
    return len(todo), total, None


def _in_child(path, name, time_limit, doing):
    """Exercise `name`'s checks (None: the whole network's gradients) on the
    workbook, in a child process: the failure message, or None."""
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, str(path), name), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(time_limit):
            child.kill()
            return (f"{doing} did not finish in {time_limit} s: an endless loop in your code? "
                    "(If it is only slow: --time-limit gives it more seconds.)")
        kind, message = receive.recv()
    except EOFError:                                # the child ended without a word
        child.join(5)
        return (f"your code stopped the checker while {doing} (the process ended with "
                f"status {child.exitcode}: os._exit or a crash?): a function must return "
                "its result, never end the program")
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
    if kind == "error":
        raise common.UserError(message)
    return message


def _child(send, path, name):
    """In the child process: import the workbook, plant it, check; send
    ("done", failure or None) or ("error", message for the whole workbook)."""
    try:
        try:
            module = load_workbook(path)
        except SystemExit as e:
            raise common.UserError(f"{path} stops the checker when it is imported "
                                   f"(sys.exit({e.code!r}) at its top level?); remove that "
                                   "line.") from None
        with planted(module):
            if name is None:
                failure = _check_whole_network(path)
            else:
                failure = _check_one(next(e for e in exercises() if e.name == name), path)
        send.send(("done", failure))
    except common.UserError as e:
        send.send(("error", str(e)))
    except SystemExit as e:
        send.send(("done", f"your code called sys.exit({e.code!r}) ({_where(e, path)}): a "
                           "function must return its result, never end the program"))
    finally:
        send.close()


def _check_one(e, path):
    for check in e.checks:
        try:
            with np.errstate(all="ignore"):          # the check reports overflow itself
                check()
        except checks.CheckFailed as failure:
            return str(failure)
        except NotImplementedError as error:
            frames = traceback.extract_tb(error.__traceback__)
            where = frames[-1].name if frames else e.name
            if where == e.name.split(".")[-1]:
                return "not written yet"
            return (f"it needs {where}, which is not written yet (do the exercises in "
                    "order)")
        except ValueError as error:
            if "values to unpack" in str(error) and not _in_workbook(error, path):
                return (f"it returns something other than the check expects ({error}): its "
                        "docstring says what it returns (a pair (out, cache), for a forward "
                        "function)")
            return f"your code raised {_where(error, path)}"
        except Exception as error:
            return f"your code raised {_where(error, path)}"
    return None


def _in_workbook(error, path):
    """Did the exception come from the workbook's own lines?"""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve() == Path(path).resolve()


def _check_whole_network(path):
    try:
        checks.check_whole_model_gradients()
    except checks.CheckFailed as failure:
        return str(failure)
    except Exception as error:
        return f"the network raised {_where(error, path)}"
    return None


def check(path, only=None, time_limit=TIME_LIMIT):
    done, total, failure = run_checks(path, only, time_limit=time_limit)
    if failure is None:
        if only:
            print(f"\n{only} passes. {done} of {total} done.")
        else:
            print(f"\nAll {total} exercises pass, and your functions together give the whole "
                  "network's\ngradients (checked against finite differences, in training "
                  "mode).\nNow train the real network with them: python exercises.py train")
        return 0
    e, message = failure
    if e is None:
        print(f"\nEach function passes, but the network built from them does not:\n  {message}")
        return 1
    line = _line_of(path, e.name)
    todo = message == "not written yet"
    print(f"  {e.number:2d}/{total} {e.name:<32} {'not written yet' if todo else 'FAILED'}")
    if todo:
        print(f"\n{e.name} is not written yet ({path}, line {line}).")
        print(f"  Hint: {e.hint}")
        for text in textwrap.wrap(f"Read first: {READ[e.name]}.", 76):
            print(f"  {text}")
    else:
        print()
        for text in textwrap.wrap(message, 76):
            print(f"  {text}")
        print(f"\nFix {e.name} ({path}, line {line}), then check again.")
    print(f"{done} of {total} done.")
    return 1


def replace_function(path, qualname, source):
    """Put `source` (a def at column 0) in place of the workbook's function
    qualname, indented as that one is: how the tests paste a gallery
    mistake into a workbook."""
    lines = Path(path).read_text().splitlines()
    for name, node in _functions(ast.parse("\n".join(lines))):
        if name == qualname:
            new = textwrap.indent(textwrap.dedent(source), " " * node.col_offset).splitlines()
            lines[node.lineno - 1:node.end_lineno] = new
            Path(path).write_text("\n".join(lines) + "\n")
            return
    raise KeyError(qualname)


def _line_of(path, qualname):
    for name, node in _functions(ast.parse(Path(path).read_text())):
        if name == qualname:
            return node.lineno
    return "?"


# -----------------------------------------------------------------------------
# train: the real network with the learner's functions
# -----------------------------------------------------------------------------

def train(path, twin_args, time_limit=TIME_LIMIT):
    done, total, failure = run_checks(path, say=lambda text: None, time_limit=time_limit)
    if failure:
        raise common.UserError(f"{done} of {total} exercises pass so far: run `python "
                               "exercises.py check` and finish them first.")
    module = load_workbook(path)
    print(f"Training the NumPy twin with your {total} functions from {path}, on the "
          "lesson's own code path (speedup.py's drop-ins would run instead of some of them).")
    with planted(module):
        try:
            return common.main(nt.TWIN, ["--out", str(Path("results") / "workbook"),
                                         *twin_args])
        except SystemExit as e:
            if isinstance(e.code, int) and e.code in (0, 2) and not _in_workbook(e, path):
                raise                                  # --help, or a flag argparse refused
            raise common.UserError(f"Your code called sys.exit({e.code!r}) during training "
                                   f"({_where(e, path)}); nothing was written.") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=common.HelpWithDefaults,
                                epilog="train takes the twins' flags too (--epochs, --seed, ...); "
                                       "its results go to results/workbook/ unless --out says "
                                       "otherwise.")
    p.add_argument("command", choices=["start", "check", "train", "list"])
    p.add_argument("name", nargs="?", help="check: only this exercise (and those before it)")
    p.add_argument("--path", default=str(DEFAULT_WORKBOOK.relative_to(REPO))
                   if Path.cwd() == REPO else str(DEFAULT_WORKBOOK),
                   help="the workbook file")
    p.add_argument("--time-limit", type=common._positive(int), default=TIME_LIMIT,
                   metavar="SECONDS", help="check: the most one exercise's checks may take "
                                           "(the whole network: 5 times that)")
    p.add_argument("--with-solutions", action="store_true",
                   help="start: fill the workbook with the twin's own functions (for "
                        "teachers: a workbook that passes)")
    args, rest = p.parse_known_args(argv)
    if rest and args.command != "train":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "start":
        return start(args.path, args.with_solutions)
    if args.command == "check":
        return check(args.path, args.name, args.time_limit)
    if args.command == "train":
        return train(args.path, rest, args.time_limit)
    for e in exercises():
        print(f"{e.number:2d}. {e.name:<32} read first: {READ[e.name]}")
    return 0


if __name__ == "__main__":
    common.run(main)
