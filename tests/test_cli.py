import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from dns_core.artifacts import sha256_file
from dns_core.io import load_model, save_model
from dns_core.sparse import load_sparse
from netsurgery.cli import main


def test_compress_on_digits_writes_model_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "compress",
            "--data",
            "digits",
            "--iterations",
            "300",
            "--target",
            "8",
            "--max-drop",
            "5",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--checkpoint",
            str(tmp_path / "c.ckpt"),
            "--checkpoint-every",
            "100",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "dns"
    assert report["arch"] == "lenet-300-100"
    assert [layer["name"] for layer in report["layers"]] == ["fc1", "fc2", "fc3"]
    assert report["compression"] > 5
    model, _arch = load_model(out / "model.safetensors")
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    assert nonzero == report["nonzero_parameters"]
    printed = capsys.readouterr().out
    assert "fc1" in printed and "accuracy" in printed and "sparse file:" in printed
    sparse = load_sparse(out / "model.sparse.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(sparse[key], value), key
    assert report["bytes"]["sparse_file"] == (out / "model.sparse.safetensors").stat().st_size
    assert report["bytes"]["sparse_file"] < (out / "model.safetensors").stat().st_size / 3
    for name in ("model.safetensors", "model.sparse.safetensors"):
        assert report["outputs"][name] == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    assert report["versions"]["torch"] == version("torch") and report["versions"]["onnx"] == version("onnx")
    assert report["train"]["seed"] == 0
    assert report["budget_met"] == (report["reference_val_acc"] - report["val_acc"] <= 5)

    assert main(["pack", str(out / "model.safetensors"), "--out", str(tmp_path / "p.safetensors")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bytes"] == (tmp_path / "p.safetensors").stat().st_size
    assert last["overhead"] <= 1.3
    assert main(["pack", str(out / "model.safetensors"), "--codec", "shared", "--clusters", "32"]) == 0
    coded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert coded["codec"] == "shared" and coded["bytes"] < 0.6 * last["bytes"]
    assert main(["pack", str(out / "model.safetensors"), "--codec", "int8", "--data", "digits"]) == 2
    assert "no test split" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "--data", "cifar"], "--data cifar: no such file, and not a built-in set"),
        (["compress", "--data", "digits", "--weights", "/nonexistent.safetensors"], "cannot load weights"),
        (["compress", "--data", "digits", "--method", "dns-fixed-crates", "--crates", "fc1"], "expected name=number"),
        (["compress", "--data", "digits", "--include", "conv*"], "matches no Linear/Conv/attention layer"),
        (["compress", "--data", "digits", "--target", "0.5"], "target compression must be"),
        (["compress", "--data", "digits", "--target", "5", "--gamma", "0.01"], "gamma set(s) the thresholds of the"),
        (["bench", "table", "--models", "resnet-9000"], "unknown model"),
        (["pack", "/nonexistent.safetensors"], "cannot load weights"),
    ],
)
def test_errors_are_one_clear_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_refuses_a_pickle_as_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    # a pickle that would create the sentinel file if anything unpickled it
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(sentinel).encode() + b"'\ntR.")
    assert main(["compress", "--data", "digits", "--weights", str(evil)]) == 2
    err = capsys.readouterr().err
    assert "cannot load weights" in err and "is a pickle" in err
    assert not sentinel.exists()


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "netsurgery", "--help"], capture_output=True, text=True, check=True)
    assert "compress" in out.stdout and "bench" in out.stdout


