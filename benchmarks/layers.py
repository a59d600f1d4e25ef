"""Where the time goes, layer by layer, in both twins.

    python benchmarks/layers.py              # a batch of 128, both twins, one table
    python benchmarks/layers.py --repeats 5  # quicker, noisier
    python benchmarks/layers.py --blas-kernels cpu   # the kernels OpenBLAS picks for this CPU

For a batch of 128 real MNIST images, times each layer's forward and
backward pass in both twins: the NumPy twin's functions as training runs
them (one slice of the batch per core, each in its own process, as
speedup.SliceProcesses trains them), and the same Keras layer under
tf.function, forward alone and forward with tf.GradientTape (backward =
the difference). Then the loss, the optimizer
step, a whole training step, and the evaluation of a batch of 256 (the
validation pass). Each figure is the fastest of --repeats runs (the
machine's other load only ever adds time), in milliseconds.

The table's last column is each row's share of the NumPy twin's training
step (the sum of its rows). docs/speed.md explains the big gaps.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from helpers import common  # noqa: E402
import data_utils  # noqa: E402
import mnist_cnn_numpy as nt  # noqa: E402
import speedup  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402


def fastest(fn, repeats):
    """The fastest of `repeats` runs of fn(), in milliseconds (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def numpy_times(x, y, repeats):
    """{(layer, "forward"/"backward"): ms} for the NumPy twin, as it trains:
    each layer's fast copy (speedup.fast_copies) runs on the batch's
    slices, one slice per core, each in its own process (InProcesses, as
    speedup.SliceProcesses trains them), or on threads where helper
    processes are not used (speedup.PROCESSES off, or no fork)."""
    model, threads = nt.build_model(seed=0), speedup.cores()
    in_processes = speedup.PROCESSES and threads > 1
    parts = speedup.slices(len(x), threads, size=-(-len(x) // threads) if in_processes else None)
    copies, _ = speedup.fast_copies(model.layers, parts, training=True, x=x)
    inputs = [[x[rows]] for rows in parts]          # inputs[s][i]: layer i's input, slice s
    for i in range(len(model.layers)):
        for s, layers in enumerate(copies):
            inputs[s].append(layers[i].forward(inputs[s][i].copy(), training=True))
    douts = []
    for s, rows in enumerate(parts):
        _, probs = nt.softmax_cross_entropy(inputs[s][-1], y[rows])
        douts.append([nt.softmax_cross_entropy_backward(probs, y[rows])])
    for i in reversed(range(len(model.layers))):       # the gradients each layer receives
        for s, layers in enumerate(copies):
            douts[s].insert(0, layers[i].backward(douts[s][0].copy()))

    works = {}                                      # what each timed run does to one slice
    for i, layer in enumerate(model.layers):
        def forward(layers, rows, i=i):
            return layers[i].forward(inputs[parts.index(rows)][i].copy(), training=True)

        def backward(layers, rows, i=i):
            return layers[i].backward(douts[parts.index(rows)][i + 1].copy())
        works[f"forward {i}"], works[f"backward {i}"] = forward, backward
    works["loss"] = lambda layers, rows: nt.softmax_cross_entropy(
        inputs[parts.index(rows)][-1], y[rows])
    works["loss backward"] = lambda layers, rows: nt.softmax_cross_entropy_backward(
        nt.softmax(inputs[parts.index(rows)][-1]), y[rows])
    if in_processes:
        run = InProcesses(works, copies, parts)
    else:
        def run(name):
            return speedup._run(works[name], copies, parts, threads)
    times = {}
    try:
        for i, layer in enumerate(model.layers):
            times[(layer.name, "forward")] = fastest(lambda: run(f"forward {i}"), repeats)
            # backward needs the forward's cache: run the forward first, time the backward
            times[(layer.name, "backward")] = fastest_after(
                lambda: run(f"forward {i}"), lambda: run(f"backward {i}"), repeats)
        times[("loss", "forward")] = fastest(lambda: run("loss"), repeats)
        times[("loss", "backward")] = fastest(lambda: run("loss backward"), repeats)
    finally:
        if in_processes:
            run.close()
    optimizer = nt.Adam()
    with speedup.switched_on(nt):
        nt.train_step(model, optimizer, x, y)
        times[("Adam", "step")] = fastest(lambda: optimizer.update(model.trainable_weights()),
                                          repeats)
        times[("whole step", "")] = fastest(lambda: nt.train_step(model, optimizer, x, y),
                                            repeats)
        x_eval = np.concatenate([x, x])
        times[("evaluate 256", "")] = fastest(lambda: nt.logits(model, x_eval), repeats)
    return times


class InProcesses:
    """run(name): works[name](layers, rows) for every slice at the same time,
    the first slice in this process and each other one in a forked helper
    (BLAS on one thread in each), as training runs them; returns when all
    are done. The helpers were forked with everything the works need."""

    def __init__(self, works, copies, parts):
        self.works, self.copies, self.parts, self.helpers = works, copies, parts, []
        for s in range(1, len(parts)):
            self.helpers.append(speedup.fork_helper(
                lambda go, done, s=s: self._serve(s, go, done)))
        from threadpoolctl import ThreadpoolController
        self.blas = ThreadpoolController()

    def _serve(self, s, go, done):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from threadpoolctl import ThreadpoolController
        ThreadpoolController().limit(limits=1, user_api="blas")
        while True:
            name = os.read(go, 64).decode()
            if not name:
                return
            self.works[name](self.copies[s], self.parts[s])
            os.write(done, b"\0")

    def __call__(self, name):
        for _, go, _ in self.helpers:
            os.write(go, name.encode())
        with self.blas.limit(limits=1, user_api="blas"):
            self.works[name](self.copies[0], self.parts[0])
        for _, _, done in self.helpers:
            if os.read(done, 1) != b"\0":
                raise RuntimeError(f"a helper process failed to run {name}")

    def close(self):
        for pid, go, done in self.helpers:
            os.close(go)
            os.close(done)
            os.waitpid(pid, 0)
        self.helpers = []


def fastest_after(setup, fn, repeats):
    """Like fastest, with setup() run (untimed) before each run of fn()."""
    setup()
    fn()
    best = float("inf")
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def keras_times(x, y, repeats):
    """The same rows for the Keras twin: each layer under tf.function."""
    keras, tf = common.import_keras()
    import mnist_cnn_keras as kt
    # Each layer gets its own tf.function, traced once; TensorFlow counts
    # the many first tracings as "retracing" and warns. Only that is hushed.
    tf.get_logger().addFilter(lambda record: "tf.function retracing" not in record.getMessage())
    model = kt.build_model()
    kt.set_weights(model, common.initial_weights(kt.weight_shapes(model), 0))
    x = tf.constant(x)
    inputs = [x]
    for layer in model.layers:
        inputs.append(layer(inputs[-1], training=True))
    times = {}
    for i, layer in enumerate(model.layers):
        dout = tf.random.normal(inputs[i + 1].shape, seed=1)

        @tf.function
        def forward(inp, layer=layer):
            return layer(inp, training=True)

        @tf.function
        def forward_backward(inp, dout, layer=layer, first=(i == 0)):
            # The first layer's input gradient is never needed (nor computed
            # in training, by either twin).
            with tf.GradientTape() as tape:
                tape.watch(inp)
                out = layer(inp, training=True)
            wrt = ([] if first else [inp]) + layer.trainable_variables
            return tape.gradient(out, wrt, output_gradients=dout)

        f = fastest(lambda: forward(inputs[i]).numpy(), repeats)
        fb = fastest(lambda: [g.numpy() for g in forward_backward(inputs[i], dout)], repeats)
        times[(layer.name, "forward")] = f
        times[(layer.name, "backward")] = max(fb - f, 0.0)
    probs = inputs[-1]
    labels = tf.constant(y)

    @tf.function
    def loss_forward(probs):
        return model.loss(labels, probs)

    @tf.function
    def loss_forward_backward(probs):
        with tf.GradientTape() as tape:
            tape.watch(probs)
            loss = model.loss(labels, probs)
        return tape.gradient(loss, probs)

    f = fastest(lambda: loss_forward(probs).numpy(), repeats)
    times[("loss", "forward")] = f
    times[("loss", "backward")] = max(fastest(lambda: loss_forward_backward(probs).numpy(),
                                              repeats) - f, 0.0)
    grads = [tf.zeros_like(v) + 1e-3 for v in model.trainable_variables]
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)

    @tf.function
    def adam_step():
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    times[("Adam", "step")] = fastest(lambda: adam_step(), repeats)
    model.train_on_batch(x, labels)
    times[("whole step", "")] = fastest(lambda: model.train_on_batch(x, labels), repeats)
    x_eval = tf.concat([x, x], axis=0)
    predict = tf.function(lambda inp: model(inp, training=False))
    times[("evaluate 256", "")] = fastest(lambda: predict(x_eval).numpy(), repeats)
    return times


def table(numpy, keras):
    step = sum(v for (name, part), v in numpy.items() if part)     # the parts of a step
    lines = [f"{'layer':<14} {'pass':<9} {'NumPy ms':>9} {'Keras ms':>9} {'ratio':>7} "
             f"{'share':>7}"]
    for key in numpy:
        name, part = key
        n, k = numpy[key], keras.get(key, float("nan"))
        ratio = n / k if k > 0.005 else float("nan")
        share = f"{100 * n / step:6.1f}%" if part else ""
        lines.append(f"{name:<14} {part:<9} {n:9.2f} {k:9.2f} {ratio:7.2f} {share:>7}")
    lines.append(f"{'sum of parts':<14} {'':<9} {step:9.2f} "
                 f"{sum(v for (n, p), v in keras.items() if p):9.2f}")
    return "\n".join(lines)


def slice_sizes(x, y, sizes, repeats):
    """{slice size: ms} for a whole training step of the fast path on
    threads (the batch in slices of about that many images, one thread per
    core), and {"processes": ms} for it with helper processes (one slice
    per core, what training uses where it can)."""
    model, found = nt.build_model(seed=0), {}
    saved = speedup.SLICE, speedup.PROCESSES
    try:
        speedup.PROCESSES = False
        for size in sizes:
            speedup.SLICE = size
            found[size] = fastest(lambda: speedup.train_in_slices(nt, model.layers, x, y),
                                  repeats)
        speedup.SLICE, speedup.PROCESSES = saved
        found["processes"] = fastest(lambda: speedup.train_in_slices(nt, model.layers, x, y),
                                     repeats)
    finally:
        speedup.SLICE, speedup.PROCESSES = saved
        speedup.close_processes()
    return found


_KERNELS_SET = "MNIST_TWINS_BLAS_KERNELS"   # set in the run that --blas-kernels started


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=common.HelpWithDefaults)
    p.add_argument("--repeats", type=common._positive(int), default=30,
                   help="runs of each measurement; the fastest is kept")
    p.add_argument("--blas-kernels", default="as-set", metavar="KERNELS",
                   help="as-set, cpu, or a kernel name such as Haswell or SkylakeX "
                        "(as benchmark.py's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write the figures to DIR/NAME.json, with the machine's")
    p.add_argument("--name", default="layers", help="the results file's name")
    args = p.parse_args(argv)
    if args.blas_kernels != "as-set" and os.environ.get(_KERNELS_SET) != args.blas_kernels:
        # OpenBLAS chose its kernels when NumPy loaded it, before this line ran:
        # this script again, in a process whose environment asks for the others.
        env = dict(machine.child_environment(args.blas_kernels),
                   **{_KERNELS_SET: args.blas_kernels})
        cmd = [sys.executable, str(Path(__file__).resolve())]
        return subprocess.run(cmd + list(sys.argv[1:] if argv is None else argv),
                              env=env).returncode
    (x, y), _ = data_utils.load_dataset("mnist", args.data_dir, progress=False)
    x, y = x[:128], y[:128]
    speedup.keep_freed_memory()                 # as training does (switched_on)
    about = machine.machine(args.blas_kernels)
    print(f"Timing each layer for a batch of {len(x)}, fastest of {args.repeats} runs "
          f"(BLAS: {about['blas_kernels']} kernels; choose others with --blas-kernels)...",
          flush=True)
    numpy = numpy_times(x, y, args.repeats)
    keras = keras_times(x, y, args.repeats)
    print(table(numpy, keras))
    sizes = slice_sizes(x, y, (16, 32, 64), args.repeats)
    print("Whole step (fast path) on threads by slice size: "
          + ", ".join(f"{size} images {ms:.2f} ms" for size, ms in sizes.items()
                      if size != "processes")
          + f"; with helper processes: {sizes['processes']:.2f} ms")
    if args.out:
        path = common.prepare_out_dir(args.out) / f"{args.name}.json"
        common.write_report(path, {
            "machine": about, "batch": len(x), "repeats": args.repeats,
            "rows": [{"layer": name, "pass": part, "numpy_ms": ms,
                      "keras_ms": keras.get((name, part))} for (name, part), ms in numpy.items()],
            "slice_sizes_ms": {str(k): v for k, v in sizes.items()}})
        print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    common.run(main)
