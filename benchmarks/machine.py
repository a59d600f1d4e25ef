"""What a measurement was measured on: the CPU, the BLAS library and its
kernels, the versions of Python, NumPy, TensorFlow and Keras, and the date.
Every results file the docs quote carries this (benchmarks/*.py write it)."""

import json
import os
import platform
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path


def cpu_model():
    """The CPU's model name as the kernel reports it, with its family and model
    numbers (a virtual machine may hide the exact name)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    return (f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family')}, "
            f"model {fields.get('model')}, {os.cpu_count()} cores"
            + (", AVX-512" if "avx512f" in fields.get("flags", "") else "") + ")")


def child_environment(kernels):
    """The environment for a child process with these OpenBLAS kernels:
    "as-set" leaves it alone, "cpu" lets OpenBLAS pick for the CPU, a name
    (Haswell, SkylakeX, ...) forces those."""
    env = dict(os.environ)
    if kernels == "cpu":
        env.pop("OPENBLAS_CORETYPE", None)
    elif kernels != "as-set":
        env["OPENBLAS_CORETYPE"] = kernels
    return env


def run_script(cmd, cwd, log_path, env=None):
    """Run a twin's script as a child process, its output to log_path; return
    its resource usage (wait4 gives this one child's: ru_utime + ru_stime,
    the CPU time it and the helper processes it waited for used) and its
    peak memory in MB: the largest sum, sampled every 20 ms, of the resident
    memory of the child and every process it started (the NumPy twin's
    helper processes; pages they share with it count once in each, so the
    sum errs on the high side), or ru_maxrss if that is more. A run that
    fails is a UserError that shows the end of its log."""
    from helpers import common             # the scripts that call this put the repo first
    peak, done = [0.0], threading.Event()

    def sample(pid):
        while not done.wait(0.02):
            peak[0] = max(peak[0], sum(resident_mb(p) for p in process_tree(pid)))

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
            sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise common.UserError(f"{Path(cmd[1]).name} failed; its output is in {log_path}:\n"
                               + Path(log_path).read_text()[-2000:])
    return usage, max(peak[0], usage.ru_maxrss / 1024)


def process_tree(pid):
    """pid and every process below it (Linux's /proc; elsewhere pid alone)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return tree


def resident_mb(pid):
    """A process's resident memory (VmRSS) in MB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def blas_info(kernels="as-set"):
    """Which BLAS library NumPy uses and which of its CPU kernels, in a child
    process with that environment (OpenBLAS picks kernels by CPU model when
    it loads; OPENBLAS_CORETYPE overrides it)."""
    code = ("import json, numpy; from threadpoolctl import threadpool_info; print(json.dumps("
            "[{k: lib.get(k) for k in ('internal_api', 'version', 'architecture', "
            "'num_threads')} for lib in threadpool_info() if lib.get('user_api') == 'blas']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=child_environment(kernels), check=True)
    return json.loads(result.stdout)


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(kernels="as-set"):
    """{"cpu", "cores", "blas", "python", "numpy", "tensorflow", "keras", "date"}."""
    blas = blas_info(kernels)
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "blas": blas, "blas_kernels": ", ".join(b["architecture"] for b in blas),
            "blas_kernels_asked": kernels, "python": platform.python_version(),
            "numpy": _version("numpy"), "tensorflow": _version("tensorflow"),
            "keras": _version("keras"), "date": time.strftime("%Y-%m-%d")}
