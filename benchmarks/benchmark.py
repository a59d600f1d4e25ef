"""Benchmark both twins side by side, in the same run, on this machine.

    python benchmarks/benchmark.py            # full: 55,000 images, 5 to 8 minutes
    python benchmarks/benchmark.py --quick    # a few hundred images: checks it works

Each round trains the Keras twin, then the NumPy twin (the order swaps every
round, so a noisy neighbour on the machine hits both), each in its own
process, for --epochs epochs with the default network and batch size. The
first epoch of every run is a warm-up (TensorFlow builds its graph, caches
fill) and is not counted. For each twin it reports the median seconds per
epoch, training images per second, the peak resident memory of its process
and the test accuracy reached, then the ratio NumPy / Keras: of the medians,
and within each round, whose spread shows how much the machine's other load
moved it.

It also measures this machine's float32 matrix-multiply rate with NumPy, and
how much of it the NumPy twin achieves over an epoch: the network's
multiply-adds (forward and backward), counted below, divided by the time.
Figures go to --out/benchmark.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import data_utils  # noqa: E402
import mnist_cnn_numpy  # noqa: E402



def multiply_adds(model):
    """Multiply-adds per image of a training step and of an evaluation, read
    off the NumPy twin's model: a layer with a kernel makes kernel.size of
    them at each output position (H' x W' for a conv layer, 1 for a dense one).
    Backward, each such layer's dkernel costs as much as its forward, and so
    does its dx, except for the first layer's, which is never computed."""
    forward = [layer.kernel.size * int(np.prod(layer.output_shape[:-1]))
               for layer in model.layers if "kernel" in layer.params]
    first = forward[0] if "kernel" in model.layers[0].params else 0
    return sum(forward) + 2 * sum(forward) - first, sum(forward)


def matmul_gflops(repeats=20):
    """NumPy's float32 matrix-multiply rate here, in GFLOP/s (2 per multiply-add).

    Two shapes: a large square product (what BLAS does best) and the NumPy
    twin's own largest product (conv2's im2col matrix times its kernel).
    """
    rng = np.random.default_rng(0)
    rates = {}
    for name, (m, k, n) in {"square 2048": (2048, 2048, 2048),
                            "conv2 im2col": (128 * 11 * 11, 288, 64)}.items():
        a = rng.random((m, k), dtype=np.float32)
        b = rng.random((k, n), dtype=np.float32)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * m * k * n / best / 1e9
    return rates


