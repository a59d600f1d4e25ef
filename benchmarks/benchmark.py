"""Benchmark both twins side by side, in the same run, on this machine.

    python benchmarks/benchmark.py                     # full: 55,000 images, 4 rounds of 3 epochs
    python benchmarks/benchmark.py --blas-kernels cpu  # OpenBLAS's own choice for this CPU
    python benchmarks/benchmark.py --quick             # a few hundred images: checks it works

Each round trains the Keras twin, then the NumPy twin (the order swaps every
round, so a noisy neighbour on the machine hits both), each in its own
process, for --epochs epochs with the default network and batch size. The
first epoch of every run is a warm-up (TensorFlow builds its graph, caches
fill) and is not timed.

What it leads with, and why: the ratio of the twins' *fastest* epochs. On a
shared machine other tenants only ever add time, and they add far more to
Keras's many small threaded operations than to the NumPy twin's few large
ones; so medians move from run to run far more than the fastest epochs,
what a quiet machine gives. Beside it: the ratio of the median epochs,
and CPU seconds per training image (user + system time of each twin's
process, which other tenants' load does not inflate as much as wall time).
Why Keras is the one that moves: it counts each twin's context switches
per training step, the times one of its threads went to sleep waiting for
another (voluntary) or was put aside for another (involuntary). Each
wake-up waits for the machine's scheduler, and on a shared virtual machine
for its host's, so a twin that sleeps and wakes a hundred times a step
feels a busy host far more than one that does so once or twice.
It also records the CPU model and the BLAS library and kernels, measures
NumPy's float32 matrix-multiply rate, and how much of it the NumPy twin
achieves over an epoch (the network's multiply-adds, read off its model,
divided by the time). Figures go to --out/benchmark.json.

--blas-kernels: which OpenBLAS kernels the NumPy twin's matrix products use.
"as-set" (default) leaves the environment alone; "cpu" removes
OPENBLAS_CORETYPE so OpenBLAS picks for this CPU; a name (Haswell,
SkylakeX, ...) forces those. TensorFlow has its own kernels either way.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import common  # noqa: E402
from machine import blas_info, child_environment, machine, run_script  # noqa: E402,F401
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


def matmul_gflops(kernels="as-set"):
    """NumPy's float32 matrix-multiply rate, in GFLOP/s (2 per multiply-add),
    measured in a child process with the twins' BLAS kernels."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import benchmark; "
            "print(json.dumps(benchmark._matmul_gflops()))")
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                            capture_output=True, text=True, check=True,
                            env=child_environment(kernels))
    return json.loads(result.stdout)


def _matmul_gflops(repeats=20):
    """Two shapes: a large square product (what BLAS does best) and the NumPy
    twin's own largest product, its biggest convolution's im2col matrix (a
    batch of 128) times its kernel, read off the model."""
    rng = np.random.default_rng(0)
    convs = [layer for layer in mnist_cnn_numpy.build_model().layers
             if isinstance(layer, mnist_cnn_numpy.Conv2D)]
    conv = max(convs, key=lambda c: c.kernel.size * np.prod(c.output_shape[:-1]))
    shapes = {"square 2048": (2048, 2048, 2048),
              f"{conv.name} im2col": (128 * int(np.prod(conv.output_shape[:-1])),
                                      conv.kernel[..., 0].size + 1, conv.filters)}
    rates = {}
    for name, (m, k, n) in shapes.items():
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


