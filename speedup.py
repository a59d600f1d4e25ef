"""How frameworks get fast: the NumPy twin's machine, beside its lesson.

mnist_cnn_numpy.py is the network as math; it trains by itself. This module
makes the same arithmetic run faster, the way frameworks do, and changes no
number beyond float rounding: every piece below is a drop-in for one lesson
function or layer method, and a named check in helpers/checks.py
(check_fast_...) proves it equal to what it replaces, with a diagnosis, as
the lesson's own functions are checked. Read the lesson first.

    with speedup.switched_on(mnist_cnn_numpy):   # what mnist_cnn_numpy.main does
        ...                                      # loss_and_grads and logits are the fast ones

Switched on, two lesson functions are replaced (and put back afterwards):
loss_and_grads, which then cuts each batch into slices and runs the
lesson's own loss_and_grads on each slice, one slice per core, with fast
copies of the layers; and logits (evaluation), the same for inference.
MNIST_TWINS_FAST=0 leaves the lesson as it is.

The ideas, each explained where it is used:
1. Use every core (train_in_slices, _run). A matrix product spreads over the
   cores by itself, but NumPy's elementwise work (copying windows, ReLU,
   max-pooling) runs on one. So each core takes a slice of the batch
   through the whole network, and BLAS is held to one thread per slice.
   On threads, NumPy lets go of Python's lock (the GIL) inside its
   operations, so the threads run at once, but they still queue for the
   lock between operations; so where it can, each core after the first
   gets a forked helper process with its own Python (SliceProcesses, 5.).
2. Fuse what follows each other: a convolution, its ReLU and the 2 x 2
   max-pooling after it are one layer (conv_pool_forward), with im2col's
   rows in pooling-window order, so the pooling compares four contiguous
   blocks and the full feature map is never made; the ReLU runs after the
   pooling, on four times fewer numbers.
3. Do fewer multiplications: a 3 x 3 convolution over many channels, and
   its two gradients, by Winograd's F(2 x 2, 3 x 3) (winograd_tiles,
   winograd_corners, winograd_backward: 16 products for each pooling window
   instead of 36), no input gradient for the first layer (nothing uses it),
   outputs the pooling drops never computed.
4. Touch memory less: ReLU in place; max-pool winners as one byte each;
   whole arrays, not a number or a short row, in NumPy's elementwise calls
   (_bias_and_zeros);
   the first layer's cheap product pooled block by block while the block
   is in the CPU's cache (BLOCK); freed memory kept for the next batch
   (keep_freed_memory).
5. Keep the lock free: NumPy's @ holds the GIL for small results, np.dot
   does not (conv2d_backward, conv_pool_backward); better still, a process
   of its own for each slice (SliceProcesses).
What each buys, and where the time goes: docs/speed.md, from
benchmarks/benchmark.py and benchmarks/layers.py.
"""

import atexit
import copy
import ctypes
import functools
import mmap
import os
import signal
import struct
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

# Examples per slice (see slices), and the fewest worth a slice of their own.
SLICE = 64
MIN_SLICE = 16
_POOLS = {}
_BLAS = []


# =============================================================================
# Switching it on
# =============================================================================

@contextmanager
def switched_on(lesson):
    """The lesson module (mnist_cnn_numpy, or a learner's edited copy) with
    its loss_and_grads and logits replaced by the fast ones below."""
    if os.environ.get("MNIST_TWINS_FAST", "1") == "0":
        yield lesson
        return
    keep_freed_memory()
    saved = {name: getattr(lesson, name) for name in ("loss_and_grads", "logits", "forward")}
    lesson.lesson_functions = saved           # what the drop-ins call on
    lesson.loss_and_grads = lambda layers, x, y: train_in_slices(lesson, layers, x, y)
    lesson.logits = lambda model, x: logits_in_slices(lesson, model, x)
    try:
        yield lesson
    finally:
        close_processes()
        for name, function in saved.items():
            setattr(lesson, name, function)
        del lesson.lesson_functions


def cores():
    """The CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# =============================================================================
# 1. Every core: a batch in slices, one thread per core
# =============================================================================

def slices(n, threads, size=None):
    """Cut a batch of n into slices of about `size` examples (default SLICE,
    at least MIN_SLICE), as many for each of the `threads` threads.

    The size is measured, not reasoned: smaller slices keep more of their
    arrays in the CPU's caches, larger ones make each matrix product and
    NumPy call do more at a time. With the fused layers, a batch of 128 as
    two slices of 64 was as fast as any size tried, or faster
    (benchmarks/layers.py measures it; docs/speed.md has the figures).
    """
    count = threads * max(1, round(n / (threads * (size or SLICE))))
    cuts = _cuts(n, min(count, n // MIN_SLICE))
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])] or [slice(0, n)]


@functools.lru_cache(maxsize=64)
def _cuts(n, count):
    """count + 1 evenly spaced cuts of range(n), as Python ints; every batch
    asks for the same few, so each is worked out once."""
    return tuple(int(c) for c in np.linspace(0, n, count + 1).astype(int))


def training_slices(layers, n, threads):
    """The slices train_in_slices cuts a batch of n into. Batch
    normalization's slices wait for each other (SumOverSlices), so they must
    all run at once: then one slice per thread."""
    together = any(hasattr(layer, "moving_mean") for layer in layers)
    return slices(n, threads, size=-(-n // threads) if together else None)


def train_in_slices(lesson, layers, x, y, threads=None):
    """Drop-in for lesson.loss_and_grads(layers, x, y): the same loss, probs
    and gradients (left on each layer as dkernel, dbias, ...), to rounding.

    The loss is a mean over the batch's N examples, so the batch's gradient
    is the sum of the slices' gradients if each slice's counts as its share
    (n_slice / N) of the mean: a last layer, ShareOfBatch, scales each
    slice's gradient so. Dropout's random numbers for the whole batch are
    drawn here, before the batch is cut, and each slice gets its rows: the
    masks, and so the results, are the lesson's whatever the slices.
    """
    n, threads = len(x), threads or cores()
    helpers = processes_for(lesson, layers, x, threads)
    parts = slices(n, threads, size=-(-n // threads)) if helpers else \
        training_slices(layers, n, threads)
    if len(parts) == 1:
        return lesson_function(lesson, "loss_and_grads")(layers, x, y)
    copies, sums = fast_copies(layers, parts, training=True, x=x)
    for layers_s, rows in zip(copies, parts):
        layers_s.append(ShareOfBatch((rows.stop - rows.start) / n))
    loss_and_grads = lesson_function(lesson, "loss_and_grads")

    def work(layers_s, rows):
        try:
            return loss_and_grads(layers_s, x[rows], y[rows])
        except BaseException:
            for total in sums:                # do not leave the other slices waiting
                total.barrier.abort()
            raise

    if helpers and len(parts) == len(helpers.workers) + 1:
        results = helpers.run(work, copies, parts, x, y)
    else:
        results = _run(work, copies, parts, threads)
    for i, layer in enumerate(layers):
        for name in layer.params:             # the batch's gradient: the sum
            setattr(layer, "d" + name, _add_up([getattr(c[i], "d" + name) for c in copies]))
        for name in layer.state:              # the same in every slice's copy
            setattr(layer, name, getattr(copies[0][i], name))
    loss = sum(part_loss * (rows.stop - rows.start) / n
               for (part_loss, _), rows in zip(results, parts))
    return loss, np.concatenate([probs for _, probs in results])


def logits_in_slices(lesson, model, x, threads=None):
    """Drop-in for lesson.logits(model, x): inference on slices, on threads
    or with helper processes (as train_in_slices)."""
    threads = threads or cores()
    helpers = processes_for(lesson, model.layers, x, threads)
    parts = slices(len(x), threads, size=-(-len(x) // threads)) if helpers else \
        slices(len(x), threads)
    if len(parts) == 1:
        return lesson_function(lesson, "logits")(model, x)
    copies, _ = fast_copies(model.layers, parts, training=False)
    forward = lesson_function(lesson, "forward")
    x = x.astype(model.dtype, copy=False)
    if helpers and len(parts) == len(helpers.workers) + 1:      # a process's rows in pieces
        return np.concatenate(helpers.run(
            lambda layers_s, rows: in_pieces(forward, layers_s, x[rows]), copies, parts, x, None))
    return np.concatenate(_run(lambda layers_s, rows: forward(layers_s, x[rows]),
                               copies, parts, threads))


def in_pieces(forward, layers, x):
    """forward(layers, x) on pieces of x of about SLICE examples, one after
    the other: a slice larger than that leaves the CPU's caches."""
    return np.concatenate([forward(layers, x[rows]) for rows in slices(len(x), 1)])


