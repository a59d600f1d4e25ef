"""The tables and figures of the README and docs/, printed from the results
files in docs/results/ (which the other scripts here wrote) and from the
code itself. cog runs these inside the Markdown files:

    cog -r README.md docs/*.md        # write every generated part again
    cog --check README.md docs/*.md   # CI: fails if a part and its source disagree

Every function returns Markdown text; each table ends with the machine its
numbers were measured on.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
sys.path.insert(0, str(REPO))


def load(name):
    return json.loads((RESULTS / f"{name}.json").read_text())


def machine(m, kernels=True, when=None):
    """One line: where and when the numbers were measured (kernels=False:
    the table names each row's BLAS kernels itself; when: said instead of
    m's date, for a table from results of more than one day)."""
    names = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}
    blas = ", ".join(f"{names.get(b['internal_api'], b['internal_api'])} "
                     f"{'.'.join(b['version'].split('.')[:3])} "
                     + (f"({b['architecture']} kernels)" if kernels else "(kernels: each row's)")
                     for b in m["blas"])
    keras = f", TensorFlow {m['tensorflow']} with Keras {m['keras']}" if m.get("tensorflow") \
        else ""
    return (f"Measured on {when or m['date']}: {m['cpu']}, no GPU; Python {m['python']}, NumPy "
            f"{m['numpy']} with {blas}{keras}.")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x):
    return f"{100 * x:.2f}%"


# --- Default runs ------------------------------------------------------------------

def _per_epoch(run):
    return sum(run["epoch_seconds"]) / len(run["epoch_seconds"])


def default_runs(name="default-runs"):
    """Both twins' default command, seed by seed, and each twin on the
    other's weights."""
    data = load(name)
    by = {(r["twin"], r["seed"]): r for r in data["runs"]}
    seeds = sorted({r["seed"] for r in data["runs"]})
    rows = []
    for s in seeds:
        k, n = by[("keras", s)], by[("numpy", s)]
        rows.append([s, f"{pct(k['test_accuracy'])} / {pct(n['test_accuracy'])}",
                     f"{k['test_loss']:.4f} / {n['test_loss']:.4f}",
                     f"{_per_epoch(k):.1f} ({min(k['epoch_seconds']):.1f}) / "
                     f"{_per_epoch(n):.1f} ({min(n['epoch_seconds']):.1f})",
                     f"{k['peak_memory_mb']:.0f} / {n['peak_memory_mb']:.0f}"])
    header = ["seed", "test accuracy, Keras / NumPy", "test loss", "s/epoch (fastest)",
              "peak memory MB"]
    first = data["runs"][0]
    dataset = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}[data["dataset"]]
    network = {"default": "the default network", "smaller": "the smaller network",
               "batchnorm": "the network with batch normalization"}[data.get("network",
                                                                           "default")]
    text = (_table(header, rows) + f"\n\n{network[0].upper() + network[1:]} "
            f"({first['params']:,} parameters), {first['epochs']} "
            f"epoch{'s' if first['epochs'] != 1 else ''} on "
            f"{first['train_images']:,} {dataset} training images; an epoch's time includes "
            f"its validation pass.")
    if data.get("cross"):
        cross = data["cross"]
        same = sum(pct(c["test_accuracy"]) == pct(c["trainer_accuracy"]) for c in cross)
        loss = max(abs(c["test_loss"] - c["trainer_loss"]) for c in cross)
        text += (f" Each twin evaluating the other's weights file: the training twin's own "
                 f"test accuracy (to 0.01%) in {same} of {len(cross)} evaluations, its test "
                 f"loss within {loss:.1e}.")
    return text + " " + machine(data["machine"])


# --- Benchmark ------------------------------------------------------------------------

