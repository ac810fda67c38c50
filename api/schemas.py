"""The HTTP API's request and response bodies, split by role: ``…Create`` (what a client sends),
``…Read`` (what it gets back) and ``…Page`` (a listing with its total).

``…Read`` models are built from the ORM rows (``from_attributes``); ``…Create`` models refuse
unknown fields, so a misspelt knob is a 422 rather than silently ignored.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from dns_core.defaults import (
    CRATE_DRIVEN,
    CRATE_KNOBS,
    EDGE_SHARE,
    SEARCH_METHODS,
    SEARCH_METHODS_TEXT,
    Allocation,
    BuiltinSet,
    Codec,
    FirstLast,
    Method,
)
from service.orm import NAME_LENGTH
from service.usecases.jobs import JobRequest

T = TypeVar("T")

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]

# a layer name or a glob pattern over layer names ("fc1", "conv*")
LayerName = Annotated[str, StringConstraints(min_length=1, max_length=NAME_LENGTH)]
MAX_LAYER_ENTRIES = 1024
# a job's name (free text, not unique) and its tags (short labels to filter on)
#: printable text: no control characters (NUL cannot even be stored in Postgres text)
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
JobName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=NAME_LENGTH, pattern=PRINTABLE)
]
Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[\w.:/+=@-]+$")]
MAX_TAGS = 32
# the crate c_k of a layer: its threshold is max(μ_k + c_k·σ_k, 0)
Crate = Annotated[float, Field(ge=-100, le=100)]


class _Create(BaseModel):
    # NaN and infinities are refused: they compare false with every bound and are not JSON
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """One page of a listing: ``items``, and ``total`` rows across all pages."""

    items: list[T]
    total: int = Field(ge=0, description="Rows across all pages.")
    limit: int
    offset: int


class ErrorBody(BaseModel):
    """Every error response: a stable machine-readable ``error`` code and a human ``detail``."""

    error: str = Field(description="Stable error code, e.g. not_found, invalid_file, payload_too_large.")
    detail: str = Field(description="What went wrong and, where it helps, how to fix it.")
    fields: list[dict[str, Any]] | None = Field(
        default=None, description="422 on a request body or query: one entry per invalid field (loc, msg, type)."
    )


# ------------------------------------------------------------------------------------------ models


class ModelRead(_Read):
    """An uploaded model."""

    id: uuid.UUID
    name: str
    format: Literal["onnx", "safetensors", "hf"] = Field(
        description="onnx: an ONNX graph (with its external data); safetensors: weights of a built-in, "
        "torchvision:… or timm:… architecture; hf: a Hugging Face folder."
    )
    architecture: str | None = Field(
        description="The architecture of safetensors weights, or the transformers class of a Hugging Face "
        "folder (e.g. BertForSequenceClassification); null for ONNX."
    )
    config: dict[str, Any] | None = Field(description="The architecture's checked config (safetensors uploads).")
    parameter_count: int = Field(description="Weights and biases (ONNX: elements of float initializers).")
    flops_per_example: int | None = Field(
        default=None,
        description="Floating-point operations of one example's forward pass (matrix products and convolutions, "
        "2 per multiply-add), counted at upload; a CPU-only deployment estimates a job's training time from it. "
        "Null for models uploaded before it was recorded, or whose forward pass could not be counted.",
    )
    layers: list[str] | None = Field(
        default=None,
        description="Its prunable layers (Linear, Conv, attention), by the names that layer_kept, include, exclude "
        "and crates match; null for models uploaded before they were recorded.",
    )
    size_bytes: int
    sha256: str = Field(description="SHA-256 of the uploaded file, hex.")
    created_at: datetime


ModelPage = Page[ModelRead]


# ---------------------------------------------------------------------------------------- datasets


class BuiltinDatasetCreate(_Create):
    """A built-in data set by name (sent as JSON instead of a file upload)."""

    builtin: BuiltinSet
    name: Annotated[str, StringConstraints(min_length=1, max_length=NAME_LENGTH)] | None = None


class DatasetRead(_Read):
    """A data set: built-in (``kind='builtin'``) or an uploaded file."""

    id: uuid.UUID
    name: str
    kind: Literal["builtin", "npz", "safetensors", "idx", "images"] = Field(
        description="builtin, or the uploaded file's format; images: a zip or tar of class folders of PNG/JPEG."
    )
    builtin_name: str | None
    n_examples: int | None = Field(description="Examples in the upload; null for built-in sets.")
    input_shape: list[int] | None = Field(description="Shape of one example, e.g. [1, 28, 28].")
    has_targets: bool
    size_bytes: int | None = Field(description="Bytes stored (inputs plus targets file, if any).")
    sha256: str | None = Field(description="SHA-256 of the inputs file, hex.")
    created_at: datetime


DatasetPage = Page[DatasetRead]


# -------------------------------------------------------------------------------------------- jobs


class Target(_Create):
    """What to reach: an overall compression (×) or per-layer kept fractions, within an accuracy budget."""

    compression: float | None = Field(
        default=None, ge=1, le=1e6, description="Overall ×: all parameters over the non-zero ones."
    )
    layer_kept: dict[LayerName, Annotated[float, Field(gt=0, le=1)]] | None = Field(
        default=None,
        max_length=MAX_LAYER_ENTRIES,
        description="Kept fraction per layer name or pattern, each in (0, 1].",
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Budget in percentage points of validation accuracy. With dns, agp or han it comes first: a "
        "compression the budget cannot hold is not handed over (the job lands on the highest one below that did).",
    )

    @model_validator(mode="after")
    def _at_most_one(self) -> Target:
        if self.compression is not None and self.layer_kept is not None:
            raise ValueError("give either compression or layer_kept, not both")
        return self


class Preprocessing(_Create):
    """Image preprocessing, applied to the job's data before training (values in [0, 1] first)."""

    resize: int | None = Field(default=None, ge=1, le=4096, description="Shorter side, in pixels, after resizing.")
    crop: int | None = Field(default=None, ge=1, le=4096, description="Side of the centre square crop, in pixels.")
    channels: Literal[1, 3] | None = Field(default=None, description="Channels: 3 replicates grey images, 1 averages.")
    mean: list[float] | Literal["model"] | None = Field(
        default=None,
        description='Per-channel mean to subtract, or "model" for the one in the model\'s preprocessor config.',
    )
    std: list[float] | Literal["model"] | None = Field(
        default=None, description='Per-channel std to divide by, or "model" for the model\'s own.'
    )