def test_cli_does_not_import_web_packages() -> None:
    code = (
        "import sys, netsurgery.cli, dns_core.bench; "
        "print(sorted(m for m in ('fastapi', 'celery', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


#: What `pip install netsurgery` (no extras) leaves out, and the service's own packages.
SERVICE_PACKAGES = ("fastapi", "starlette", "uvicorn", "celery", "kombu", "sqlalchemy", "alembic", "psycopg",
                    "pydantic", "redis", "httpx", "service", "api", "worker")  # fmt: skip

#: ``python -c`` this: an import of any of SERVICE_PACKAGES fails, then ``netsurgery`` runs with the arguments.
WITHOUT_SERVICE = f"""
import sys
from importlib.abc import MetaPathFinder

class Blocked(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {SERVICE_PACKAGES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
from netsurgery.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def user_files(tmp_path: Path) -> None:
    """A user's own files in ``tmp_path``: ``data.npz`` (digits) and ``dense.safetensors`` (an untrained zoo model)."""
    import numpy as np

    from dns_core import models
    from dns_core.data import load_digits

    train, _ = load_digits()
    np.savez(tmp_path / "data.npz", inputs=train.inputs.numpy(), targets=train.targets.numpy())  # type: ignore[union-attr]
    torch.manual_seed(0)
    save_model(tmp_path / "dense.safetensors", models.build("lenet-300-100"), "lenet-300-100")


def test_compress_runs_without_the_service_packages(tmp_path: Path, user_files: None) -> None:
    """`netsurgery compress` (and the parser of every command) works where no service package can load."""
    out = tmp_path / "out"
    argv = ["compress", "--model", str(tmp_path / "dense.safetensors"), "--data", str(tmp_path / "data.npz"),
            "--iterations", "100", "--target", "4", "--max-drop", "100", "--device", "cpu",
            "--out", str(out)]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", WITHOUT_SERVICE, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "report.json").read_text())["compression"] > 1
    for command, extra in (("serve", "service"), ("migrate", "service"), ("jobs", "client")):
        done = subprocess.run([sys.executable, "-c", WITHOUT_SERVICE, command], capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.endswith(f"extra: pip install 'netsurgery[{extra}]'\n"), done.stderr


def test_compress_user_files_with_a_codec(tmp_path: Path, user_files: None, capsys: pytest.CaptureFixture[str]) -> None:
    """A zoo model and .npz data of the user's own, a value codec, and a report that hashes every file."""
    out = tmp_path / "out"
    argv = ["compress", "--model", str(tmp_path / "dense.safetensors"), "--data", str(tmp_path / "data.npz"),
            "--iterations", "200", "--target", "5", "--max-drop", "100", "--codec", "int8",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"]["model"]["sha256"] == sha256_file(tmp_path / "dense.safetensors")
    assert report["inputs"]["data"]["sha256"] == sha256_file(tmp_path / "data.npz")
    codec = report["value_codec"]
    assert codec["codec"] == "int8" and codec["file"] == "model.sparse.int8.safetensors"
    assert codec["bytes"] == (out / codec["file"]).stat().st_size < report["bytes"]["sparse_file"]
    assert 0 <= codec["val_acc"] <= 100 and codec["test_acc"] is None
    assert report["outputs"][codec["file"]]["sha256"] == sha256_file(out / codec["file"])
    assert "int8 values:" in capsys.readouterr().out


def test_refused_files_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ts = tmp_path / "model.onnx"
    torch.jit.script(torch.nn.Linear(784, 10)).save(str(ts))  # type: ignore[no-untyped-call]
    assert main(["compress", "--data", "digits", "--model", str(ts)]) == 2
    err = capsys.readouterr().err
    assert "TorchScript" in err and "Traceback" not in err
    bad = tmp_path / "d.npz"
    bad.write_bytes(b"PK\x03\x04garbage")
    assert main(["compress", "--data", str(bad), "--model", str(ts)]) == 2
    assert "cannot use the data" in capsys.readouterr().err


def test_an_onnx_model_comes_back_as_onnx_that_onnxruntime_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ONNX (a CNN with BatchNorm and a residual block) → torch → surgery → ONNX → onnxruntime."""
    import numpy as np
    import onnx

    from dns_core.onnx_convert import load_onnx
    from dns_core.onnx_export import check_with_onnxruntime
    from tests.dns_core.test_onnx import cnn_model

    model = cnn_model(c=8, classes=10, size=12)
    onnx.save(model, str(tmp_path / "cnn.onnx"))
    g = np.random.default_rng(0)
    x = g.normal(size=(240, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "data.npz", inputs=x, targets=(x[:, 0].mean((1, 2)) > 0).astype(np.int64) * 3)
    out = tmp_path / "out"
    argv = ["compress", "--model", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / "data.npz"),
            "--iterations", "120", "--target", "3", "--max-drop", "100", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    candidates = {c["file"] for c in report["frontier"]["candidates"][1:]}  # the budget's lower rungs
    assert report["format"] == "onnx" and set(report["outputs"]) == {
        "model.onnx",
        "model.sparse.safetensors",
        "report.html",
        "compression.png",
        "accuracy.png",
        "layers.png",
        *candidates,
    }
    exported = (out / "model.onnx").read_bytes()
    back = onnx.load_from_string(exported)
    assert [i.name for i in back.graph.input] == ["x"] and [o.name for o in back.graph.output] == ["logits"]
    module = load_onnx(exported)
    assert check_with_onnxruntime(module, exported, n=4, atol=1e-4) <= 1e-4
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in back.graph.initializer}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.size for w in weights.values())
    assert zeros > 0.5 * total  # 3x asked: most weights are exactly zero in the ONNX file
    sparse = load_sparse(out / "model.sparse.safetensors")
    assert sparse.keys() == module.state_dict().keys()
    # every tensor agrees but BatchNorm's step counters, which ONNX has no field for
    differ = [k for k, v in module.state_dict().items() if not torch.equal(sparse[k], v)]
    assert differ and all(k.endswith("num_batches_tracked") for k in differ)
    assert "model.onnx" in capsys.readouterr().out


def test_an_input_error_is_one_line_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An engine InputError (here: Fashion-MNIST missing) ends the command with its sentence and exit 2."""
    monkeypatch.setenv("NETSURGERY_FASHION_MNIST", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "table", "--quick", "--models", "lenet-5", "--methods", "dns"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("netsurgery: Fashion-MNIST not found"), err
    assert "Traceback" not in err
    assert not (tmp_path / "docs").exists()  # nothing written for a run that never started


def test_train_reference_prints_progress_lines_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    """Piped (a batch job, tee, CI), the output shows each evaluation as it happens, before the end."""
    out = tmp_path / "ref.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-m", "netsurgery", "train-reference", "--data", "digits", "--epochs", "3", "--device", "cpu",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if len(lines) == 1:
            assert not out.exists()  # the first line comes while training runs, not after it
    assert proc.wait(timeout=300) == 0, lines
    progress = [line for line in lines if line.startswith("reference lenet-300-100: ")]
    assert len(progress) >= 10 and all(" loss " in line for line in progress), lines
    done = [int(line.split(": ")[1].split("/")[0].replace(",", "")) for line in progress]
    assert done == sorted(done) and done[-1] == 69, lines  # 3 epochs of 23 batches
    assert lines[-1].startswith(f"saved {out}: lenet-300-100, ") and "\x1b" not in "".join(lines)