def lesson_function(lesson, name):
    """The lesson's own function, also while switched_on has replaced it."""
    return getattr(lesson, "lesson_functions", {}).get(name) or getattr(lesson, name)


def fast_copies(layers, parts, training, x=None):
    """For each slice, shallow copies of the layers (they share the weight
    arrays, nothing is copied, but keep their own caches), each of a fast
    class where one is known (FAST, below). Returns (copies, the batch
    normalization sums shared between the slices)."""
    copies = [fast_network(layers) for _ in parts]
    sums = []
    for i, layer in enumerate(layers):
        if training and hasattr(layer, "rate"):              # Dropout: the batch's draws
            dtype = np.result_type(x.dtype, *[getattr(w, part) for w in layers
                                              for part in w.params][:1])
            uniform = layer.rng.random((len(x),) + layer.input_shape, dtype=dtype)
            for layers_s, rows in zip(copies, parts):
                layers_s[i].rng = DrawnAlready(uniform[rows])
        if training and hasattr(layer, "moving_mean"):       # BatchNormalization
            sums.append(SumOverSlices(len(parts)))
            for s, layers_s in enumerate(copies):
                layers_s[i].total = sums[-1].for_slice(s)
    return copies, sums


def fast_network(layers):
    """One slice's copies of the layers (see fast_copies)."""
    layers_s = [_fast_copy(layer) for layer in layers]
    if hasattr(layers_s[0], "first"):
        layers_s[0].first = True          # its input gradient is never needed
    for layer, after in zip(layers_s, layers_s[1:]):
        if hasattr(layer, "pooled") and getattr(after, "pool_size", None) == 2 \
                and hasattr(after, "in_conv") and layer.activation in (None, "relu"):
            layer.pooled = after.in_conv = True      # one layer does both: FastConv2D
    return layers_s


class DrawnAlready:
    """Stands in for a slice's random generator: it hands out the slice's
    rows of numbers drawn for the whole batch at once."""

    def __init__(self, numbers):
        self.numbers = numbers

    def random(self, shape, dtype=None):
        assert tuple(shape) == self.numbers.shape, (shape, self.numbers.shape)
        return self.numbers


class ShareOfBatch:
    """A last layer for one slice: the forward pass goes through unchanged;
    the gradient, which the loss gave as the mean over the slice's own
    examples, is scaled to the slice's share of the batch's mean."""
    params = state = ()
    activation = None

    def __init__(self, share):
        self.share = float(share)         # a Python float keeps float32 gradients float32

    def forward(self, x, training=False):
        return x

    def backward(self, dout):
        return dout * self.share


def _add_up(arrays):
    """sum(arrays), into one new array (sum() would make one per addition)."""
    total = arrays[0] + arrays[1]
    for more in arrays[2:]:
        total += more
    return total


def _run(work, copies, parts, threads):
    """work(layers, rows) for every slice, on `threads` threads (each takes
    the next slice when it is done with one), with BLAS held to one thread
    (threadpoolctl finds the BLAS library NumPy loaded). The threads get
    the caller's np.errstate (it does not pass to threads by itself)."""
    if not _BLAS:
        from threadpoolctl import ThreadpoolController   # needed only here
        _BLAS.append(ThreadpoolController())
    threads = min(threads, len(parts))
    if threads not in _POOLS:                 # started once, reused
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="slice")
    errors = np.geterr()

    def run(layers, rows):
        with np.errstate(**errors):
            return work(layers, rows)

    with _BLAS[0].limit(limits=1, user_api="blas"):
        return list(_POOLS[threads].map(run, copies, parts))


class SumOverSlices:
    """Sums over a whole batch whose slices run on separate threads: what
    batch normalization needs, since each example is normalised with the
    mean and variance of the *whole* batch (frameworks call this
    synchronised batch normalization).

    Each slice's thread calls for_slice(s)(its per-channel sums); all wait at
    a barrier until every slice has handed its part in, then each adds the
    parts up in the same order (so every thread gets the very same numbers)
    and waits again before the parts are replaced by the next sum.
    """

    def __init__(self, count):
        self.parts = [None] * count
        self.barrier = threading.Barrier(count)

    def for_slice(self, s):
        def total(part):
            self.parts[s] = part
            self.barrier.wait()               # every slice has handed in its part
            result = sum(self.parts[1:], self.parts[0])
            self.barrier.wait()               # every slice has read the parts
            return result
        return total


# =============================================================================
# 5. Processes: a slice on its own Python, where the lock costs time
# =============================================================================
# Threads share one Python interpreter, and its lock (the GIL) lets only one
# of them run Python at a time. NumPy lets go of the lock inside a large
# operation, but each of the hundreds of calls a slice makes (a layer's
# method, a reshape, a small product) needs it, and a thread that wants it
# back waits while the other thread holds it (docs/speed.md's layer tables
# time a whole step both ways, on threads and in processes). A forked copy
# of this process has its own interpreter and its own lock: it trains one
# slice of every batch while this process trains another. What it needs
# from here each step (the weights, its rows of the batch, their dropout
# draws) and what it hands back (its loss, probs and gradients) go through
# memory the two processes share; a byte on a pipe says "go" and "done". Used where it
# is safe: on systems with fork, for a network whose layers keep no running
# state (batch normalization's slices wait for each other: threads, above).

PROCESSES = hasattr(os, "fork")           # False: threads only (the check sets it)
_HELPERS = []                             # the network's SliceProcesses, if any


