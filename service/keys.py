"""The storage-key layout: where each stored file lives, relative to ``Settings.storage_url``.

::

    models/<model id>/model.<suffix>              an uploaded model (onnx, safetensors, or a zip bundle)
    datasets/<dataset id>/inputs.<kind>           an uploaded data set (npz, safetensors, idx, or images:
                                                  a zip or tar of class folders)
    datasets/<dataset id>/targets.idx             its IDX labels, when uploaded beside IDX inputs
    jobs/<job id>/checkpoint.safetensors          a running job's latest checkpoint
    jobs/<job id>/artifacts/<name>                what a finished job produced

Each resource's files sit under one prefix, removed whole when the resource is deleted. The
``uri`` columns of ``models``, ``datasets`` and ``artifacts`` hold these keys.
"""

from __future__ import annotations

import uuid
from typing import Final

#: The file name of a job's checkpoint.
CHECKPOINT: Final = "checkpoint.safetensors"


def model_prefix(model_id: uuid.UUID) -> str:
    """The folder of model ``model_id``'s file."""
    return f"models/{model_id}"


def model_key(model_id: uuid.UUID, suffix: str) -> str:
    """The uploaded model file, by its extension (``onnx``, ``safetensors``, or ``zip`` for a model of
    several files kept as one bundle)."""
    return f"{model_prefix(model_id)}/model.{suffix}"


def dataset_prefix(dataset_id: uuid.UUID) -> str:
    """The folder of data set ``dataset_id``'s files."""
    return f"datasets/{dataset_id}"


def dataset_inputs_key(dataset_id: uuid.UUID, kind: str) -> str:
    """The uploaded inputs file, by its kind (``npz``, ``safetensors`` or ``idx``)."""
    return f"{dataset_prefix(dataset_id)}/inputs.{kind}"


def dataset_targets_key(dataset_id: uuid.UUID) -> str:
    """The IDX labels uploaded beside IDX inputs (absent otherwise)."""
    return f"{dataset_prefix(dataset_id)}/targets.idx"


def job_prefix(job_id: uuid.UUID) -> str:
    """The folder of job ``job_id``'s checkpoint and artifacts."""
    return f"jobs/{job_id}"


def checkpoint_key(job_id: uuid.UUID) -> str:
    """The job's latest checkpoint."""
    return f"{job_prefix(job_id)}/{CHECKPOINT}"


def artifact_key(job_id: uuid.UUID, name: str) -> str:
    """Artifact ``name`` of the job."""
    return f"{job_prefix(job_id)}/artifacts/{name}"