def blas_info():
    """Which BLAS library NumPy uses here and which of its CPU kernels
    (OpenBLAS picks them by CPU model; OPENBLAS_CORETYPE overrides it)."""
    from threadpoolctl import threadpool_info
    return [{key: lib.get(key) for key in ("internal_api", "version", "architecture",
                                           "num_threads")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]


def run_twin(twin, args, out):
    """Train one twin in a child process; return its report and peak memory (MB)."""
    cmd = [sys.executable, str(REPO / f"mnist_cnn_{twin}.py"), "--epochs", str(args.epochs),
           "--no-plots", "--seed", "0", "--out", str(out)]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    with open(out / f"{twin}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives the resource usage of this one child: its peak RSS (KiB).
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise common.UserError(f"{twin} twin failed; its output is in {out / (twin + '.log')}:\n"
                               + (out / f"{twin}.log").read_text()[-2000:])
    report = json.loads((out / f"{twin}.json").read_text())
    return report, usage.ru_maxrss / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="300 training images, 2 epochs, 1 round: checks the script works")
    p.add_argument("--rounds", type=common._positive(int), default=4,
                   help="runs of each twin, alternating")
    p.add_argument("--epochs", type=common._positive(int), default=3,
                   help="epochs per run; the first is a warm-up")
    p.add_argument("--train-limit", type=common._positive(int), default=None, metavar="N")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="results", help="folder for benchmark.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.train_limit = 1, 2, args.train_limit or 300
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is a warm-up)")
    out = common.prepare_out_dir(args.out)

    print("Measuring NumPy's float32 matmul rate...", flush=True)
    matmul = matmul_gflops()
    peak = max(matmul.values())
    epochs = {"keras": [], "numpy": []}
    memory = {"keras": [], "numpy": []}
    round_ratios = []       # NumPy / Keras within each round: runs next to each other in time
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["keras", "numpy"] if r % 2 == 0 else ["numpy", "keras"]
            for twin in order:
                print(f"Round {r + 1}/{args.rounds}: {twin} twin, {args.epochs} epochs...",
                      flush=True)
                report, rss = run_twin(twin, args, Path(tmp))
                epochs[twin] += report["epoch_seconds"][1:]        # skip the warm-up
                memory[twin].append(rss)
                reports[twin] = report
            round_ratios.append(statistics.median(reports["numpy"]["epoch_seconds"][1:])
                                / statistics.median(reports["keras"]["epoch_seconds"][1:]))

    images = reports["numpy"]["train_images"]
    val_images = data_utils.VALIDATION_SIZE           # validated every epoch
    results = {"machine": {"cpu": platform.processor() or platform.machine(),
                           "cores": os.cpu_count(), "python": platform.python_version(),
                           "numpy": np.__version__, "blas": blas_info()},
               "settings": {"train_images": images, "batch_size": reports["numpy"]["batch_size"],
                            "epochs_per_run": args.epochs, "rounds": args.rounds},
               "matmul_gflops": matmul}
    for twin in ("keras", "numpy"):
        median = statistics.median(epochs[twin])
        results[twin] = {"seconds_per_epoch": median, "epoch_seconds": epochs[twin],
                         "images_per_second": images / median,
                         "peak_memory_mb": max(memory[twin]),
                         "test_accuracy": reports[twin]["test_accuracy"]}
    ratio = results["numpy"]["seconds_per_epoch"] / results["keras"]["seconds_per_epoch"]
    train_macs, eval_macs = multiply_adds(mnist_cnn_numpy.build_model())
    flops = 2 * (images * train_macs + val_images * eval_macs)
    achieved = flops / results["numpy"]["seconds_per_epoch"] / 1e9
    results["ratio_numpy_over_keras"] = ratio
    results["ratio_per_round"] = round_ratios
    results["numpy_gflops_per_epoch"] = achieved
    results["numpy_fraction_of_matmul_peak"] = achieved / peak

    k, n = results["keras"], results["numpy"]
    print(f"\n{'':<24} {'Keras':>10} {'NumPy':>10}")
    for label, key, fmt in (("Seconds per epoch", "seconds_per_epoch", "{:>10.2f}"),
                            ("Training images / s", "images_per_second", "{:>10.0f}"),
                            ("Peak memory (MB)", "peak_memory_mb", "{:>10.0f}")):
        print(f"{label:<24} " + fmt.format(k[key]) + " " + fmt.format(n[key]))
    print(f"{'Test accuracy':<24} {100 * k['test_accuracy']:>9.2f}% "
          f"{100 * n['test_accuracy']:>9.2f}%")
    print(f"\nNumPy / Keras time per epoch: {ratio:.2f}x "
          f"({images:,} training images, {args.epochs - 1} timed epochs x {args.rounds} runs each)")
    print("  within each round: " + " ".join(f"{r:.2f}" for r in round_ratios)
          + "  (how much the machine's load moved the ratio)")
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']} kernels)"
                     for b in results["machine"]["blas"])
    print(f"BLAS: {blas}")
    print("Matmul rate (float32, NumPy): " +
          ", ".join(f"{name} {g:.0f} GFLOP/s" for name, g in matmul.items()))
    print(f"NumPy twin over an epoch: {achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f}% "
          f"of the best matmul rate")
    path = out / "benchmark.json"
    common.write_report(path, results)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    common.run(main)
