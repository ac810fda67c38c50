"""The blob store: atomic writes, keys that cannot escape, local and fsspec (memory://) back ends."""

import hashlib
import uuid
from pathlib import Path

import pytest

from service.storage import Storage, StorageError


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


def test_remove_temporaries_deletes_only_what_killed_writers_left_under_the_prefix(store: Storage) -> None:
    def plant(key: str) -> None:  # what writer() leaves when its process dies before the move
        store.fs.makedirs(store.path(key).rsplit("/", 1)[0], exist_ok=True)
        store.fs.pipe(store.path(key), b"partial")

    with store.writer("jobs/1/checkpoint.safetensors") as f:
        f.write(b"whole")
    stale = ["jobs/1/checkpoint.safetensors.tmp-" + "a" * 32, "jobs/1/artifacts/m.safetensors.tmp-" + "0f" * 16]
    kept = ["jobs/1/notes.tmp-draft", "jobs/10/checkpoint.safetensors.tmp-" + "b" * 32]
    for key in stale + kept:
        plant(key)
    assert sorted(store.remove_temporaries("jobs/1")) == sorted(stale)
    assert not any(store.exists(k) for k in stale)
    assert all(store.exists(k) for k in kept) and store.exists("jobs/1/checkpoint.safetensors")
    assert store.remove_temporaries("jobs/1") == [] and store.remove_temporaries("jobs/404") == []


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a/../../b", "", "a\\b"])
def test_keys_cannot_escape(store: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="bad storage key"):
        store.path(key)
