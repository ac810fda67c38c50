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
(the default) leave the libraries to choose, which is faster on CPUs with AVX-512 or more cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
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


def current() -> str:
    """``portable`` when every pin is in this process's environment, else ``native``."""
    return "portable" if all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items()) else "native"


def tag() -> str:
    """A name for the numerics, for files that depend on them: empty when native, else the pins' digest."""
    if current() == "native":
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