def benchmark_runs(names):
    """One row per benchmark run (the results files names)."""
    rows = []
    for i, name in enumerate(names, start=1):
        b = load(name)
        k, n = b["keras"], b["numpy"]
        peak = max(b["matmul_gflops"].values())
        lesson = b.get("numpy_lesson_alone", {}).get("fastest_epoch_seconds")
        rows.append([i, b["machine"]["blas_kernels"], f"{k['fastest_epoch_seconds']:.2f} s",
                     f"{n['fastest_epoch_seconds']:.2f} s",
                     f"**{b['ratio_fastest_epochs']:.2f}x**", f"{b['ratio_median_epochs']:.2f}x",
                     f"{b['ratio_cpu_per_image']:.2f}x",
                     " ".join(f"{r:.2f}" for r in b["ratio_fastest_per_round"]),
                     f"{100 * b['numpy_fraction_of_matmul_peak']:.1f}% "
                     f"({b['numpy_gflops_per_epoch']:.0f} of {peak:.0f} GFLOP/s)",
                     f"{k['peak_memory_mb']:.0f} / {n['peak_memory_mb']:.0f} MB",
                     f"{lesson:.1f} s ({b['speedup_buys']:.1f}x)" if lesson else "-"])
    header = ["run", "kernels", "Keras fastest epoch", "NumPy fastest epoch",
              "NumPy / Keras (fastest)", "median ratio", "CPU time per image",
              "round by round", "NumPy / best matmul rate", "peak memory, Keras / NumPy",
              "lesson alone (what speedup.py buys)"]
    settings = {tuple(sorted(load(name)["settings"].items())) for name in names}
    lines = [f"{s['rounds']} rounds of {s['epochs_per_run']} epochs on {s['train_images']:,} "
             f"images, batches of {s['batch_size']}" for s in map(dict, sorted(settings))]
    return (_table(header, rows) + "\n\nEach run: " + "; ".join(lines) + ". "
            + machine(load(names[0])["machine"], kernels=False))


def context_switches(name="context-switches"):
    """How often each twin's threads hand over to each other in a training
    step, from one benchmark round (its counts, not its times, are quoted)."""
    b = load(name)
    k, n = (b[t]["context_switches_per_step"] for t in ("keras", "numpy"))
    s = b["settings"]
    return (f"Context switches per training step: Keras {k['voluntary']:.0f} voluntary + "
            f"{k['involuntary']:.0f} involuntary, the NumPy twin {n['voluntary']:.1f} + "
            f"{n['involuntary']:.1f} (its helper processes included), about "
            f"{k['voluntary'] / n['voluntary']:.0f} times fewer sleeps and wake-ups. Each twin's "
            f"totals over a run of {s['epochs_per_run']} epochs on {s['train_images']:,} images "
            f"(start-up and validation included) over its steps; one round of "
            f"`benchmarks/benchmark.py`. {machine(b['machine'])}")


# --- Layers ------------------------------------------------------------------------------

def layers(name):
    """Where the time goes: each layer's forward and backward pass, both twins."""
    data = load(name)
    step = sum(r["numpy_ms"] for r in data["rows"] if r["pass"])
    rows = []
    for r in data["rows"]:
        k = r["keras_ms"]
        rows.append([r["layer"], r["pass"], f"{r['numpy_ms']:.2f}",
                     "-" if k is None else f"{k:.2f}",
                     "-" if not k else f"{r['numpy_ms'] / k:.2f}",
                     f"{100 * r['numpy_ms'] / step:.1f}%" if r["pass"] else ""])
    found = dict(data["slice_sizes_ms"])
    on_processes = found.pop("processes", None)
    sizes = "on threads in slices of " + ", ".join(f"{s} images {ms:.2f} ms"
                                                  for s, ms in found.items())
    if on_processes is not None:
        sizes += f"; with helper processes (one slice per core): {on_processes:.2f} ms"
    return (_table(["layer", "pass", "NumPy ms", "Keras ms", "ratio", "share of the step"],
                   rows)
            + f"\n\nA batch of {data['batch']}, the fastest of {data['repeats']} runs of each. "
            f"A whole fast step: {sizes}. {machine(data['machine'])}")


def slice_choice(names, chosen):
    """Which slice size was fastest on threads in each layers run, beside the
    one speedup.SLICE uses, and how far the chosen one is from the fastest;
    then what the helper processes made of the whole step."""
    parts, processes = [], []
    for name in names:
        data = load(name)
        found = data["slice_sizes_ms"]
        sizes = {int(s): ms for s, ms in found.items() if s != "processes"}
        best = min(sizes, key=sizes.get)
        kernels = data["machine"]["blas_kernels"]
        parts.append(f"with the {kernels} kernels {best} images was fastest"
                     + ("" if best == chosen else
                        f", {chosen} images {100 * (sizes[chosen] / sizes[best] - 1):.0f}% slower"))
        if "processes" in found:
            change = 100 * (found["processes"] / sizes[best] - 1)
            processes.append(f"{found['processes']:.2f} ms with the {kernels} kernels, "
                             f"{abs(change):.0f}% {'less' if change < 0 else 'more'} than the "
                             f"fastest on threads ({sizes[best]:.2f} ms)")
    text = f"`speedup.SLICE` is {chosen} (on threads): " + "; ".join(parts) + "."
    if processes:
        text += (" With the helper processes (one slice per core) a whole step took "
                 + "; ".join(processes) + ".")
    return text