def run_twin(twin, args, out, epochs=None, lesson_alone=False):
    """Train one twin in a child process; return its report, its peak memory
    (MB) and its resource usage (os.wait4's: CPU seconds in ru_utime +
    ru_stime, context switches in ru_nvcsw and ru_nivcsw). lesson_alone: the
    NumPy twin without speedup.py's drop-ins (MNIST_TWINS_FAST=0)."""
    cmd = [sys.executable, str(REPO / f"mnist_cnn_{twin}.py"), "--epochs",
           str(epochs or args.epochs), "--no-plots", "--seed", "0", "--out", str(out)]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = child_environment(args.blas_kernels)
    if lesson_alone:
        env["MNIST_TWINS_FAST"] = "0"
    usage, peak_mb = run_script(cmd, REPO, out / f"{twin}.log", env)
    report = json.loads((out / f"{twin}.json").read_text())
    return report, peak_mb, usage


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=common.HelpWithDefaults)
    p.add_argument("--quick", action="store_true",
                   help="300 training images, 2 epochs, 1 round: checks the script works")
    p.add_argument("--rounds", type=common._positive(int), default=4,
                   help="runs of each twin, alternating")
    p.add_argument("--epochs", type=common._positive(int), default=3,
                   help="epochs per run; the first is a warm-up")
    p.add_argument("--lesson-rounds", type=int, default=1, metavar="N",
                   help="runs of the NumPy twin's lesson alone (no speedup.py), 2 epochs "
                        "each, after the rounds; 0: none")
    p.add_argument("--blas-kernels", default="as-set", metavar="KERNELS",
                   help="as-set, cpu, or a kernel name such as Haswell or SkylakeX")
    p.add_argument("--train-limit", type=common._positive(int), default=None, metavar="N")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="results", help="folder for the results file")
    p.add_argument("--name", default="benchmark", help="the results file: --out/NAME.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.train_limit = 1, 2, args.train_limit or 300
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is a warm-up)")
    out = common.prepare_out_dir(args.out)

    # The matmul rate is probed before every round and the best kept: one
    # probe can land on a moment when another tenant is busy.
    matmul = {}
    epochs = {"keras": [], "numpy": []}
    memory = {"keras": [], "numpy": []}
    cpu = {"keras": [], "numpy": []}
    switches = {"keras": [], "numpy": []}   # {"voluntary": n, "involuntary": n} per run
    round_ratios = []       # NumPy / Keras within each round: runs next to each other in time
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            print(f"Round {r + 1}/{args.rounds}: NumPy's float32 matmul rate...", flush=True)
            for name, rate in matmul_gflops(args.blas_kernels).items():
                matmul[name] = max(rate, matmul.get(name, 0.0))
            order = ["keras", "numpy"] if r % 2 == 0 else ["numpy", "keras"]
            for twin in order:
                print(f"Round {r + 1}/{args.rounds}: {twin} twin, {args.epochs} epochs...",
                      flush=True)
                report, rss, usage = run_twin(twin, args, Path(tmp))
                epochs[twin] += report["epoch_seconds"][1:]        # skip the warm-up
                memory[twin].append(rss)
                cpu[twin].append(usage.ru_utime + usage.ru_stime)
                switches[twin].append({"voluntary": usage.ru_nvcsw,
                                       "involuntary": usage.ru_nivcsw})
                reports[twin] = report
            round_ratios.append(min(reports["numpy"]["epoch_seconds"][1:])
                                / min(reports["keras"]["epoch_seconds"][1:]))
        lesson = []
        for r in range(args.lesson_rounds):
            print(f"Lesson alone {r + 1}/{args.lesson_rounds}: numpy twin without "
                  "speedup.py, 2 epochs...", flush=True)
            report, _, _ = run_twin("numpy", args, Path(tmp), epochs=2, lesson_alone=True)
            lesson += report["epoch_seconds"][1:]

    peak = max(matmul.values())
    images = reports["numpy"]["train_images"]
    val_images = data_utils.VALIDATION_SIZE           # validated every epoch
    results = {"machine": machine(args.blas_kernels),
               "settings": {"train_images": images, "batch_size": reports["numpy"]["batch_size"],
                            "epochs_per_run": args.epochs, "rounds": args.rounds},
               "matmul_gflops": matmul}
    steps = args.epochs * -(-images // reports["numpy"]["batch_size"])   # per run
    for twin in ("keras", "numpy"):
        # CPU seconds per training image: each run's CPU time over the images
        # it trained on (all its epochs, warm-up included, and its start-up).
        # Context switches per step likewise: start-up and validation included.
        per_image = statistics.median(c / (images * args.epochs) for c in cpu[twin])
        per_step = {kind: statistics.median(run[kind] / steps for run in switches[twin])
                    for kind in ("voluntary", "involuntary")}
        results[twin] = {"fastest_epoch_seconds": min(epochs[twin]),
                         "median_epoch_seconds": statistics.median(epochs[twin]),
                         "epoch_seconds": epochs[twin],
                         "images_per_second": images / min(epochs[twin]),
                         "cpu_ms_per_image": 1000 * per_image,
                         "context_switches_per_step": per_step,
                         "peak_memory_mb": max(memory[twin]),
                         "test_accuracy": reports[twin]["test_accuracy"]}
    k, n = results["keras"], results["numpy"]
    ratio = n["fastest_epoch_seconds"] / k["fastest_epoch_seconds"]
    train_macs, eval_macs = multiply_adds(mnist_cnn_numpy.build_model())
    flops = 2 * (images * train_macs + val_images * eval_macs)
    achieved = flops / n["fastest_epoch_seconds"] / 1e9
    results["ratio_fastest_epochs"] = ratio
    results["ratio_median_epochs"] = n["median_epoch_seconds"] / k["median_epoch_seconds"]
    results["ratio_cpu_per_image"] = n["cpu_ms_per_image"] / k["cpu_ms_per_image"]
    results["ratio_fastest_per_round"] = round_ratios
    results["numpy_gflops_per_epoch"] = achieved
    results["numpy_fraction_of_matmul_peak"] = achieved / peak
    if lesson:
        results["numpy_lesson_alone"] = {"fastest_epoch_seconds": min(lesson),
                                         "epoch_seconds": lesson}
        results["speedup_buys"] = min(lesson) / n["fastest_epoch_seconds"]

    print(f"\n{'':<28} {'Keras':>10} {'NumPy':>10}")
    for label, key, fmt in (("Fastest epoch (s)", "fastest_epoch_seconds", "{:>10.2f}"),
                            ("Median epoch (s)", "median_epoch_seconds", "{:>10.2f}"),
                            ("CPU ms per training image", "cpu_ms_per_image", "{:>10.3f}"),
                            ("Training images / s (fastest)", "images_per_second", "{:>10.0f}"),
                            ("Peak memory (MB)", "peak_memory_mb", "{:>10.0f}")):
        print(f"{label:<28} " + fmt.format(k[key]) + " " + fmt.format(n[key]))
    print(f"{'Test accuracy':<28} {100 * k['test_accuracy']:>9.2f}% "
          f"{100 * n['test_accuracy']:>9.2f}%")
    for kind in ("voluntary", "involuntary"):
        print(f"{'Context switches / step, ' + kind[:3] + '.':<28} "
              f"{k['context_switches_per_step'][kind]:>10.1f} "
              f"{n['context_switches_per_step'][kind]:>10.1f}")
    print(f"\nNumPy / Keras time per epoch: {ratio:.2f}x  (fastest epochs; trust this one)")
    print(f"  median epochs: {results['ratio_median_epochs']:.2f}x,  CPU time per image: "
          f"{results['ratio_cpu_per_image']:.2f}x")
    print("  fastest epochs, round by round: "
          + " ".join(f"{r:.2f}" for r in round_ratios))
    print(f"  ({images:,} training images, {args.epochs - 1} timed epochs x {args.rounds} runs "
          "per twin. Other tenants only add time, and to Keras's many small threaded\n"
          "  operations, each a thread that sleeps and must be woken (the context switches "
          "above),\n  far more than to NumPy's few large ones: the fastest epochs are what a "
          "quiet machine gives.)")
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']} kernels)"
                     for b in results["machine"]["blas"])
    print(f"CPU: {results['machine']['cpu']}")
    print(f"BLAS: {blas}")
    print("Matmul rate (float32, NumPy, best of the rounds' probes): " +
          ", ".join(f"{name} {g:.0f} GFLOP/s" for name, g in matmul.items()))
    print(f"NumPy twin over its fastest epoch: {achieved:.0f} GFLOP/s = "
          f"{100 * achieved / peak:.1f}% of the best matmul rate")
    if lesson:
        print(f"The lesson alone (MNIST_TWINS_FAST=0): fastest epoch {min(lesson):.2f} s; "
              f"speedup.py makes it {results['speedup_buys']:.2f}x faster")
    path = out / f"{args.name}.json"
    common.write_report(path, results)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    common.run(main)
