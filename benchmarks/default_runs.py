"""The default runs: both twins, the default command, for several seeds.

    python benchmarks/default_runs.py                       # seeds 0 1 2, MNIST
    python benchmarks/default_runs.py --dataset fashion --seeds 0
    python benchmarks/default_runs.py --network batchnorm --seeds 0

Runs `python mnist_cnn_keras.py --seed S` and `python mnist_cnn_numpy.py
--seed S` (12 epochs, all 55,000 training images) one after the other, each
in its own process, then each twin on the other's weights file
(`--load-weights ... --eval-only`), and writes what their reports say (test
accuracy and loss, each epoch's seconds) with each run's peak memory and the
machine to --out/NAME.json (default: results/default-runs.json). The
README's results table is printed from such a file. --network runs a copy
of the twins with one of docs/change.md's edits (helpers/edits.py).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_utils  # noqa: E402
import machine  # noqa: E402
from helpers import common, edits  # noqa: E402


def run(folder, twin, args, out, *extra):
    """One run of a twin's script in folder: its report, its peak memory (MB)."""
    cmd = [sys.executable, str(Path(folder) / edits.TWINS[twin]), "--seed", str(args.seed),
           "--dataset", args.dataset, "--no-plots", "--out", str(out), *extra]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    name = f"{twin}{'.eval' if extra else ''}"
    _, peak_mb = machine.run_script(cmd, folder, out / f"{name}.log")
    return json.loads((out / f"{name}.json").read_text()), peak_mb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=common.HelpWithDefaults)
    p.add_argument("--seeds", type=common._seed, nargs="+", default=[0, 1, 2])
    p.add_argument("--dataset", choices=sorted(data_utils.DATASETS), default="mnist")
    p.add_argument("--network", choices=["default", *edits.NETWORKS], default="default",
                   help="the default network, or a copy with one of docs/change.md's edits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=common._positive(int), default=None,
                   help="default: the twins' own (a quick check only)")
    p.add_argument("--train-limit", type=common._positive(int), default=None,
                   help="default: all training images (a quick check only)")
    p.add_argument("--out", default="results", help="folder for the results file")
    p.add_argument("--name", default="default-runs", help="the results file: --out/NAME.json")
    args = p.parse_args(argv)
    out = common.prepare_out_dir(args.out)
    runs, cross = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = REPO
        if args.network != "default":
            folder = edits.NETWORKS[args.network](Path(tmp) / "twins")
        work = Path(tmp) / "runs"
        for seed in args.seeds:
            args.seed = seed
            work.mkdir(exist_ok=True)
            reports = {}
            for twin in ("keras", "numpy"):
                print(f"seed {seed}: the {twin} twin, the default command...", flush=True)
                reports[twin], peak = run(folder, twin, args, work)
                report = reports[twin]
                runs.append({"twin": twin, "seed": seed, "peak_memory_mb": peak,
                             **{k: report[k] for k in ("test_accuracy", "test_loss", "epochs",
                                                       "epoch_seconds", "train_images",
                                                       "params")}})
                print(f"  test accuracy {100 * report['test_accuracy']:.2f}%, "
                      f"{sum(report['epoch_seconds']) / report['epochs']:.1f} s/epoch, "
                      f"peak {peak:.0f} MB", flush=True)
            for twin, other in (("numpy", "keras"), ("keras", "numpy")):
                print(f"seed {seed}: the {twin} twin on the {other} twin's weights...",
                      flush=True)
                report, _ = run(folder, twin, args, work, "--load-weights",
                                str(work / f"{other}.weights.npz"), "--eval-only")
                cross.append({"seed": seed, "twin": twin, "weights_of": other,
                              "test_accuracy": report["test_accuracy"],
                              "test_loss": report["test_loss"],
                              "trainer_accuracy": reports[other]["test_accuracy"],
                              "trainer_loss": reports[other]["test_loss"]})
    path = out / f"{args.name}.json"
    common.write_report(path, {"machine": machine.machine(), "dataset": args.dataset,
                               "network": args.network, "runs": runs, "cross": cross})
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    common.run(main)