def aims(cpu_runs, other_runs, layer_names):
    """The speed aims against the runs: a fastest-epoch ratio at most 0.8 with
    the CPU's own kernels in every run, the runs within 10% of each other, at
    most 1.0 with any other kernels, 50% of the best matmul rate, and an
    evaluation no slower than Keras's (from the layers runs)."""
    cpu = [load(n) for n in cpu_runs]
    ratios = [b["ratio_fastest_epochs"] for b in cpu]
    kernels = cpu[0]["machine"]["blas_kernels"]
    met = sum(r <= 0.8 for r in ratios)
    keras = [b["keras"]["fastest_epoch_seconds"] for b in cpu]
    numpy = [b["numpy"]["fastest_epoch_seconds"] for b in cpu]
    shares = [100 * b["numpy_fraction_of_matmul_peak"] for b in cpu]
    text = [f"With the {kernels} kernels the fastest-epoch ratios were "
            + ", ".join(f"{r:.2f}x" for r in ratios)
            + f": at most 0.8 in {met} of {len(ratios)} runs. The largest is "
            f"{max(ratios) / min(ratios):.2f} times the smallest (the aim: within 10%, 1.10): "
            f"Keras's fastest epochs took {min(keras):.2f} to {max(keras):.2f} s, the NumPy "
            f"twin's {min(numpy):.2f} to {max(numpy):.2f} s. The NumPy twin ran at "
            + ", ".join(f"{s:.1f}%" for s in shares)
            + f" of the best matmul rate (the aim: 50%, met in {sum(s >= 50 for s in shares)} "
            f"of {len(shares)})."]
    for name in other_runs:
        b = load(name)
        text.append(f"With the {b['machine']['blas_kernels']} kernels: "
                    f"{b['ratio_fastest_epochs']:.2f}x (the aim: at most 1.0).")
    for name in layer_names:
        data = load(name)
        row = next(r for r in data["rows"] if r["layer"].startswith("evaluate"))
        text.append(f"An evaluation of {row['layer'].split()[-1]} images with the "
                    f"{data['machine']['blas_kernels']} kernels: NumPy {row['numpy_ms']:.2f} ms, "
                    f"Keras {row['keras_ms']:.2f} ms ({row['numpy_ms'] / row['keras_ms']:.2f}x; "
                    f"the aim: at most 1.00x).")
    return " ".join(text)


# --- Agreement -----------------------------------------------------------------------------

def agreement(name="agreement"):
    data = load(name)
    rows = []
    for dtype in ("float32", "float64"):
        d = data[dtype]
        rows.append([dtype, f"{d['dropout_off']['probs']:.1e}", f"{d['dropout_off']['loss']:.1e}",
                     f"{d['dropout_off']['gradients']:.1e}", f"{d['dropout_on']['gradients']:.1e}",
                     f"{d['lockstep']['loss']:.1e}", f"{d['lockstep']['weights']:.1e}"])
    header = ["dtype", "probabilities", "loss", "gradients (dropout off)",
              "gradients (dropout on, same mask)", "20-step lockstep: loss",
              "final weights"]
    return (_table(header, rows) + "\n\nLargest differences between the twins, on the first "
            "64 MNIST test images (the lockstep: 20 batches of 64 training images); "
            "gradients relative to each tensor's largest entry, float64 weights relative, "
            "float32 weights absolute. " + machine(data["machine"]))


def reference(name="agreement"):
    """The NumPy twin against the stored Keras reference, as measured."""
    results = load(name)
    rows = [[r["what"], r["dtype"], f"{r['difference']:.1e}", f"{r['tolerance']:g}"]
            for r in results["reference"]]
    return (_table(["what", "dtype", "largest difference", "tolerance"], rows) + "\n\n"
            + machine(results["machine"]))