class JobSettings(_Create):
    """Expert knobs; anything left out takes the method's default (see the paper's names)."""

    crates: dict[LayerName, Crate] | None = Field(
        default=None,
        max_length=MAX_LAYER_ENTRIES,
        description="Per-layer crate c_k (dns-fixed-crates): threshold max(μ_k + c_k·σ_k, 0).",
    )
    crate: Crate | None = Field(default=None, description="Default crate for layers not in crates.")
    gamma: float | None = Field(default=None, ge=0, description="γ: surgery probability is (1 + γ·t)^(−power).")
    power: float | None = Field(default=None, ge=0, le=100, description="Exponent of the surgery probability.")
    iter_stop: int | None = Field(default=None, ge=0, description="No surgery at or after this iteration.")
    iterations: int | None = Field(default=None, ge=1, le=10_000_000, description="Training iterations in all.")
    lr: float | None = Field(default=None, gt=0, le=10, description="Learning rate.")
    batch_size: int | None = Field(default=None, ge=1, le=65_536)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    codec: Codec | None = Field(default=None, description="Value codec of the extra compact sparse artifact.")
    allocation: Allocation | None = Field(
        default=None,
        description="How a target is shared among layers: one magnitude ranking with every layer's kept fraction "
        "held between f/4 and 1-(1-f)/4 of the overall fraction f (balanced, the default: no layer stays whole "
        "or is emptied), one magnitude threshold over all layers (global), each layer cut relative to its own "
        "spread (layer), or the same kept fraction in every layer (uniform).",
    )
    include: list[LayerName] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LAYER_ENTRIES,
        description="Linear/Conv layers to prune, by name or glob pattern (default: all of them, ['*']).",
    )
    exclude: list[LayerName] | None = Field(
        default=None,
        max_length=MAX_LAYER_ENTRIES,
        description="Linear/Conv layers to leave dense, by name or glob pattern.",
    )
    first_last: FirstLast | None = Field(
        default=None,
        description="The first convolution and the classifier head: dense, pruned, or auto (the default: dense "
        f"while they take at most {EDGE_SHARE:.0%} of the weights the target keeps, smallest first).",
    )
    preprocess: Preprocessing | None = Field(
        default=None, description="How image data is prepared for the model (resize, centre crop, normalise)."
    )

    @model_validator(mode="after")
    def _stop_within_run(self) -> JobSettings:
        if self.iter_stop is not None and self.iterations is not None and self.iter_stop > self.iterations:
            raise ValueError(f"iter_stop ({self.iter_stop}) is after the last iteration ({self.iterations})")
        return self


