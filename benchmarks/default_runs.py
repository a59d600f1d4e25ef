"""The default runs: both twins, the default command, for several seeds.

    python benchmarks/default_runs.py                       # seeds 0 1 2, MNIST
    python benchmarks/default_runs.py --dataset fashion --seeds 0

Runs `python mnist_cnn_keras.py --seed S` and `python mnist_cnn_numpy.py
--seed S` (12 epochs, all 55,000 training images) one after the other, each
in its own process, and writes what their reports say (test accuracy and
loss, each epoch's seconds) with each run's peak memory and the machine to
--out/NAME.json (default: results/default-runs.json). The README's results
table is printed from such a file.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_utils  # noqa: E402
import machine  # noqa: E402
from helpers import common  # noqa: E402


def run(twin, seed, dataset, data_dir, out):
    """One default run of a twin: its report, its peak memory (MB)."""
    cmd = [sys.executable, str(REPO / f"mnist_cnn_{twin}.py"), "--seed", str(seed),
           "--dataset", dataset, "--no-plots", "--out", str(out)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    with open(out / f"{twin}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise common.UserError(f"the {twin} twin failed (seed {seed}):\n"
                               + (out / f"{twin}.log").read_text()[-2000:])
    return json.loads((out / f"{twin}.json").read_text()), usage.ru_maxrss / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=common.HelpWithDefaults)
    p.add_argument("--seeds", type=common._seed, nargs="+", default=[0, 1, 2])
    p.add_argument("--dataset", choices=sorted(data_utils.DATASETS), default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="results", help="folder for the results file")
    p.add_argument("--name", default="default-runs", help="the results file: --out/NAME.json")
    args = p.parse_args(argv)
    out = common.prepare_out_dir(args.out)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for twin in ("keras", "numpy"):
                print(f"seed {seed}: the {twin} twin, the default command...", flush=True)
                report, peak = run(twin, seed, args.dataset, args.data_dir, Path(tmp))
                runs.append({"twin": twin, "seed": seed, "peak_memory_mb": peak,
                             **{k: report[k] for k in ("test_accuracy", "test_loss", "epochs",
                                                       "epoch_seconds", "train_images",
                                                       "params")}})
                print(f"  test accuracy {100 * report['test_accuracy']:.2f}%, "
                      f"{sum(report['epoch_seconds']) / report['epochs']:.1f} s/epoch, "
                      f"peak {peak:.0f} MB", flush=True)
    path = out / f"{args.name}.json"
    common.write_report(path, {"machine": machine.machine(), "dataset": args.dataset,
                               "runs": runs})
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    common.run(main)
