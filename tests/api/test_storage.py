"""The blob store: atomic writes, keys that cannot escape, local and fsspec (memory://) back ends."""

import hashlib
import uuid
from pathlib import Path

import pytest

from api.storage import Storage, StorageError


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    return Storage(f"memory://netsurgery-test-{uuid.uuid4().hex}")


def test_put_fetch_delete(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3_000_000)
    stored = store.put_file("jobs/1/model.onnx", src)
    assert stored.size == 3_000_000 and stored.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.exists("jobs/1/model.onnx") and store.size("jobs/1/model.onnx") == 3_000_000
    with store.fetch("jobs/1/model.onnx") as local:
        assert local.read_bytes() == src.read_bytes()
    store.delete_prefix("jobs/1")
    assert not store.exists("jobs/1/model.onnx")
    with pytest.raises(StorageError):
        store.size("jobs/1/model.onnx")


def test_a_failed_write_leaves_the_previous_blob(store: Storage) -> None:
    with store.writer("a/b") as f:
        f.write(b"first")
    with pytest.raises(RuntimeError), store.writer("a/b") as f:
        f.write(b"half of the second")
        raise RuntimeError("killed mid-write")
    with store.open("a/b") as f:
        assert f.read() == b"first"
    assert store.fs.ls(store.path("a"), detail=False) == [store.path("a/b")]  # no temporary left behind


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a/../../b", "", "a\\b"])
def test_keys_cannot_escape(store: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="bad storage key"):
        store.path(key)
