"""How long a job would train on a CPU-only deployment, and the refusal of one over the limit.

The upload checks count the FLOPs of one example's forward pass (``models.flops_per_example``,
:mod:`dns_core.cost`). A training step on a batch costs about three forward passes (the forward, and
the backward's two products per layer, for the inputs' and the weights' gradients), so

    seconds = 3 × flops_per_example × batch_size × iterations / flops_per_second

with ``Settings.cpu_flops_per_second`` the rate a CPU worker sustains. Validation passes, the
surgery's own work and a teacher's forward (distillation) are left out: the estimate is a floor,
and a job refused by it would take at least that long.

A deployment is CPU-only when ``Settings.device`` is ``cpu``, or ``auto`` and the API process sees
no CUDA device (the API checks once at start: :func:`trains_on_cpu_only`). Then a job whose
estimate is over ``Settings.cpu_job_limit_seconds`` is refused at submit
(:class:`~service.errors.ExceedsCpuTimeLimit`, 422) with the estimate, the figures behind it, the
limit and what to do. A model without a count (uploaded before it was recorded, or one whose
forward pass could not be counted) is never refused.

Torch-free, like the rest of the service core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from service.errors import ExceedsCpuTimeLimit
from service.settings import Settings

#: Forward passes a training step costs per example: the forward and the backward (twice the forward).
PASSES_PER_STEP: Final = 3
#: The engine's batch size of a job that does not set one (``dns_core.defaults.BATCH_SIZE``; the service
#: core does not import the engine, and ``tests/api/test_cpu_time_limit.py`` checks that the two agree).
ENGINE_BATCH_SIZE: Final = 64


def training_seconds(flops_per_example: int, iterations: int, batch_size: int, flops_per_second: float) -> float:
    """Seconds to train ``iterations`` steps on batches of ``batch_size`` at ``flops_per_second``.

    ``flops_per_example`` is one example's forward pass; a step is forward and backward (×3).
    """
    if flops_per_second <= 0:
        raise ValueError(f"flops_per_second must be positive, got {flops_per_second}")
    return PASSES_PER_STEP * flops_per_example * batch_size * iterations / flops_per_second


def trains_on_cpu_only(device: str, cuda_available: bool) -> bool:
    """Whether the deployment's workers train on CPUs: ``device`` ``cpu``, or ``auto`` without a CUDA device."""
    device = device.strip().lower()
    return device == "cpu" or (device == "auto" and not cuda_available)


@dataclass(frozen=True, slots=True)
class TrainingEstimate:
    """A job's training time on CPUs, with the figures behind it."""

    flops_per_example: int
    iterations: int
    batch_size: int
    flops_per_second: float

    @classmethod
    def of(cls, settings: Settings, flops_per_example: int, job_settings: Mapping[str, Any]) -> TrainingEstimate:
        """The estimate for a job's ``settings`` (iterations and batch size, or the defaults) on this deployment."""
        return cls(
            flops_per_example,
            int(job_settings.get("iterations") or settings.default_iterations),
            int(job_settings.get("batch_size") or ENGINE_BATCH_SIZE),
            settings.cpu_flops_per_second,
        )

    @property
    def step_flops(self) -> int:
        """FLOPs of one training step (forward and backward on one batch)."""
        return PASSES_PER_STEP * self.flops_per_example * self.batch_size

    @property
    def seconds(self) -> float:
        return training_seconds(self.flops_per_example, self.iterations, self.batch_size, self.flops_per_second)

    def iterations_within(self, limit_seconds: float) -> int:
        """The most iterations that fit in ``limit_seconds`` at this batch size."""
        return math.floor(limit_seconds * self.flops_per_second / self.step_flops) if self.step_flops else 0


def check_cpu_time(estimate: TrainingEstimate, limit_seconds: float) -> None:
    """:class:`ExceedsCpuTimeLimit` if ``estimate`` is over ``limit_seconds`` (0: no limit)."""
    if limit_seconds <= 0 or estimate.seconds <= limit_seconds:
        return
    fits = estimate.iterations_within(limit_seconds)
    advice = (
        f"ask for at most {fits:,} iterations (settings.iterations) or a smaller batch"
        if fits >= 1
        else "even one iteration is over the limit at this batch size: use a smaller model or batch"
    )
    raise ExceedsCpuTimeLimit(
        f"this deployment trains on CPUs only, and this job would take an estimated {duration(estimate.seconds)} "
        f"there, over its limit of {duration(limit_seconds)}: {estimate.iterations:,} iterations × batches of "
        f"{estimate.batch_size:,} at {gflop(estimate.step_flops)} GFLOP a step (forward and backward, 3 × "
        f"{gflop(estimate.flops_per_example)} GFLOP forward per example), at an assumed "
        f"{gflop(estimate.flops_per_second)} GFLOP/s; {advice}, or submit it to a deployment with GPU workers"
    )


def duration(seconds: float) -> str:
    """``seconds`` in hours and minutes (``7 h 24 min``), minutes (``12 min``) or seconds (``40 s``)."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours:,} h {minutes} min"


def gflop(flops: float) -> str:
    """``flops`` in GFLOP, to three significant figures at most (``1.87``, ``0.0625``, ``1,874``)."""
    g = flops / 1e9
    if g >= 100:
        return f"{g:,.0f}"
    return f"{g:.3g}"
