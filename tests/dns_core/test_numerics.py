"""Portable numerics: the same floating-point results whatever the CPU's width or core count."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dns_core import numerics
from dns_core.data import Dataset
from dns_core.errors import ConfigError
from dns_core.reference import cached_reference


def _has_avx2() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return platform.machine() in ("x86_64", "AMD64") and cpuinfo.exists() and " avx2" in cpuinfo.read_text()


needs_avx2 = pytest.mark.skipif(not _has_avx2(), reason="portable numerics need an x86-64 CPU with AVX2")

# trains a LeNet-5 (convolutions: oneDNN splits their gradients over threads) on seeded random data and
# prints the kernels, the thread count and a digest of the weights
TRAIN = """
import hashlib, json, sys
from dns_core import numerics
numerics.use(sys.argv[1])
numerics.check()
import torch
from dns_core import models
torch.manual_seed(0)
model = models.build("lenet-5")
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
for _ in range(30):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(model.state_dict().items())))
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                  "digest": digest.hexdigest()}))
"""


def _train(mode: str, threads: int) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV and k != numerics.ENV_VAR}
    env["OMP_NUM_THREADS"] = str(threads)  # the machine's core count, as torch sees it
    out = subprocess.run([sys.executable, "-c", TRAIN, mode], env=env, capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@needs_avx2
def test_portable_numerics_train_the_same_weights_whatever_the_thread_count() -> None:
    one, two = _train("portable", 1), _train("portable", 2)
    assert one["capability"] == two["capability"] == "AVX2"
    assert one["threads"] == two["threads"] == numerics.THREADS
    assert one["digest"] == two["digest"]
    native = _train("native", 1)
    assert native["threads"] == 1  # the machine's own count, where the convolutions' sums split differently


def test_numerics_are_chosen_before_torch_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in numerics.PORTABLE_ENV:
        monkeypatch.delenv(key, raising=False)
    assert numerics.current() == "native"
    numerics.use("native")  # already so: nothing to do
    with pytest.raises(ConfigError, match="before torch is imported"):
        numerics.use("portable")  # this process has torch loaded: the libraries have read their switches
    assert numerics.current() == "native"
    with pytest.raises(ConfigError, match="unknown numerics"):
        numerics.use("fast")


def test_references_are_cached_apart_per_numerics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    monkeypatch.setenv("NETSURGERY_CACHE", str(tmp_path))
    for key in numerics.PORTABLE_ENV:
        monkeypatch.delenv(key, raising=False)
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    _, cached = cached_reference("lenet-300-100", data, tag="t", epochs=1)
    assert not cached
    for key, value in numerics.PORTABLE_ENV.items():
        monkeypatch.setenv(key, value)
    assert numerics.current() == "portable"
    _, cached = cached_reference("lenet-300-100", data, tag="t", epochs=1)
    assert not cached  # the native reference is another model: trained again, stored apart
    _, cached = cached_reference("lenet-300-100", data, tag="t", epochs=1)
    assert cached
    assert numerics.tag().startswith("portable-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"ref-lenet-300-100-t-e1-s0-{numerics.tag()}.safetensors",
        "ref-lenet-300-100-t-e1-s0.safetensors",
    ]


@needs_avx2
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_bench_records_the_numerics_it_ran_with(tmp_path: Path, how: str) -> None:
    out = tmp_path / "overhead.json"
    argv = [sys.executable, "-m", "netsurgery", "bench", "overhead", "--steps", "3", "--results", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV and k != numerics.ENV_VAR}
    env["OMP_NUM_THREADS"] = "1"
    if how == "flag":
        argv += ["--numerics", "portable"]
    else:
        env[numerics.ENV_VAR] = "portable"
    subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    machine = json.loads(out.read_text())["machine"]
    assert machine["numerics"] == "portable"
    assert machine["numerics_pins"] == numerics.PORTABLE_ENV
    assert machine["cpu_capability"] == "AVX2"
    assert machine["torch_threads"] == numerics.THREADS


def test_bench_refuses_unknown_numerics() -> None:
    out = subprocess.run([sys.executable, "-m", "netsurgery", "bench", "overhead", "--numerics", "fast"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert "invalid choice: 'fast'" in out.stderr
