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
from tests.fashion import stand_in_fashion_mnist


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


def _bench(tmp_path: Path, which: str, flags: list[str], env_mode: str | None) -> dict[str, object]:
    """``netsurgery bench <which>`` (overhead: 3 steps; table: the quick table, 60 iterations, on a stand-in
    Fashion-MNIST) in a fresh process that inherits no pins; the machine block of its record."""
    out = tmp_path / f"{which}.json"
    size = ["--steps", "3"] if which == "overhead" else ["--quick", "--models", "lenet-300-100", "--iterations", "60"]
    argv = [sys.executable, "-m", "netsurgery", "bench", which, *size, "--results", str(out), *flags]
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV and k != numerics.ENV_VAR}
    env |= {"OMP_NUM_THREADS": "1", "NETSURGERY_CACHE": str(tmp_path / "cache"),
            "NETSURGERY_FASHION_MNIST": str(stand_in_fashion_mnist(tmp_path / "fashion"))}  # fmt: skip
    if env_mode is not None:
        env[numerics.ENV_VAR] = env_mode
    subprocess.run(argv, env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    machine: dict[str, object] = json.loads(out.read_text())["machine"]
    return machine


def _is_portable(machine: dict[str, object]) -> bool:
    assert machine["numerics"] in numerics.MODES
    if machine["numerics"] == "native":
        assert machine["numerics_pins"] == {}
        assert machine["torch_threads"] == 1  # the machine's own count (OMP_NUM_THREADS), not the pinned two
        return False
    assert machine["numerics_pins"] == numerics.PORTABLE_ENV
    assert machine["cpu_capability"] == "AVX2"
    assert machine["torch_threads"] == numerics.THREADS
    return True


@needs_avx2
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_bench_runs_portable_numerics_when_asked_and_records_them(tmp_path: Path, how: str) -> None:
    flags = ["--numerics", "portable"] if how == "flag" else []
    assert _is_portable(_bench(tmp_path, "overhead", flags, "portable" if how == "environment" else None))


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_bench_runs_native_numerics_when_asked(tmp_path: Path, how: str) -> None:
    flags = ["--numerics", "native"] if how == "flag" else []
    assert not _is_portable(_bench(tmp_path, "table", flags, "native" if how == "environment" else None))


@needs_avx2
def test_accuracy_benchmarks_default_to_portable_numerics_timing_ones_to_native(tmp_path: Path) -> None:
    if numerics.gpu_present():
        pytest.skip("on a machine with a GPU every default is native")
    assert _is_portable(_bench(tmp_path, "table", [], None))
    assert not _is_portable(_bench(tmp_path, "overhead", [], None))


def test_the_portable_default_needs_avx2_and_fma(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    real = Path

    def fake(path: str) -> Path:
        return cpuinfo if path == "/proc/cpuinfo" else real(path)

    monkeypatch.setattr(numerics, "Path", fake)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for flags, expected in (("fpu sse2 avx avx2 fma bmi2", True), ("fpu sse2 avx fma", False), ("avx avx2", False)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert numerics.available() is expected, flags
    cpuinfo.unlink()
    assert not numerics.available()  # no /proc/cpuinfo (macOS, Windows): native
    cpuinfo.write_text("flags\t\t: avx2 fma\n")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not numerics.available()
    assert numerics.default("portable") == "native" and numerics.default("native") == "native"


def test_the_portable_default_gives_way_to_native_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numerics, "available", lambda: True)
    monkeypatch.setattr(numerics, "gpu_present", lambda: False)
    assert numerics.default("portable") == "portable"
    monkeypatch.setattr(numerics, "gpu_present", lambda: True)
    assert numerics.default("portable") == "native"
    assert numerics.default("native") == "native"


def test_bench_refuses_unknown_numerics() -> None:
    out = subprocess.run([sys.executable, "-m", "netsurgery", "bench", "overhead", "--numerics", "fast"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert "invalid choice: 'fast'" in out.stderr
    # the same word in the environment: one line that names the choices, no traceback
    env = {**os.environ, "NETSURGERY_NUMERICS": "fast"}
    out = subprocess.run([sys.executable, "-m", "netsurgery", "bench", "overhead", "--steps", "1"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip() == "netsurgery: unknown numerics 'fast'; choose native or portable"


def test_accuracy_benchmarks_and_the_quickstart_prefer_portable_numerics_timing_and_the_service_native() -> None:
    from netsurgery.cli import build_parser

    parser = build_parser()
    commands = {"bench search": ["bench", "search"], "bench table": ["bench", "table"], "demo": ["demo"],
                "bench overhead": ["bench", "overhead"], "bench service": ["bench", "service"], "serve": ["serve"],
                "worker": ["worker"]}  # fmt: skip
    preferred = {}
    for name, argv in commands.items():
        choice = parser.parse_args(argv).numerics_default
        preferred[name] = choice(parser.parse_args(argv)) if callable(choice) else choice
    assert preferred == {"bench search": "portable", "bench table": "portable", "demo": "portable",
                         "bench overhead": "native", "bench service": "native", "serve": "native",
                         "worker": "native"}  # fmt: skip