class JobCreate(_Create):
    """A compression job: which model, which data, what target, which method, optional knobs.

    Every method but ``dns-fixed-crates`` needs a target with ``compression`` or ``layer_kept``,
    or, for ``dns`` and ``agp``, ``max_accuracy_drop`` alone: the job then searches for the highest
    compression within that budget and keeps a frontier of candidates. A ``dns`` or ``agp`` job given a
    compression and a budget climbs the same way up to the compression: it lands there when the budget
    holds it, else on the highest compression below that did. ``dns-fixed-crates`` is
    driven by its crates, so its target may carry only ``max_accuracy_drop`` (or be left out).
    """

    model_id: uuid.UUID
    dataset_id: uuid.UUID
    method: Method = "dns"
    target: Target | None = None
    settings: JobSettings = Field(default_factory=JobSettings)
    name: JobName | None = Field(default=None, description="A name to find the job by (need not be unique).")
    tags: list[Tag] = Field(
        default_factory=list,
        max_length=MAX_TAGS,
        description="Labels to filter and group jobs by (letters, digits and ._:/+=@-; up to 64 characters each).",
    )

    def request(self) -> JobRequest:
        """What the service is asked to run: the knobs (and target values) the client set, nothing else."""
        target = self.target.model_dump(exclude_none=True) if self.target is not None else {}
        settings = self.settings.model_dump(exclude_none=True)
        return JobRequest(
            self.model_id, self.dataset_id, self.method, target, settings, self.name, tuple(unique(self.tags))
        )

    @model_validator(mode="after")
    def _target_fits_method(self) -> JobCreate:
        given = self.target is not None and (self.target.compression is not None or self.target.layer_kept is not None)
        if self.method == CRATE_DRIVEN:
            if given:
                raise ValueError("dns-fixed-crates is driven by crates: its target may hold only max_accuracy_drop")
        elif not given and (self.target is None or self.target.max_accuracy_drop is None):
            raise ValueError(
                f"method {self.method!r} needs a target with compression or layer_kept, or max_accuracy_drop alone "
                f"(the highest compression within it, methods {SEARCH_METHODS_TEXT})"
            )
        elif not given and self.method not in SEARCH_METHODS:
            raise ValueError(
                f"method {self.method!r} needs a target with compression or layer_kept; only "
                f"{SEARCH_METHODS_TEXT} search for the highest compression within max_accuracy_drop alone"
            )
        knobs = [k for k in CRATE_KNOBS if getattr(self.settings, k) is not None]
        if knobs and self.method != CRATE_DRIVEN:
            raise ValueError(
                f"settings {', '.join(knobs)} are the {CRATE_DRIVEN} method's only; method {self.method!r} reaches "
                "its target by itself"
            )
        return self


def unique(items: list[str]) -> list[str]:
    """``items`` without repeats, in their first order."""
    return list(dict.fromkeys(items))


class JobUpdate(_Create):
    """New labels for a job: the fields given replace the old ones (``"name": null`` clears the name)."""

    name: JobName | None = Field(default=None, description="The job's new name; null clears it.")
    tags: list[Tag] = Field(
        default_factory=list, max_length=MAX_TAGS, description="The job's tags, all of them ([] removes them)."
    )

    def changes(self) -> dict[str, Any]:
        """The columns to write: only the fields the client sent."""
        changed: dict[str, Any] = {}
        if "name" in self.model_fields_set:
            changed["name"] = self.name
        if "tags" in self.model_fields_set:
            changed["tags"] = unique(self.tags)
        return changed


class LayerKept(BaseModel):
    """Sparsity of one layer: ``kept`` of ``total`` weights survive."""

    layer: str
    kept: int
    total: int


class LayerSnapshot(BaseModel):
    """Per-layer sparsity at one iteration."""

    iteration: int
    layers: list[LayerKept]


class JobResult(BaseModel):
    """What a succeeded job delivered: its verdict in one place."""

    compression: float | None = Field(description="All parameters over the non-zero ones (×).")
    compression_bytes: float | None = Field(description="Dense parameter bytes over the compact sparse file's (×).")
    reference_val_acc: float | None = Field(description="The dense model's validation accuracy, percent.")
    val_acc: float | None = Field(description="The delivered model's validation accuracy, percent.")
    val_drop: float | None = Field(description="Reference minus delivered validation accuracy, points.")
    reference_test_acc: float | None = None
    test_acc: float | None = None
    test_drop: float | None = None
    max_accuracy_drop: float | None = Field(description="The budget asked for, points (null: none).")
    budget_met: bool | None = Field(description="Validation accuracy within the budget (null: no budget to check).")
    dense_file_bytes: int | None = Field(description="Size of the dense-with-zeros model file.")
    sparse_file_bytes: int | None = Field(description="Size of model.sparse.safetensors.")
    verdict: str | None = Field(default=None, description="A budget search's outcome in one sentence.")