def batchnorm_agreement(name="agreement"):
    results = load(name)
    data = results["batchnorm"]
    rows = [[dtype, f"{data[dtype]['dropout_off']['probs']:.1e}",
             f"{data[dtype]['dropout_off']['gradients']:.1e}",
             f"{data[dtype]['lockstep']['loss']:.1e}", f"{data[dtype]['lockstep']['weights']:.1e}"]
            for dtype in ("float32", "float64")]
    return (_table(["dtype", "probabilities", "gradients (relative)", "20-step lockstep: loss",
                    "final weights"], rows)
            + f"\n\nThe network with batch normalization ({data['params']:,} parameters), "
            "the same images and measures as the table of docs/proof.md. "
            + machine(results["machine"]))


def figure(name, key, fmt="{:.1e}"):
    """One number of a results file: key is a dotted path ("float64.lockstep.loss")."""
    value = load(name)
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return fmt.format(value)


# --- Faults -------------------------------------------------------------------------------

def faults_weights(name="faults"):
    data = load(name)
    rows = [[r["case"], f"{r['peak_mb']:.2f} MB", r["message"].replace("|", "/")]
            for r in data["weights_files"]]
    return (_table(["weights file", "memory the load took", "what it says"], rows) + "\n\n"
            + machine(data["machine"]))


def faults_server(name="faults"):
    results = load(name)
    data = results["server"]
    rows = [[r["case"], r["status"], r["expected"]] for r in data["cases"]]
    rows += [[f"at once: {r['case']}", r["status"], r["expected"]]
             for r in data["three_at_once"]]
    keras = max(data["keras_peak_mb"])
    stop = data["seconds_to_stop_after_ctrl_c"]
    return (_table(["request", "status", "expected"], rows)
            + f"\n\nPeak memory: the server's process {data['server_peak_mb']:.0f} MB; the "
            f"Keras twin's process {max(data['at_start']['keras_mb']):.0f} MB after loading, "
            f"{keras:.0f} MB after the attacks. A drawing sent afterwards was read: "
            f"{'yes' if data['drawing_read'] else 'NO'}; a traceback in the server's log: "
            f"{'YES' if data['traceback_in_log'] else 'none'}; "
            + (f"after Ctrl-C (SIGINT) it stopped in {stop:.1f} s. " if stop is not None
               else "after Ctrl-C (SIGINT) it had NOT stopped within 60 s. ")
            + machine(results["machine"]))


# --- From the code ------------------------------------------------------------------------

def params(network=None):
    """The NumPy twin's parameter count: of the default network, or of a
    copy with one of helpers/edits.py's edits (as docs/change.md tells a
    learner to make them)."""
    from helpers import edits
    if network is None:
        import mnist_cnn_numpy as nt
        return f"{nt.build_model().count_params():,}"
    return f"{edits.numpy_model(network).count_params():,}"


def flags(parser=None):
    """A script's flags and defaults, from its own argparse parser (both
    twins' by default)."""
    import argparse
    from helpers import common
    parser = parser or common.parser("")
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        if action.choices:
            flag += " {" + ",".join(action.choices) + "}"
        elif action.nargs != 0:
            flag += f" {action.metavar or action.dest.upper()}"
            if action.nargs == "+":
                flag += " ..."
        text = action.help or ""
        default = "off" if action.default is False else (
            "-" if action.default is None else f"{action.default:,}"
            if isinstance(action.default, int) else str(action.default))
        if "; default: " in text:
            text, default = text.split("; default: ")
        rows.append([f"`{flag}`", default.replace("|", "/"), text])
    return _table(["flag", "default", "meaning"], rows)


def tolerances():
    """The proof's tolerances, from tests/proof.py and compare.py."""
    sys.path.insert(0, str(REPO / "tests"))
    import compare
    import proof
    rows = []
    for dtype in ("float32", "float64"):
        probs, grads, lock = compare.REFERENCE_TOL[dtype]
        rows.append([dtype, f"{proof.FORWARD_TOL[dtype]:g}", f"{proof.GRAD_TOL[dtype]:g}",
                     f"{proof.LOCKSTEP_TOL[dtype][0]:g}", f"{proof.LOCKSTEP_TOL[dtype][1]:g}",
                     f"{probs:g} / {grads:g} / {lock:g}"])
    return (_table(["dtype", "probabilities and loss", "gradients (relative)",
                    "lockstep losses", "lockstep final weights",
                    "against the stored reference: probabilities / gradients / losses"], rows)
            + f"\n\nWeights exchanged: the same predicted class on at least "
            f"{100 * proof.SAME_PREDICTION:g}% of the test images.")


