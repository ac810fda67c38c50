"""``/v1/models``: upload (streamed, checked by content), read, list, delete.

Stored layout: :func:`service.keys.model_key`; ``models.uri`` holds that storage key (relative to
``Settings.storage_url``).
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.metrics import record_upload
from api.routes.common import Duplicate, UploadScopeDep, duplicate_responses
from api.routes.stored import add_read_and_delete_routes
from api.schemas import ModelRead
from api.uploads import receive_model, upload_folder
from dns_core.models import ZOO
from service.usecases import models

router = APIRouter(prefix="/models", tags=["models"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,  # other form fields are refused (422)
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "maxItems": 32,
                            "description": "One file: an ONNX graph, safetensors weights of an architecture, "
                            "or a zip/tar of a model folder. Several files (the field repeated): the files of "
                            "one model folder, a Hugging Face folder (config.json, model.safetensors, any "
                            "preprocessor or tokenizer config) or model.onnx with its external data "
                            "(model.onnx.data). Pickle-based files (torch.save, TorchScript, .pt2, "
                            "torch.package, pytorch_model.bin) are refused with 415. See docs/formats.md.",
                        },
                        "name": {"type": "string", "maxLength": 255, "description": "Defaults to the file name."},
                        "architecture": {
                            "type": "string",
                            "maxLength": 64,
                            "description": f"Architecture of safetensors weights: built-in ({', '.join(sorted(ZOO))}), "
                            "torchvision:<name> or timm:<name> (else read from the file's netsurgery.arch header).",
                        },
                        "config": {
                            "type": "string",
                            "description": 'The architecture\'s config as a JSON object, e.g. {"num_classes": 10}.',
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    summary="Upload a model",
    responses=duplicate_responses("model", ModelRead),
    openapi_extra=_UPLOAD_BODY,
)
async def upload_model(
    request: Request, response: Response, scope: UploadScopeDep, duplicate: Duplicate = "existing"
) -> ModelRead:
    """Upload a model as ``multipart/form-data``: an ONNX graph (with its external data), safetensors
    weights of an architecture, or a Hugging Face folder (an archive, or its files side by side).

    The body is streamed to a private temporary folder under a byte cap (413 past
    ``max_upload_bytes``), then judged by content: refused formats are a 415, malformed files
    or weights that do not fit the architecture (missing, unexpected or mis-shaped tensors) a
    422. Only an accepted file is moved into storage and recorded. An upload that would take the
    tenant past its stored-bytes quota is a 429 (``quota_exceeded``): before the body is read when
    ``Content-Length`` already says so, else once it is received.

    The same bytes again (read the same way: format, architecture, config) answer **200** with the model
    you already have and store nothing, so a repeated upload leaves one entry; ``duplicate=new`` adds
    another one (201).
    """
    with upload_folder(scope.root, "model-") as folder:
        upload = await receive_model(request, scope.session, scope.settings, scope.tenant_id, folder)
        model, created = await run_in_threadpool(
            partial(models.store_model, reuse=duplicate == "existing"),
            scope.session, scope.storage, scope.tenant_id, upload,
        )  # fmt: skip
    record_upload(request.app, "model", model.size_bytes)
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/models/{model.id}"
    return ModelRead.model_validate(model)


add_read_and_delete_routes(router, models.uploads, ModelRead, name="model", title="model", files="file")
