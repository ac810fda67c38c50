from __future__ import annotations

import pytest
import torch

from dns_core.data import Dataset, load_digits


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETSURGERY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def digits() -> tuple[Dataset, Dataset]:
    torch.manual_seed(0)
    return load_digits()