def one_twin_edited():
    """What a learner sees who made docs/change.md's edit in the NumPy twin
    only: its weights file refused by the other twin's network, in the
    weights file's own words (the NumPy twin stands in for the unedited
    Keras twin: both read the same shapes)."""
    import tempfile
    from helpers import common, edits
    import mnist_cnn_numpy as nt
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results" / "numpy.weights.npz"
        path.parent.mkdir()
        common.save_weights(path, edits.numpy_model("smaller").get_weights())
        try:
            common.load_weights(path, nt.build_model().weight_shapes())
        except common.UserError as e:
            return "Error: " + str(e).replace(str(Path(tmp)) + "/", "")
    raise AssertionError("the edited weights loaded into the default network")


def non_trainable(network):
    """How many of an edited network's weights are not trained (batch
    normalization's moving statistics)."""
    from helpers import edits
    model = edits.numpy_model(network)
    trainable = sum(getattr(layer, part).size for layer in model.layers
                    for part in layer.params)
    return f"{model.count_params() - trainable:,}"


def summary(default="default-runs", fashion="default-runs-fashion",
            fast=("benchmark-cpu-1", "benchmark-cpu-2", "benchmark-cpu-3"),
            other=("benchmark-haswell",)):
    """The README's one table: both twins' accuracy, speed and memory, from
    the default runs and the benchmark runs."""
    runs_file = load(default)
    runs, fashion_runs = runs_file["runs"], load(fashion)["runs"]
    fast_b, other_b = [load(n) for n in fast], [load(n) for n in other]

    def span(values, fmt):
        values = sorted(values)
        return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])} - {fmt(values[-1])}"

    def accuracy(twin, rows):
        return span([r["test_accuracy"] for r in rows if r["twin"] == twin], pct)

    def fastest(twin, results):
        return span([b[twin]["fastest_epoch_seconds"] for b in results], "{:.2f} s".format)

    def ratios(results):
        return "**" + span([b["ratio_fastest_epochs"] for b in results], "{:.2f}x".format) + "**"

    def memory(twin):
        return f"{max(r['peak_memory_mb'] for r in runs if r['twin'] == twin):.0f} MB"

    def seeds(rows):
        return ", ".join(str(s) for s in sorted({r["seed"] for r in rows}))

    header = ["", f"MNIST test accuracy (seeds {seeds(runs)})",
              f"Fashion-MNIST (seed {seeds(fashion_runs)})",
              f"fastest epoch, {fast_b[0]['machine']['blas_kernels']} kernels "
              f"({len(fast_b)} runs)",
              f"fastest epoch, {other_b[0]['machine']['blas_kernels']} kernels",
              "peak memory (default runs)"]
    rows = [[name, accuracy(twin, runs), accuracy(twin, fashion_runs), fastest(twin, fast_b),
             fastest(twin, other_b), memory(twin)]
            for name, twin in (("Keras twin", "keras"), ("NumPy twin", "numpy"))]
    rows.append(["NumPy / Keras", "", "", ratios(fast_b), ratios(other_b), ""])
    first = runs[0]
    return (_table(header, rows) + f"\n\nThe default command ({first['epochs']} epochs on "
            f"{first['train_images']:,} training images; `benchmarks/default_runs.py`) and the "
            "benchmark's fastest epochs, both twins in the same run "
            "(`benchmarks/benchmark.py`). " + machine(runs_file["machine"], kernels=False,
                                                      when=_dates(runs_file, fast_b + other_b)))


def _dates(default_file, benchmarks):
    """When the summary's default runs and benchmarks were measured: one
    date, or each part's where they differ."""
    first = default_file["machine"]["date"]
    later = sorted({b["machine"]["date"] for b in benchmarks})
    if later == [first]:
        return first
    return f"{first} (default runs) and {', '.join(later)} (benchmarks)"
