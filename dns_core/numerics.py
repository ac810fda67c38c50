"""CPU numerics that give the same floating-point results on every x86-64 machine with AVX2.

PyTorch's CPU build picks its kernels by the processor it runs on: ATen's vectorised kernels use
AVX-512 where the CPU has it and AVX2 otherwise, MKL's GEMM dispatches per processor family, and
oneDNN's JIT convolutions use the widest instruction set available. Each choice sums in another
order, so the same seed trains another model on another machine, and a benchmark's figures move
with the machine rather than with the code.

*Portable* numerics pin all three through their own switches: ATen's kernels to AVX2
(``ATEN_CPU_CAPABILITY``), oneDNN's to AVX2 at most (``ONEDNN_MAX_CPU_ISA``), and MKL to its
conditional numerical reproducibility on the ``COMPATIBLE`` branch (``MKL_CBWR``), the one branch
that MKL documents as giving the same results on Intel and on other vendors' processors (its AVX2
branch falls back to per-processor dispatch on AMD), in strict mode, which also makes GEMM
independent of memory alignment. MKL's GEMM runs slower on that branch (SSE2 code): a
LeNet-300-100 trains about 1.6x slower than with its AVX2 branch. The libraries read them once, when
they first run, so they are set before torch is imported: :func:`use` refuses afterwards. Child
processes (the embedded service's worker) inherit them. The thread count is pinned too
(:data:`THREADS`): oneDNN splits a convolution's gradient over threads, so a LeNet-5 trained on
one thread and on two differs in its last bits (fully connected layers do not). *Native* numerics
leave the libraries to choose, which is faster on CPUs with AVX-512 or more cores.

The service's processes (``serve``, ``worker``) and the timing benchmarks run native numerics unless
told otherwise; the benchmarks that train to accuracy figures and the quickstart's ``demo`` run
portable ones where the CPU has them and no GPU does the training (:func:`default`), so that their
figures are the same on every such machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: the environment that pins each library's CPU code path (ATen and oneDNN to AVX2, MKL to its COMPATIBLE branch)
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
#: the intra-op thread count under portable numerics, whatever the machine's core count
THREADS = 2
MODES = ("native", "portable")
#: the environment variable that chooses the mode for commands that do not name one
ENV_VAR = "NETSURGERY_NUMERICS"


def use(mode: str) -> None:
    """Choose ``mode`` for this process and its children; must run before torch is imported."""
    if mode not in MODES:
        raise ConfigError(f"unknown numerics {mode!r}; choose {' or '.join(MODES)}")
    if mode == current():
        return
    if "torch" in sys.modules:
        raise ConfigError(f"{mode} numerics must be chosen before torch is imported")
    os.environ[ENV_VAR] = mode
    for key, value in PORTABLE_ENV.items():
        if mode == "portable":
            os.environ[key] = value
        else:
            os.environ.pop(key, None)


def available() -> bool:
    """Whether this CPU runs portable numerics: x86-64 with AVX2 and FMA (read from ``/proc/cpuinfo``, before torch
    loads; elsewhere, False)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.partition(":")[2].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx2" in flags and "fma" in flags


def gpu_present() -> bool:
    """Whether an NVIDIA driver is loaded here (read before torch loads): a run would train on the GPU."""
    return Path("/proc/driver/nvidia/version").exists()


def default(preferred: str) -> str:
    """A command's numerics when it names none: ``preferred``, except that a portable preference falls back to
    native where the CPU cannot run it or where a GPU would do the training (its results do not depend on these
    pins, and two threads would only slow the CPU side)."""
    if preferred == "portable" and (not available() or gpu_present()):
        return "native"
    return preferred


def current() -> str:
    """``portable`` when every pin is in this process's environment, else ``native``."""
    return "portable" if all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items()) else "native"


def tag(mode: str | None = None) -> str:
    """A name for ``mode`` (default: this process's numerics), for files that depend on them: empty when native,
    else the pins' digest."""
    if (mode or current()) == "native":
        return ""
    pins = json.dumps({**PORTABLE_ENV, "threads": THREADS}, sort_keys=True).encode()
    return f"portable-{hashlib.sha256(pins).hexdigest()[:8]}"


def check() -> None:
    """Under portable numerics, pin torch's thread count; refuse where torch runs without AVX2 kernels."""
    if current() != "portable":
        return
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        raise ConfigError(f"portable numerics need an x86-64 CPU with AVX2; torch runs {capability} kernels here")
    torch.set_num_threads(THREADS)


def describe() -> dict[str, Any]:
    """The mode and the kernels torch runs, for a benchmark's record."""
    import torch

    pins = {k: os.environ[k] for k in PORTABLE_ENV} if current() == "portable" else {}
    return {"numerics": current(), "numerics_pins": pins, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
