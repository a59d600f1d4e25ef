"""How the NumPy twin uses every CPU core: the machinery, kept out of the lesson.

Nothing here changes a number the network computes (the tests check that 1,
2 and 3 slices give the same loss, probabilities and gradients). Read
mnist_cnn_numpy.py first; come here when you want to know why it is fast.

    loss, probs = speedup.train_in_slices(model, loss_and_grads, x, y)
    logits = speedup.forward_in_slices(model, forward, x)

Why slices on threads. A matrix product (BLAS) spreads over every core by
itself, but NumPy's elementwise operations (im2col copies, ReLU, max-pool, ...)
run on one, and they took about two thirds of a training step. So the batch
is cut into slices, each core's thread runs the whole network on one slice
after another, and BLAS is held to one thread per slice: now both kinds of
work use every core. NumPy releases Python's lock (the GIL) inside its
operations, so the threads really do run at the same time. Each slice gets a
shallow copy of the layers: the copies share the weight arrays (nothing is
copied) but keep their own caches.

Why slices of 32 (SLICE), not one big slice per core. A slice's feature maps,
im2col matrix and gradients are what its core reads and writes over and
over; for 32 images they are half as big as for 64, and more of them are
still in the CPU's caches when the next operation needs them. With both
cores busy, two slices of 32 one after the other took 9% less time than one
slice of 64 (benchmarks/README.md).

Why the gradients still come out right. The loss is a mean over the batch's
N examples, so the batch's gradient is the sum of the slices' gradients when
each slice divides by the whole batch's N (loss_and_grads takes that N).

Dropout. The mask of the whole batch is drawn here, before the batch is cut,
and each slice gets its rows: the random numbers, and so the results, do not
depend on how many slices there are.

Batch normalization couples the examples of a batch: each is normalised
with the mean and variance of the *whole* batch, and its gradient needs two
sums over the whole batch too. So a BatchNormalization layer's copies get a
`total` function (SumOverSlices below): each slice's thread hands in its
own per-channel sums, waits until every slice has, and gets the batch's
totals back, the same numbers in every thread. (Frameworks call this
synchronised batch normalization.) Each copy computes the same new moving
statistics; the model's layer takes them from the first slice's copy.

Why keep freed memory (keep_freed_memory). Every training step makes the
same big arrays again and drops them at its end; see the function.
"""

import copy
import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

# Examples per slice (see above), and the fewest worth a slice of their own.
SLICE = 32
MIN_SLICE = 16
_POOLS = {}
_BLAS = None


def cores():
    """The CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def slices(n, threads, size=None):
    """Cut a batch of n into slices of about `size` examples (default SLICE,
    at least MIN_SLICE), as many for each of the `threads` threads."""
    count = threads * max(1, round(n / (threads * (size or SLICE))))
    cuts = np.linspace(0, n, min(count, n // MIN_SLICE) + 1).astype(int)
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])] or [slice(0, n)]


def train_in_slices(model, loss_and_grads, x, y):
    """loss_and_grads(layers, x, y, N) on slices of the batch, on one thread
    per core.

    Returns the batch's (loss, probs), and leaves on each of the model's
    layers the gradients of the whole batch (dkernel, dbias, ...), exactly as
    loss_and_grads(model.layers, x, y, N) would on one core.
    """
    n = len(x)
    # Batch normalization's slices wait for each other (SumOverSlices), so
    # they must all run at once: then one slice per thread.
    together = any(hasattr(layer, "total") for layer in model.layers)
    parts = slices(n, model.threads, size=n if together else None)
    if len(parts) == 1:
        return loss_and_grads(model.layers, x, y, n)
    copies = [[copy.copy(layer) for layer in model.layers] for _ in parts]
    sums = []
    for i, layer in enumerate(model.layers):
        if hasattr(layer, "draw_mask"):       # Dropout: one mask for the batch
            mask = layer.draw_mask((n,) + layer.input_shape)
            for layers, rows in zip(copies, parts):
                layers[i].batch_mask = mask[rows]
        if hasattr(layer, "total"):           # BatchNormalization: the batch's sums
            sums.append(SumOverSlices(len(parts)))
            for s, layers in enumerate(copies):
                layers[i].total = sums[-1].for_slice(s)

    def work(layers, rows):
        try:
            return loss_and_grads(layers, x[rows], y[rows], n)
        except BaseException:
            for total in sums:                # do not leave the other slices waiting
                total.barrier.abort()
            raise

    results = _run(work, copies, parts, model.threads)
    for i, layer in enumerate(model.layers):
        for name in layer.params:             # the batch's gradient: the sum
            setattr(layer, "d" + name, _add_up([getattr(layers[i], "d" + name)
                                                for layers in copies]))
        for name in layer.state:              # the same in every slice's copy
            setattr(layer, name, getattr(copies[0][i], name))
    # Each slice's loss is the mean over its own rows; weight it by their share.
    loss = sum(part_loss * (rows.stop - rows.start) / n
               for (part_loss, _), rows in zip(results, parts))
    return loss, np.concatenate([probs for _, probs in results])


def _add_up(arrays):
    """sum(arrays), into one new array (sum() would make one per addition)."""
    total = arrays[0] + arrays[1]
    for more in arrays[2:]:
        total += more
    return total


class SumOverSlices:
    """Sums over a whole batch whose slices run on separate threads.

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


def forward_in_slices(model, forward, x):
    """forward(layers, x) (inference) on slices of x, on one thread per core;
    the outputs joined in order."""
    parts = slices(len(x), model.threads)
    if len(parts) == 1:
        return forward(model.layers, x)
    copies = [[copy.copy(layer) for layer in model.layers] for _ in parts]
    return np.concatenate(_run(lambda layers, rows: forward(layers, x[rows]),
                               copies, parts, model.threads))


def _run(work, copies, parts, threads):
    """work(layers, rows) for every slice, on `threads` threads (each takes
    the next slice when it is done with one), with BLAS held to one thread
    (threadpoolctl finds the BLAS library NumPy loaded).
    The threads get the caller's np.errstate (it does not pass to threads
    by itself), so a warning silenced in the caller stays silenced."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    threads = min(threads, len(parts))
    if threads not in _POOLS:                 # started once, reused
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="slice")
    errors = np.geterr()

    def run(layers, rows):
        with np.errstate(**errors):
            return work(layers, rows)

    with _BLAS.limit(limits=1, user_api="blas"):
        return list(_POOLS[threads].map(run, copies, parts))


def keep_freed_memory():
    """Memory reuse across batches.

    Every training step makes the same big arrays again (im2col matrices,
    feature maps and their gradients, tens of MB for a batch of 128) and
    drops them when the step ends. By default the C allocator that NumPy uses
    (glibc's malloc) hands blocks this large back to the operating system
    when they are freed, so the next step must get fresh ones: the OS then
    zero-fills every new page on first touch, one page fault at a time.
    Raising two of glibc's thresholds makes it keep freed memory for the next
    batch instead: on the machine benchmarks/README.md describes, a threaded
    step took about 40 ms without this and about 30 ms with it. Only glibc
    (Linux) has mallopt; elsewhere this does nothing.
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
