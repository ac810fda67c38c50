"""``/v1/datasets``: a built-in set by name (JSON) or an uploaded file (multipart), read, list, delete.

Stored layout: :func:`service.keys.dataset_inputs_key` and, for IDX inputs with labels,
:func:`service.keys.dataset_targets_key` beside it; ``datasets.uri`` holds the inputs' storage key.
``size_bytes`` counts both files, ``sha256`` is the inputs file's.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.metrics import record_upload
from api.routes.common import Duplicate, UploadScopeDep, duplicate_responses
from api.routes.stored import add_read_and_delete_routes
from api.schemas import BuiltinDatasetCreate, DatasetRead
from api.uploads import multipart_boundary, read_small_body, receive_dataset, upload_folder
from service.errors import (
    InvalidRequest,
    UnsupportedFormat,
)
from service.usecases import datasets

router = APIRouter(prefix="/datasets", tags=["datasets"])

MAX_JSON_BODY = 16 * 1024

_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": BuiltinDatasetCreate.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "Inputs: .npz or safetensors holding 'inputs' (N×…) and optionally "
                            "'targets' (N class indices), or an IDX file (MNIST format, may be gzipped).",
                        },
                        "targets": {
                            "type": "string",
                            "format": "binary",
                            "description": "IDX labels for IDX inputs.",
                        },
                        "name": {"type": "string", "maxLength": 255},
                    },
                    "additionalProperties": False,  # other form fields are refused (422)
                }
            },
        },
    }
}


async def read_builtin_request(request: Request) -> tuple[str, str | None]:
    """The built-in set and name a JSON body asks for (415 for another content type, 422 for bad values)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise UnsupportedFormat("send JSON {'builtin': …} for a built-in set, or multipart/form-data to upload")
    body = await read_small_body(request, MAX_JSON_BODY)
    try:
        parsed = BuiltinDatasetCreate.model_validate_json(body)
    except ValidationError as e:
        raise InvalidRequest(
            "invalid built-in data set request",
            extra={"fields": e.errors(include_url=False, include_context=False, include_input=False)},
        ) from None
    return parsed.builtin, parsed.name


@router.post(
    "",
    status_code=201,
    summary="Add a data set",
    responses=duplicate_responses("data set", DatasetRead),
    openapi_extra=_CREATE_BODY,
)
async def create_dataset(
    request: Request, response: Response, scope: UploadScopeDep, duplicate: Duplicate = "existing"
) -> DatasetRead:
    """Add a data set: JSON ``{"builtin": "digits"}`` names a built-in set; a ``multipart/form-data``
    upload (``file``, optional ``targets`` and ``name``) is streamed under the byte cap and read
    safely (no pickle; archives checked first) to learn its size and shape before it is stored.
    An upload that would take the tenant past its stored-bytes quota is a 429 (``quota_exceeded``).
    The same file again (one file, no separate targets) answers **200** with the data set you already
    have and stores nothing; ``duplicate=new`` adds another one (201).
    """
    if multipart_boundary(request) is None:
        builtin, name = await read_builtin_request(request)
        dataset = await run_in_threadpool(datasets.add_builtin_dataset, scope.session, scope.tenant_id, builtin, name)
    else:
        with upload_folder(scope.root, "dataset-") as folder:
            upload = await receive_dataset(request, scope.session, scope.settings, scope.tenant_id, folder)
            dataset, created = await run_in_threadpool(
                partial(datasets.store_dataset, reuse=duplicate == "existing"),
                scope.session, scope.storage, scope.tenant_id, upload,
            )  # fmt: skip
        record_upload(request.app, "dataset", dataset.size_bytes or 0)
        if not created:
            response.status_code = 200
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return DatasetRead.model_validate(dataset)


add_read_and_delete_routes(router, datasets.uploads, DatasetRead, name="dataset", title="data set", files="files")