def processes_for(lesson, layers, x, threads):
    """The helpers (a SliceProcesses) that train all but one of the batch's
    slices, one per core after the first; None where threads do it."""
    if not PROCESSES or threads < 2 or len(x) < 2 * MIN_SLICE or _IN_HELPER \
            or any(layer.state for layer in layers) or not hasattr(layers[-1], "output_shape"):
        return None
    rows = -(-len(x) // threads)
    if _HELPERS and _HELPERS[0].fits(lesson, layers, x, rows, threads):
        return _HELPERS[0]
    close_processes()
    # Room for the larger of this batch's slices and an evaluation batch's (256).
    _HELPERS.append(SliceProcesses(lesson, layers, x, max(rows, -(-256 // threads)), threads))
    return _HELPERS[0]


def close_processes():
    """Stop the helper processes (also at exit: atexit)."""
    while _HELPERS:
        _HELPERS.pop().close()


atexit.register(close_processes)


_IN_HELPER = False                        # True in a helper process


def fork_helper(serve):
    """A forked copy of this process that runs serve(go, done) and ends (it
    never returns to the caller's code); returns its pid, the pipe end to
    write its "go" messages to and the one its "done" replies come on."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    with warnings.catch_warnings():               # Python 3.12 warns when threads exist
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.close(done_r)
            serve(go_r, done_w)
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(done_w)
    return pid, go_w, done_r


def _aligned(size):
    return -(-size // 64) * 64


class SliceProcesses:
    """threads - 1 forked copies of this process, each training one slice of
    every batch, for one network (its layers), through shared memory.

    Each helper's shared block, in the order both sides compute it: the
    weights (written here before every step), its rows of x and y and of
    every dropout layer's draws, then what it writes back: the loss, the
    probs and the gradients, one per weight."""

    def __init__(self, lesson, layers, x, rows, threads):
        self.lesson, self.layers, self.rows = lesson, layers, rows
        self.example, self.threads = x.shape[1:], threads
        self.weights = [(i, name, getattr(layer, name).shape, getattr(layer, name).dtype)
                        for i, layer in enumerate(layers) for name in layer.params]
        self.dropouts = [(i, layer.input_shape) for i, layer in enumerate(layers)
                         if hasattr(layer, "rate")]
        self.units = int(np.prod(layers[-1].output_shape))
        self.workers, self._views = [], {}
        for _ in range(threads - 1):
            self.workers.append(self._start())

    def fits(self, lesson, layers, x, rows, threads):
        """Whether these helpers serve this call (the same network and lesson,
        as many cores, rows and example shape within what was set aside)."""
        return (lesson is self.lesson and layers is self.layers and threads == self.threads
                and rows <= self.rows and x.shape[1:] == self.example
                and all(getattr(layers[i], name).shape == shape
                        for i, name, shape, _ in self.weights))

    def _layout(self, x_dtype, u_dtype, rows):
        """What one helper's shared memory holds, in order: (shape, type)."""
        weights = [(shape, dtype) for _, _, shape, dtype in self.weights]
        return (weights + [((rows,) + self.example, x_dtype), ((rows,), np.int64)]
                + [((rows,) + shape, u_dtype) for _, shape in self.dropouts]
                + [((1,), np.float64), ((rows, self.units), u_dtype)] + weights)

    def _block(self, memory, x_dtype, u_dtype, rows):
        """Views of one helper's shared memory: (weights, x, y, draws, loss,
        probs, grads). Each array starts where it would if every number took
        8 bytes, so the layout is the same for any float type. Made once for
        each memory, float types and rows, and kept: a step's work is the
        same shapes again, and making some thirty views each time, on both
        sides, was a tenth of a millisecond while the other side waited."""
        key = (id(memory), np.dtype(x_dtype), np.dtype(u_dtype), rows)
        if key not in self._views:
            if len(self._views) > 16:                 # (rows change only at an epoch's end)
                self._views.clear()
            self._views[key] = self._make_views(memory, x_dtype, u_dtype, rows)
        return self._views[key]

    def _make_views(self, memory, x_dtype, u_dtype, rows):
        views, at = [], 0
        for shape, dtype in self._layout(x_dtype, u_dtype, rows):
            count = int(np.prod(shape, dtype=np.int64))
            views.append(np.frombuffer(memory, dtype, count, at).reshape(shape))
            at += _aligned(8 * count)
        w, d = len(self.weights), len(self.dropouts)
        return (views[:w], views[w], views[w + 1], views[w + 2:w + 2 + d], views[w + 2 + d],
                views[w + 3 + d], views[w + 4 + d:])

    def _size(self):
        return sum(_aligned(8 * int(np.prod(shape, dtype=np.int64)))
                   for shape, _ in self._layout(np.float64, np.float64, self.rows))

    def _start(self):
        memory = mmap.mmap(-1, self._size())          # anonymous and shared: fork keeps it
        pid, go, done = fork_helper(lambda go, done: self._serve(memory, go, done))
        return {"pid": pid, "memory": memory, "go": go, "done": done}

    # --- this process's side ----------------------------------------------------

    def run(self, work, copies, parts, x, y):
        """work(copies[0], parts[0]) here, every other slice in a helper: in
        training, each slice's (loss, probs), the helpers' gradients left on
        their copies, as a thread's would be; at inference (y is None), each
        slice's logits."""
        training, n = y is not None, len(x)
        u_dtype = self._number_type(copies[0], x, training)
        errors = "".join(str(_ERRSTATE.index(np.geterr()[k])) for k in _ERRKEYS)
        busy, sent, gone = [], [], False
        try:
            for worker, layers_s, rows in zip(self.workers, copies[1:], parts[1:]):
                count = rows.stop - rows.start
                weights, xs, ys, draws, *_ = self._block(worker["memory"], x.dtype, u_dtype,
                                                         count)
                for view, (i, name, _, _) in zip(weights, self.weights):
                    view[...] = getattr(self.layers[i], name)
                xs[...] = x[rows]
                if training:
                    ys[...] = y[rows]
                    for view, (i, _) in zip(draws, self.dropouts):
                        view[...] = layers_s[i].rng.numbers
                message = struct.pack(_MESSAGE, count, n, x.dtype.char.encode(),
                                      np.dtype(u_dtype).char.encode(), errors.encode(),
                                      b"t" if training else b"i")
                try:
                    os.write(worker["go"], message)
                except OSError:                       # it is gone (killed, out of memory)
                    sent.append(False)
                    continue
                sent.append(True)
                busy.append(worker)
            if not _BLAS:
                from threadpoolctl import ThreadpoolController
                _BLAS.append(ThreadpoolController())
            with _BLAS[0].limit(limits=1, user_api="blas"):
                results = [work(copies[0], parts[0])]
            for worker, layers_s, rows, was_sent in zip(self.workers, copies[1:], parts[1:],
                                                        sent):
                ok = b""
                if was_sent:
                    ok = os.read(worker["done"], 1)       # b"": it is gone
                    busy.remove(worker)
                if ok != b"\0":                       # it failed: this process tries, and
                    gone = gone or ok == b""          # says why if it fails too
                    results.append(work(layers_s, rows))
                    continue
                *_, loss, probs, grads = self._block(worker["memory"], x.dtype, u_dtype,
                                                     rows.stop - rows.start)
                if not training:
                    results.append(probs.copy())          # the logits
                    continue
                for view, (i, name, _, _) in zip(grads, self.weights):
                    setattr(layers_s[i], "d" + name, view)
                results.append((probs.dtype.type(loss[0]), probs.copy()))
        except BaseException:
            if busy:                                  # a helper mid-step is of no more use
                close_processes()
            raise
        if gone:                                      # new helpers for the next batch
            close_processes()
        return results

    def _number_type(self, layers_s, x, training):
        """The float type of the dropout draws and of the probs or logits."""
        if training and self.dropouts:
            return layers_s[self.dropouts[0][0]].rng.numbers.dtype
        return np.result_type(x.dtype, *[dtype for *_, dtype in self.weights[:1]])

    def close(self):
        for worker in self.workers:
            for fd in (worker["go"], worker["done"]):
                os.close(fd)
            try:
                os.kill(worker["pid"], signal.SIGKILL)
                os.waitpid(worker["pid"], 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.workers, self._views = [], {}

    # --- the helper's side --------------------------------------------------------

    def _serve(self, memory, go, done):
        """The helper's life: wait for "go", train its slice, say "done"; end
        when this process's end of the pipe closes (it stopped, or ended)."""
        global _IN_HELPER
        _IN_HELPER = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process
        from threadpoolctl import ThreadpoolController
        ThreadpoolController().limit(limits=1, user_api="blas")   # one core: its own
        loss_and_grads = lesson_function(self.lesson, "loss_and_grads")
        forward = lesson_function(self.lesson, "forward")
        size = struct.calcsize(_MESSAGE)
        while True:
            message = b""
            while len(message) < size:
                more = os.read(go, size - len(message))
                if not more:
                    return                            # the main process is gone
                message += more
            count, n, x_char, u_char, errors, mode = struct.unpack(_MESSAGE, message)
            try:
                weights, xs, ys, draws, loss, probs, grads = self._block(
                    memory, np.dtype(x_char.decode()), np.dtype(u_char.decode()), count)
                layers_s = fast_network(self.layers)
                for view, (i, name, _, _) in zip(weights, self.weights):
                    setattr(layers_s[i], name, view)
                state = {k: _ERRSTATE[int(e)] for k, e in zip(_ERRKEYS, errors.decode())}
                if mode == b"i":                          # inference: the logits
                    with np.errstate(**state):
                        probs[...] = in_pieces(forward, layers_s, xs)
                else:
                    for view, (i, _) in zip(draws, self.dropouts):
                        layers_s[i].rng = DrawnAlready(view)
                    layers_s.append(ShareOfBatch(count / n))
                    with np.errstate(**state):
                        part_loss, part_probs = loss_and_grads(layers_s, xs, ys)
                    loss[0], probs[...] = part_loss, part_probs
                    for view, (i, name, _, _) in zip(grads, self.weights):
                        view[...] = getattr(layers_s[i], "d" + name)
                reply = b"\0"
            except Exception:                         # this process will say what it was
                reply = b"\1"
            try:
                os.write(done, reply)
            except OSError:
                return


# rows, batch size, x's and the draws' float types, np.errstate, training or inference
_MESSAGE = "<qq1s1s4s1s"
_ERRKEYS = ("divide", "over", "under", "invalid")
_ERRSTATE = ("ignore", "warn", "raise", "call", "print", "log")


def keep_freed_memory():
    """Memory reuse across batches. Every training step makes the same big
    arrays again (im2col matrices, feature maps and their gradients, tens of
    MB for a batch of 128) and drops them when the step ends. By default the
    C allocator NumPy uses (glibc's malloc) hands blocks this large back to
    the operating system when they are freed, so the next step gets fresh
    ones, which the OS zero-fills page by page on first touch. Raising two
    of glibc's thresholds (mallopt) makes it keep freed memory for the next
    batch instead. Only glibc (Linux) has mallopt; elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):             # another C library
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)   # blocks up to 32 MB come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)    # and free heap memory is kept (up to 1 GB)


# =============================================================================
# 2-4. Fast layers: each method a drop-in for the lesson layer's
# =============================================================================
# A slice's copy of a lesson layer gets a class made of the lesson's and one
# of these (FastConv2D + Conv2D, ...): its methods replace the lesson's, and
# whatever they do not replace is the lesson's. A layer the machine does not
# know (one a learner added) runs as the lesson wrote it.

class InPlaceReLU:
    """Drop-in for Layer.activate / activate_backward: ReLU overwrites the
    array it is given instead of making a new one. Safe because that array
    is fresh and read by nothing else: forward, the layer's own product;
    backward, the next layer's new input gradient."""
    first = False

    def activate(self, out):
        if self.activation == "relu":
            self.relu_cache = np.maximum(out, 0, out=out)
        return out

    def activate_backward(self, dout):
        if self.activation == "relu":
            return np.multiply(dout, self.relu_cache > 0, out=dout)
        return dout


class FastConv2D(InPlaceReLU):
    """Drop-in for Conv2D.forward / backward: the fast conv2d pair below, no
    dx for the network's first layer (first: nothing before it learns).
    pooled: a MaxPooling2D(2) follows, and this layer does both, ReLU and
    pooling included (conv_pool_forward); the pooling layer then passes
    its input through."""
    pooled = False

    def forward(self, x, training=False):
        if self.pooled:
            out, self.cache = conv_pool_forward(x, self.kernel, self.bias,
                                                self.activation == "relu", training)
            self.relu_cache = out                 # (what the checks read of the kinks)
            return out
        out, self.cache = conv2d_forward(x, self.kernel, self.bias)
        return self.activate(out)

    def backward(self, dout):
        if self.pooled:
            dx, self.dkernel, self.dbias = conv_pool_backward(dout, self.cache,
                                                              need_dx=not self.first)
            return dx
        dx, self.dkernel, self.dbias = conv2d_backward(self.activate_backward(dout),
                                                       self.cache, need_dx=not self.first)
        return dx


class FastDense(InPlaceReLU):
    """Dense with its ReLU in place (its products are already one BLAS call)."""


class FastMaxPooling2D:
    """Drop-in for MaxPooling2D.forward / backward, for 2 x 2 windows (the
    fast pair below). in_conv: the Conv2D before it pools too (FastConv2D),
    so this layer passes everything through."""
    in_conv = False

    def forward(self, x, training=False):
        if self.in_conv:
            return x
        if self.pool_size != 2:
            return super().forward(x, training)
        out, self.cache = maxpool2d_forward(x)
        return out

    def backward(self, dout):
        if self.in_conv:
            return dout
        if self.pool_size != 2:
            return super().backward(dout)
        return maxpool2d_backward(dout, self.cache)


class BatchNormOverSlices:
    """Drop-in for BatchNormalization.forward / backward in training, when
    the batch is cut into slices: the sums over the batch come from all the
    slices (total, a SumOverSlices), so that every slice normalises with the
    whole batch's statistics. Each slice's copy computes the same new moving
    statistics; train_in_slices keeps the first slice's."""

    def forward(self, x, training=False):
        if not training:
            return super().forward(x, training)
        out, cache, mean, var = batchnorm_forward(x, self.gamma, self.beta, self.epsilon,
                                                  self.total)
        self.cache = cache, None, None
        self.update_moving_statistics(mean, var)
        return out

    def backward(self, dout):
        if self.cache[0] is None:
            return super().backward(dout)
        dx, self.dgamma, self.dbeta = batchnorm_backward(dout, self.cache[0])
        return dx


FAST = {"Conv2D": FastConv2D, "Dense": FastDense, "MaxPooling2D": FastMaxPooling2D,
        "BatchNormalization": BatchNormOverSlices}
_CLASSES = {}


def _fast_copy(layer):
    copied, cls = copy.copy(layer), type(layer)
    if cls.__name__ in FAST:
        if cls not in _CLASSES:
            _CLASSES[cls] = type("Fast" + cls.__name__, (FAST[cls.__name__], cls), {})
        copied.__class__ = _CLASSES[cls]
    return copied


# =============================================================================
# Fast functions: each a drop-in for the lesson function of its name
# =============================================================================

def im2col_with_ones(x, K):
    """The lesson's im2col(x, K) with a column of ones after it: (N*H'*W',
    K*K*C + 1). The ones are the bias's input: with the bias as the last
    row of the weights, cols @ weights = window . kernel + 1 * bias, with no
    separate pass over the output to add it. cols is filled in place: no
    other copy of the windows is made.
    """
    N, H, W, C = x.shape
    Ho, Wo = H - K + 1, W - K + 1
    cols = np.empty((N, Ho, Wo, K * K * C + 1), x.dtype)
    cols[..., -1] = 1
    if C == 1:
        # One input channel (the first layer): a row is only K*K numbers.
        # Copying the K*K shifted images x[:, a:a+H', b:b+W'] one at a time,
        # each into its column, moves whole images at a time; the window
        # copy below would move K numbers at a time.
        for a in range(K):
            for b in range(K):
                cols[..., a * K + b] = x[:, a:a + Ho, b:b + Wo, 0]
    else:
        windows = sliding_window_view(x, (K, K), axis=(1, 2))   # (N, H', W', C, K, K)
        windows = windows.transpose(0, 1, 2, 4, 5, 3)            # (N, H', W', K, K, C)
        cols[..., :-1].reshape(N, Ho, Wo, K, K, C)[...] = windows   # a view of cols
    return cols.reshape(N * Ho * Wo, K * K * C + 1)


def conv2d_forward(x, kernel, bias):
    """Drop-in for the lesson's conv2d_forward: the bias rides in the matrix
    product (im2col_with_ones), and the cache keeps x, not cols: cols holds
    each pixel up to K*K = 9 times (conv2's is 6.5 times its x), and by the
    backward pass a kept cols has left the CPU's caches and must come back
    from memory. Copying it again from x is faster (recomputing instead of
    storing, as frameworks do to save memory)."""
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    cols = im2col_with_ones(x, K)                                         # (N*H'*W', K*K*C + 1)
    weights = np.concatenate([kernel.reshape(K * K * C, F), bias[None]])  # (K*K*C + 1, F)
    return (cols @ weights).reshape(N, H - K + 1, W - K + 1, F), (x, kernel)


def conv2d_backward(dout, cache, need_dx=True):
    """Drop-in for the lesson's conv2d_backward (need_dx=False: dx is None).

    dkernel and dbias together: the last row of cols.T @ dout2d is dbias,
    because its column of cols holds ones. np.dot, not @: for a product whose
    result is small ((K*K*C + 1) x F, e.g. 10 x 32) NumPy's @ keeps Python's
    lock (the GIL) while it works, however long the sums; np.dot lets go of
    it, so the other slice's thread keeps running. col2im, one kernel offset
    (a, b) at a time, as nine matrix products dout2d @ kernel[a, b].T, each
    a ready block of dx: faster than one big dcols whose pieces are
    scattered in memory.
    """
    x, kernel = cache
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    Ho, Wo = H - K + 1, W - K + 1
    dout2d = dout.reshape(-1, F)                              # (N*H'*W', F)
    dweights = np.dot(im2col_with_ones(x, K).T, dout2d)       # (K*K*C + 1, F)
    dkernel, dbias = dweights[:-1].reshape(K, K, C, F), dweights[-1]
    if not need_dx:
        return None, dkernel, dbias
    kernel_t = np.ascontiguousarray(kernel.transpose(0, 1, 3, 2))  # (K, K, F, C)
    dx = np.zeros(x.shape, dtype=dout.dtype)                  # (N, H, W, C)
    for a in range(K):
        for b in range(K):
            dx[:, a:a + Ho, b:b + Wo, :] += (dout2d @ kernel_t[a, b]).reshape(N, Ho, Wo, C)
    return dx, dkernel, dbias


CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))     # a 2 x 2 window's positions, reading order


# Pooled outputs per block when the first layer's product is done in blocks
# (conv_pool_forward): half a megabyte of corner outputs in float32, which stays in
# a core's L2 cache (1 or 2 MB on the machines docs/speed.md names; 512 to 4096
# were measured, and sizes from 1024 up were as fast).
BLOCK = 1024


def conv_pool_forward(x, kernel, bias, relu, training=True):
    """Drop-in for the lesson's Conv2D (with its ReLU, if relu) and the
    MaxPooling2D(2) after it, in one: conv2d_forward, relu_forward and
    maxpool2d_forward.

    x: (N, H, W, C) -> out: (N, H'', W'', F), H'' = (H - K + 1) // 2.
    The trick: im2col with its rows in pooling-window order. All windows'
    top-left outputs come first, then all top-right ones, and so on, so the
    one matrix product gives the four corners of every pooling window as
    four contiguous blocks, and the max-pool is an elementwise maximum of
    four contiguous arrays, not of four strided views of a big feature map
    (which never exists). Outputs the pooling drops (an odd last row or
    column) are not computed at all. Pooling before the ReLU and the bias
    (the same for all four corners) changes no number: ReLU keeps the order
    of numbers, so relu(max(a, b, c, d)) = max(relu(a), ..., relu(d)), on
    an array four times smaller. Ties go to the first corner, as in the
    lesson: the product computes equal windows' outputs equally (Winograd's
    too, except windows equal only along a diagonal: see below).

    A 3 x 3 kernel over many channels (the second layer) is done by
    Winograd's algorithm (below) instead of im2col: 16 products for each
    window's four corners instead of 36, block by block of images, each
    block's corners pooled while they are in the cache.

    The first layer (one input channel) does its product in blocks of
    BLOCK pooling windows, each pooled while it is still in the CPU's
    cache (cache blocking): its product is cheap (sums of K*K = 9 terms)
    and makes four times the numbers it keeps, so done whole it waits on
    memory, writing the four corners out and reading them back. An im2col
    product with long sums (288 terms, 3 x 3 x 32) was faster whole.
    """
    N, H, W, C = x.shape
    K, _, _, F = kernel.shape
    T, S = (H - K + 1) // 2, (W - K + 1) // 2                 # pooled height and width
    P = N * T * S
    out = np.empty((P, F), np.result_type(x, kernel))
    winner = np.empty((P, F), np.uint8) if training else None   # which corner won: 0..3
    if C == 1:
        # One input channel (the first layer): tap-major cols, one shifted
        # image per row, that the product reads transposed (shifted_images).
        cols = shifted_images(x, K, T, S)                     # (u, v, a b, window)
        after = _bias_and_zeros(bias, min(P, BLOCK), out.dtype, relu)
        # (given out: the product would lay its corners out as cols's strides go)
        corners = np.empty((2, 2, min(P, BLOCK), F), out.dtype)
        for start in range(0, P, BLOCK):
            rows = slice(start, min(P, start + BLOCK))
            block = corners[:, :, :rows.stop - start]
            np.matmul(cols[..., rows].swapaxes(2, 3), kernel.reshape(K * K, F), out=block)
            _pool_corners(block.reshape(4, -1, F), out[rows],
                          None if winner is None else winner[rows], *after)
    elif K == 3:
        # Winograd (below): the tiles' transforms, kept for the backward pass
        # (the kernel's gradient), and the four corners of each block of
        # windows, pooled while they are in the cache.
        cols = np.empty((4, 4, N, T, S, C), x.dtype)          # B^T d B of every tile
        U = winograd_kernel(kernel)
        blocks = list(_image_blocks(N, T * S))
        after = _bias_and_zeros(bias, blocks[0][1].stop, out.dtype, relu)
        for images, rows in blocks:
            tiles = cols[:, :, images]
            winograd_tiles(x[images], tiles)
            corners = winograd_corners(np.matmul(tiles.reshape(16, -1, C), U))
            _pool_corners(corners, out[rows], None if winner is None else winner[rows],
                          *after)
    else:
        cols = np.empty((4, N, T, S, K * K * C), x.dtype)      # (corner, window, a b c)
        windows = sliding_window_view(x, (K, K), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
        for k, (u, v) in enumerate(CORNERS):                  # (N, H', W', K, K, C) views
            cols[k].reshape(N, T, S, K, K, C)[...] = windows[:, u:u + 2 * T:2, v:v + 2 * S:2]
        corners = (cols.reshape(4 * P, -1) @ kernel.reshape(K * K * C, F)).reshape(4, P, F)
        _pool_corners(corners, out, winner, *_bias_and_zeros(bias, P, out.dtype, relu))
    return out.reshape(N, T, S, F), (x.shape, kernel, cols, winner, out if relu else None)


def shifted_images(x, K, T, S):
    """The first layer's cols, tap-major: for each pooling window's corner
    (u, v) and each tap (a, b) of the K x K kernel, the image x (N, H, W, 1)
    read from row u + a and column v + b, every other pixel, T x S of them:
    (2, 2, K*K, N*T*S), a view.

    Corners share images: the top-left corner's tap (1, 0) reads what the
    bottom-left corner's tap (0, 0) reads. So only 2 (K + 1) K of the
    4 K K images are made (24 of 36 for a 3 x 3 kernel), stored as
    images[v, r, b] (r = u + a), and each corner's K*K rows are K
    consecutive r's of its v: rows u K ... u K + K*K - 1 of images[v],
    evenly spaced, one view. Copying an image (T rows of S every-other
    pixels) is all loop and no arithmetic, so a third fewer is a third less
    time (measured, 64 images: 0.111 against 0.167 ms)."""
    N, dtype = x.shape[0], x.dtype
    P = N * T * S
    images = np.empty((2, K + 1, K, N, T, S), dtype)
    for v in range(2):
        for r in range(K + 1):
            for b in range(K):
                images[v, r, b] = x[:, r:r + 2 * T:2, v + b:v + b + 2 * S:2, 0]
    step = images.strides[-1] * P                             # one image
    return as_strided(
        images, shape=(2, 2, K * K, P), strides=(K * step, (K + 1) * K * step, step,
                                                  images.strides[-1]), writeable=False)


def _bias_and_zeros(bias, rows, dtype, relu):
    """The bias (F,) written out down `rows` rows, and as many zeros if relu
    (else None): what _pool_corners adds and compares with, each a whole
    array the shape of its output block. NumPy does a + row (broadcasting
    a row to every row of a matrix) one short row at a time, and
    np.maximum(a, 0) (a number, not an array) in a loop that takes one
    number at a time; with whole arrays each is one fast pass over memory
    (the same numbers: measured 3 and 5 times faster, for 32 filters)."""
    F = bias.shape[0]
    return (np.broadcast_to(bias.astype(dtype, copy=False), (rows, F)).copy(),
            np.zeros((rows, F), dtype) if relu else None)


def _pool_corners(corners, out, winner, bias_rows, zeros):
    """out = relu(max of the four corners (4, P, F) + bias) (no ReLU if
    zeros is None), and, if winner is given, which corner won (0..3, ties to
    the first), into winner. bias_rows and zeros: _bias_and_zeros's, at
    least P rows."""
    tl, tr, bl, br = corners
    top, bottom = np.maximum(tl, tr), np.maximum(bl, br)
    if winner is not None:          # which corner won matters only to a backward pass
        down = bottom > top                                   # ties: the first, as maxpool2d
        right = (down & (br > bl)) | (~down & (tr > tl))
        np.multiply(down.view(np.uint8), 2, out=winner)       # bools viewed as bytes
        winner += right.view(np.uint8)
    np.maximum(top, bottom, out=out)
    out += bias_rows[:len(out)]
    if zeros is not None:
        np.maximum(out, zeros[:len(out)], out=out)


def conv_pool_backward(dout, cache, need_dx=True):
    """Drop-in for the backward passes of conv_pool_forward's layers:
    maxpool2d_backward, relu_backward and conv2d_backward, in one.
    dout: (N, H'', W'', F) -> dx (None if not need_dx), dkernel, dbias.
    Each output's gradient goes to its window's winning corner block (four
    contiguous arrays). A layer done by Winograd's algorithm gets dx and
    dkernel from it, run backward (winograd_backward); otherwise one product
    gives dkernel from the corners' cols, and dx is every window's share
    (one product), added back onto the image corner by corner (col2im).
    The first layer (no dx, one input channel) works in blocks, as its
    forward pass does, and adds up the blocks' dkernel and dbias."""
    x_shape, kernel, cols, winner, out = cache
    N, H, W, C = x_shape
    K, _, _, F = kernel.shape
    T, S = (H - K + 1) // 2, (W - K + 1) // 2
    P = N * T * S
    dout = dout.reshape(P, F)
    if C == 1 and not need_dx:                                # tap-major cols (forward)
        dkernel, dbias = np.zeros((K * K, F), dout.dtype), np.zeros(F, dout.dtype)
        ones = np.ones(min(P, BLOCK), dout.dtype)
        for start in range(0, P, BLOCK):
            rows = slice(start, min(P, start + BLOCK))
            dpool, droutes = _route(dout[rows], winner[rows], None if out is None else out[rows])
            dkernel += np.matmul(cols[..., rows], droutes.reshape(2, 2, -1, F)).sum(axis=(0, 1))
            dbias += _column_sums(dpool, ones)
        return None, dkernel.reshape(K, K, C, F), dbias
    dpool, droutes = _route(dout, winner, out)
    if K == 3 and C > 1:                                      # Winograd's tiles (forward)
        dx, dkernel = winograd_backward(droutes, cols, kernel, x_shape, need_dx)
        return dx, dkernel, _column_sums(dpool)
    if C == 1:
        dkernel = sum(np.dot(cols[u, v], droutes[k]) for k, (u, v) in enumerate(CORNERS))
    else:                                     # np.dot, not @: GIL-free (conv2d_backward)
        dkernel = np.dot(cols.reshape(4 * P, -1).T, droutes.reshape(4 * P, F))
    dkernel = dkernel.reshape(K, K, C, F)
    dbias = _column_sums(dpool)
    if not need_dx:
        return None, dkernel, dbias
    dcols = (droutes.reshape(4 * P, F) @ kernel.reshape(K * K * C, F).T).reshape(
        4, N, T, S, K, K, C)
    dx = np.zeros(x_shape, dout.dtype)
    for k, (u, v) in enumerate(CORNERS):
        for a in range(K):
            for b in range(K):
                dx[:, u + a:u + a + 2 * T:2, v + b:v + b + 2 * S:2, :] += dcols[k, :, :, :, a, b, :]
    return dx, dkernel, dbias


def _column_sums(a, ones=None):
    """a.sum(axis=0) for a matrix a (P, F), as a product with a vector of
    ones (ones: at least P of them, or None to make them). NumPy's sum down
    the columns of a row-major matrix adds one short row at a time; the
    product is one BLAS call over the whole matrix, about 6 times faster
    for a block of the first layer (1024 x 32, measured). The same sums,
    added in another order."""
    if ones is None:
        ones = np.ones(len(a), a.dtype)
    return ones[:len(a)] @ a


def _route(dout, winner, out):
    """The pooled gradient dout (P, F), through the ReLU (where out > 0, if
    out is given), and its four corners' (4, P, F): each gradient at the
    corner that won its window, zero at the other three."""
    dpool = dout if out is None else dout * (out > 0)
    droutes = np.empty((4,) + dpool.shape, dpool.dtype)
    for k in range(4):
        np.multiply(dpool, winner == k, out=droutes[k])
    return dpool, droutes


# Winograd's minimal filtering F(2 x 2, 3 x 3), as cuDNN and oneDNN use it: the 2 x 2
# outputs of a 3 x 3 convolution over one 4 x 4 input tile d take 16 multiplications
# instead of 36, Y = A^T [(G g G^T) * (B^T d B)] A (Lavin and Gray, 2015), with
#     B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
#     G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
#     A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
# Its 2 x 2 output tile is exactly a 2 x 2 pooling window, and tiles start every 2
# pixels, as the windows do. With many channels, each of the 16 products "*" is a
# matrix product over the channels: (tiles, C) @ (C, F), the transformed image
# (B^T d B, winograd_tiles) times the transformed kernel (G g G^T, winograd_kernel);
# A^T ... A (winograd_corners) then gives the four corners of every window. The
# backward pass runs the same steps in reverse (winograd_backward): the kernel's
# gradient from the kept tiles, the image's from the transformed kernel.
#
# Its outputs differ from the direct sum's by rounding, so it could decide the
# winner of a window whose corners tie (which the lesson gives to the first). The
# transforms only add and subtract, and two corners whose windows are equal (a flat
# part of the image, or one that does not change along a row or a column) come out
# exactly equal: the differences that tell them apart are exact zeros, and the
# sums that make them add the same numbers in the same order. Only corners equal
# along a diagonal (the top-left and bottom-right windows the same numbers, but not
# the rest of the tile) may tie by rounding either way.
WINOGRAD_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])
WINOGRAD_K16 = np.kron(WINOGRAD_G, WINOGRAD_G)            # (16, 9): g (3x3) -> G g G^T

# Pooled windows per block of the Winograd layer: its 16 products for a block
# (16 x 400 x 64 float32 numbers for the second layer, 1.6 MB) are made into
# corners while they are still in the caches. Measured, 50 to 1600 windows (2 to
# 64 images): 400 was the fastest, forward and backward, with both kernel settings.
WINOGRAD_BLOCK = 400


def _image_blocks(N, windows):
    """The blocks of WINOGRAD_BLOCK pooled windows (at least one image each)
    of N images with `windows` windows each: (images, their windows' rows)."""
    step = max(1, WINOGRAD_BLOCK // windows)
    for n in range(0, N, step):
        end = min(N, n + step)
        yield slice(n, end), slice(n * windows, end * windows)


def winograd_kernel(kernel):
    """G g G^T for each (channel, filter) of a 3 x 3 kernel (3, 3, C, F): (16, C, F)."""
    _, _, C, F = kernel.shape
    return (WINOGRAD_K16.astype(kernel.dtype) @ kernel.reshape(9, C * F)).reshape(16, C, F)


def _every_other(a, axis, start, count):
    """a's positions start, start + 2, ... (count of them) along axis: a view."""
    where = [slice(None)] * a.ndim
    where[axis] = slice(start, start + 2 * count, 2)
    return a[tuple(where)]


def _transform(source, parts, axis, count):
    """B^T along one axis: parts[i] = row i of B^T applied to every 4 positions
    2t, ..., 2t + 3 (t < count) of source along axis."""
    p0, p1, p2, p3 = (_every_other(source, axis, r, count) for r in range(4))
    np.subtract(p0, p2, out=parts[0])
    np.add(p1, p2, out=parts[1])
    np.subtract(p2, p1, out=parts[2])
    np.subtract(p1, p3, out=parts[3])


def _transform_back(parts, out, axis, count):
    """The transpose of _transform: out (the positions along axis that no tile
    covers set to zero) = every tile's four parts, added back where they came from."""
    p0, p1, p2, p3 = parts
    where = [slice(None)] * out.ndim
    where[axis] = slice(2 * count, None)
    out[tuple(where)] = 0
    _every_other(out, axis, 0, count)[...] = p0             # B^T's columns: (1, 0, 0, 0),
    second = _every_other(out, axis, 1, count)              # (0, 1, -1, 1),
    np.subtract(p1, p2, out=second)
    second += p3
    third = np.add(p1, p2)                                  # (-1, 1, 1, 0),
    third -= p0
    _every_other(out, axis, 2, count)[...] += third
    _every_other(out, axis, 3, count)[...] -= p3            # (0, 0, 0, -1)


def winograd_tiles(x, tiles):
    """B^T d B for every 4 x 4 tile d of x (N, H, W, C), tiles every 2 pixels,
    into tiles (4, 4, N, T, S, C): columns first, then rows.

    Why that order: every other column of x is a run of only C numbers in
    memory, every other row a run of a whole row's W * C, and NumPy's loops
    pay for each run. Columns first takes the short runs over x itself;
    the rows then take long runs (S * C) over the larger result, four
    tiles deep. Measured on a block of 16 images of the second layer: 141
    microseconds, against 153 rows first (and 191 against 201 for the
    backward pass's transposes, winograd_backward)."""
    N, H, _, C = x.shape
    T, S = tiles.shape[3], tiles.shape[4]
    cols = np.empty((4, N, H, S, C), x.dtype)                 # (j, image, row, tile, channel)
    _transform(x, cols, 2, S)
    _transform(cols, tiles, 2, T)


def winograd_corners(products):
    """A^T M A: the 16 products (16, P, F) of P tiles -> their 2 x 2 outputs,
    the corners (4, P, F) in CORNERS order. A^T's rows: (1, 1, 1, 0), (0, 1, -1, -1)."""
    _, P, F = products.shape
    m = products.reshape(4, 4, P, F)
    half = np.empty((4, 2, P, F), m.dtype)                   # (j, output row)
    np.add(m[0], m[1], out=half[:, 0])
    half[:, 0] += m[2]
    np.subtract(m[1], m[2], out=half[:, 1])
    half[:, 1] -= m[3]
    corners = np.empty((2, 2, P, F), m.dtype)                # (output row, output column)
    np.add(half[0], half[1], out=corners[:, 0])
    corners[:, 0] += half[2]
    np.subtract(half[1], half[2], out=corners[:, 1])
    corners[:, 1] -= half[3]
    return corners.reshape(4, P, F)


def _corners_back(droutes):
    """The transpose of winograd_corners: the corners' gradients (4, P, F) ->
    the 16 products' (16, P, F), A dY A^T."""
    _, P, F = droutes.shape
    dy = droutes.reshape(2, 2, P, F)
    half = np.empty((4, 2, P, F), dy.dtype)                  # (j, output row)
    half[0] = dy[:, 0]
    np.add(dy[:, 0], dy[:, 1], out=half[1])
    np.subtract(dy[:, 0], dy[:, 1], out=half[2])
    np.negative(dy[:, 1], out=half[3])
    dm = np.empty((4, 4, P, F), dy.dtype)
    dm[0] = half[:, 0]
    np.add(half[:, 0], half[:, 1], out=dm[1])
    np.subtract(half[:, 0], half[:, 1], out=dm[2])
    np.negative(half[:, 1], out=dm[3])
    return dm.reshape(16, P, F)


def winograd_backward(droutes, tiles, kernel, x_shape, need_dx=True):
    """The gradients of conv_pool_forward's Winograd layer, from its corners'
    (4, P, F) and the tiles its forward pass kept: dx (None if not need_dx)
    and dkernel. Block by block of images, as forward: the 16 products'
    gradients dM (A dY A^T), then dU = tiles^T @ dM (16 products over the
    block's tiles, added up over the blocks) and dV = dM @ U^T, which the
    transposes of the tile transforms add back onto the image. At the end,
    dkernel = G^T dU G. 16 products each way, where im2col's would be 2.25
    times the size."""
    N, H, W, C = x_shape
    F = kernel.shape[3]
    T, S = tiles.shape[3], tiles.shape[4]
    dtype = droutes.dtype
    # (16, F, C), copied into its own order: with the SkylakeX kernels a product
    # with a transposed view of it took 0.66 ms for 64 images, with the copy 0.47
    # (the Haswell kernels: about the same either way), and the numbers are the same.
    U_t = np.ascontiguousarray(winograd_kernel(kernel).transpose(0, 2, 1))
    dU = np.zeros((16, C, F), np.result_type(tiles, dtype))
    dx = np.empty(x_shape, dtype) if need_dx else None
    for images, rows in _image_blocks(N, T * S):
        dm = _corners_back(droutes[:, rows])
        dU += np.matmul(tiles[:, :, images].reshape(16, -1, C).transpose(0, 2, 1), dm)
        if need_dx:
            dv = np.matmul(dm, U_t).reshape(4, 4, -1, T, S, C)
            dcols = np.empty((4, dv.shape[2], H, S, C), dtype)  # winograd_tiles, backward:
            _transform_back(dv, dcols, 2, T)                    # rows, then columns
            _transform_back(dcols, dx[images], 2, S)
    dkernel = WINOGRAD_K16.T.astype(dU.dtype) @ dU.reshape(16, C * F)
    return dx, dkernel.reshape(3, 3, C, F)


def maxpool2d_forward(x):
    """Drop-in for the lesson's maxpool2d_forward(x, 2). The four positions
    of every window are four strided views of x (no copies): top-left
    x[:, 0::2, 0::2], top-right x[:, 0::2, 1::2], and so on; the output is
    their elementwise maximum. The winner, with ties to the first maximum
    in reading order as in the lesson, is one byte per output (0..3)."""
    N, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    tl, tr = x[:, 0:2 * Ho:2, 0:2 * Wo:2], x[:, 0:2 * Ho:2, 1:2 * Wo:2]  # (N, H', W', C)
    bl, br = x[:, 1:2 * Ho:2, 0:2 * Wo:2], x[:, 1:2 * Ho:2, 1:2 * Wo:2]
    top, bottom = np.maximum(tl, tr), np.maximum(bl, br)
    # The bottom row wins only if it is strictly larger, then within the
    # chosen row the right column only if it is strictly larger.
    down = bottom > top
    right = (down & (br > bl)) | (~down & (tr > tl))          # (np.where is slower here)
    winner = 2 * down.view(np.uint8) + right.view(np.uint8)  # bools viewed as bytes: 0..3
    return np.maximum(top, bottom), (x.shape, winner)


def maxpool2d_backward(dout, cache):
    """Drop-in for the lesson's maxpool2d_backward. Every input is in
    exactly one window position, so the four strided views fill dx
    completely; out= writes each product straight into its view."""
    x_shape, winner = cache
    Ho, Wo = dout.shape[1:3]
    dx = np.empty(x_shape, dtype=dout.dtype)                  # (N, H, W, C)
    dx[:, 2 * Ho:], dx[:, :, 2 * Wo:] = 0, 0                  # a dropped odd row/column
    for k, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        np.multiply(dout, winner == k, out=dx[:, a:2 * Ho:2, b:2 * Wo:2])
    return dx


def batchnorm_forward(x, gamma, beta, epsilon, total):
    """Drop-in for batchnorm.batchnorm_forward on one slice of a batch:
    total(per-channel sums) adds them up over all the slices (SumOverSlices),
    so M, the mean and the variance are the whole batch's."""
    axes = tuple(range(x.ndim - 1))
    M = total(np.float64(x.size // x.shape[-1]))
    mean = (total(x.sum(axis=axes, dtype=np.float64)) / M).astype(x.dtype)
    centred = x - mean
    var = (total(np.square(centred).sum(axis=axes, dtype=np.float64)) / M).astype(x.dtype)
    inv_std = 1 / np.sqrt(var + epsilon)
    xhat = centred * inv_std
    return gamma * xhat + beta, (xhat, gamma, inv_std, x.dtype.type(M), total), mean, var


def batchnorm_backward(dout, cache):
    """Drop-in for batchnorm.batchnorm_backward on one slice: the two sums in
    dx are over the whole batch (total); dgamma and dbeta are this slice's
    share, which train_in_slices adds up."""
    xhat, gamma, inv_std, M, total = cache
    axes = tuple(range(dout.ndim - 1))
    dbeta = dout.sum(axis=axes, dtype=np.float64)
    dgamma = (dout * xhat).sum(axis=axes, dtype=np.float64)
    sum_dout, sum_dout_xhat = total(np.stack([dbeta, dgamma])).astype(dout.dtype)
    dx = gamma * inv_std / M * (M * dout - sum_dout - xhat * sum_dout_xhat)
    return dx, dgamma.astype(dout.dtype), dbeta.astype(dout.dtype)