class JobRead(_Read):
    """A job and its live summary (the latest progress and per-layer sparsity)."""

    id: uuid.UUID
    name: str | None = None
    tags: list[str] = Field(default_factory=list)
    model_id: uuid.UUID
    dataset_id: uuid.UUID
    state: JobState
    cancel_requested: bool
    method: str
    target: dict[str, Any]
    settings: dict[str, Any]
    attempt: int = Field(description="Claims so far: 1 on the first run, more after a worker was lost.")
    iteration: int
    total_iterations: int | None
    loss: float | None
    val_accuracy: float | None = Field(description="Validation accuracy, percent.")
    compression: float | None = Field(description="Compression (×) reached so far.")
    layers: LayerSnapshot | None = Field(description="Latest per-layer kept/total.")
    error: str | None
    result: JobResult | None = Field(default=None, description="The verdict, once the job has succeeded.")
    idempotency_key: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


JobPage = Page[JobRead]


class FrontierPointRead(BaseModel):
    """One judged state of a budget search: the end of a rung, finished at a low learning rate."""

    iteration: int
    compression: float = Field(description="Compression (×) of the state.")
    val_acc: float = Field(description="Validation accuracy, percent, by the strict evaluation at the rung's end.")
    test_acc: float | None = Field(default=None, description="Test accuracy, percent, when the data has a test split.")
    within_budget: bool = Field(description="Validation accuracy within max_accuracy_drop of the reference's.")


class FrontierCandidate(BaseModel):
    """One of the kept models: the chosen one first, then the next-highest compressions within budget."""

    compression: float
    val_acc: float | None
    test_acc: float | None
    chosen: bool
    file: str | None = Field(default=None, description="The artifact holding it (compact sparse format).")
    bytes: int | None = Field(default=None, description="That file's size.")


class FrontierRead(BaseModel):
    """The frontier of a dns, agp or han job with a budget: accuracy against compression, rung by rung.

    While the job runs, ``points`` grows with each rung; once it has succeeded, ``chosen`` is the
    highest compression within budget, up to the asked one if any (what ``model.sparse.safetensors``
    holds), and ``candidates`` names the downloadable models.
    """

    job_id: uuid.UUID
    state: JobState
    max_accuracy_drop: float
    reference_val_acc: float | None = None
    points: list[FrontierPointRead]
    chosen: FrontierPointRead | None = None
    candidates: list[FrontierCandidate] = Field(default_factory=list)
    verdict: str | None = Field(default=None, description="One sentence on the outcome, once the job has ended.")


class LogLineRead(_Read):
    """One log line a worker wrote while it ran the job."""

    id: int = Field(description="Position in the job's log; pass the last one as ``after`` for newer lines.")
    attempt: int = Field(description="The claim that wrote it (1 on the first run, more after a worker was lost).")
    at: datetime
    level: str = Field(description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    logger: str
    message: str = Field(description="The formatted line; a failure's traceback follows its message.")


class LogRead(BaseModel):
    """A job's log lines after a cursor, oldest first; pass ``next_after`` as ``after`` to go on."""

    items: list[LogLineRead]
    next_after: int


class ProgressPointRead(_Read):
    """One logged iteration."""

    iteration: int
    attempt: int
    loss: float | None
    val_accuracy: float | None
    compression: float | None
    at: datetime


class ProgressRead(BaseModel):
    """Progress points after a cursor; pass ``next_after`` as ``after`` to get the next ones."""

    items: list[ProgressPointRead]
    next_after: int = Field(description="The last iteration returned (or the cursor sent, if none were).")


class LayerHistoryRead(BaseModel):
    """Per-layer sparsity by iteration after a cursor; pass ``next_after`` as ``after`` to go on."""

    items: list[LayerSnapshot]
    next_after: int


class ArtifactRead(_Read):
    """A file a job produced."""

    name: str
    kind: str = Field(description="e.g. sparse, dense, report.")
    size_bytes: int
    sha256: str = Field(description="SHA-256, hex; also the download's ETag.")
    created_at: datetime


class ArtifactList(BaseModel):
    items: list[ArtifactRead]


# ------------------------------------------------------------------------------------------ health


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok"]
    database: bool
    broker: bool
