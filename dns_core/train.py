"""The training loop shared by DNS and every baseline, and the accuracy-budget controller.

Same loop, same data stream, same optimizer and learning-rate schedule for every method: the
only thing that differs between rows of the benchmark table is the :class:`~dns_core.surgery.Surgery`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_state, save_state
from .data import BatchStream, Dataset
from .defaults import BATCH_SIZE, LR, OBJECTIVES
from .errors import ConfigError
from .surgery import LayerReport, Surgery


class Cancelled(Exception):
    """Raised by :func:`fit` when the cancellation callback says stop."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"cancelled at iteration {iteration}")
        self.iteration = iteration


@dataclass
class TrainConfig:
    """Settings of one training run.

    ``objective``: ``"ce"`` (cross-entropy on labels), ``"distill"`` (label-free: match the dense
    teacher's softened outputs, KL at ``temperature``), or ``"ce+distill"`` (their mean).
    ``lr_schedule``: ``"cosine"`` (to zero at the last iteration), ``"constant"`` or ``"step"``
    (×0.1 at 50% and 75%).
    """

    iterations: int
    batch_size: int = BATCH_SIZE
    lr: float = LR
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    warmup: int = 0
    objective: str = "ce"
    #: the KL term is scaled by T², so its gradient grows with T: at T = 4 label-free runs at high
    #: compressions diverged (LeNet-300-100 at 50x, lr 0.01: 10% accuracy); at T = 1 they do not
    temperature: float = 1.0
    eval_every: int = 1000
    log_every: int = 100
    cancel_every: int = 20
    checkpoint_every: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    #: split each batch into this many micro-batches whose gradients add up (one optimizer step per batch);
    #: on CUDA the split doubles by itself when a batch runs out of memory
    micro_batches: int = 1
    #: convolutional models train in channels_last on CUDA (where bf16 convolutions are fastest)
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ConfigError("iterations must be ≥ 0")
        if self.lr <= 0:
            raise ConfigError("lr must be positive")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}")
        if self.lr_schedule not in ("cosine", "constant", "step"):
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}")
        if not 1 <= self.micro_batches <= max(self.batch_size, 1):
            raise ConfigError(f"micro_batches must be in [1, batch_size], got {self.micro_batches}")

    def lr_at(self, t: int) -> float:
        if self.warmup and t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "step":
            return self.lr * (0.1 ** ((t >= self.iterations // 2) + (t >= 3 * self.iterations // 4)))
        span = max(self.iterations - self.warmup, 1)
        return 0.5 * self.lr * (1 + math.cos(math.pi * (t - self.warmup) / span))


@dataclass
class Progress:
    """What a progress callback receives (every ``log_every`` iterations and at evaluations)."""

    iteration: int
    total: int
    loss: float
    lr: float
    val_acc: float | None = None
    compression: float | None = None
    layers: list[LayerReport] = field(default_factory=list)
    event: str = "progress"  # "progress", "eval", "backoff"
    #: at evaluations of a budget search: every point of its frontier so far (see dns_core.search)
    frontier: list[dict[str, Any]] | None = None


@dataclass
class Callbacks:
    """Hooks into :func:`fit`: progress reports, cooperative cancellation, finished checkpoints.

    ``should_cancel`` is asked every ``cancel_every`` iterations; ``on_checkpoint(iteration, path)``
    runs after each checkpoint is completely written (e.g. to copy it to remote storage).
    """

    on_progress: Callable[[Progress], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


#: examples per evaluation batch on a CPU: larger batches' activations spill out of the caches (on a
#: 2-core AMD EPYC a ResNet-20 on 3×28×28 images evaluates 2.4x slower in batches of 1,000, a LeNet-5
#: 1.4x), while a LeNet-300-100 is as fast either way
EVAL_BATCH_CPU = 128
#: examples per evaluation batch on a GPU, where large batches keep it busy
EVAL_BATCH_GPU = 1000


def eval_batch_size(device: torch.device) -> int:
    """The batch size that :func:`evaluate` and :func:`agreement` use on ``device``."""
    return EVAL_BATCH_CPU if device.type == "cpu" else EVAL_BATCH_GPU


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int | None = None) -> float:
    """Top-1 accuracy in percent (``batch_size`` None: :func:`eval_batch_size`'s for the model's device)."""
    if data.targets is None:
        raise ValueError("evaluation needs labelled data")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch_size = batch_size or eval_batch_size(device)
    correct = 0
    for i in range(0, len(data), batch_size):
        x = data.inputs[i : i + batch_size].to(device)
        y = data.targets[i : i + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return 100.0 * correct / len(data)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Dataset, *, batches: int = 100, batch_size: int = 64,
                          seed: int = 0) -> int:  # fmt: skip
    """Re-estimate every BatchNorm layer's running mean and variance on ``data`` (the weights stay).

    Pruning changes what each BatchNorm layer sees, so statistics gathered on the dense model are
    stale. The running statistics are reset and replaced by their plain average over ``batches``
    seeded random batches, with every other module in eval mode (dropout off). Returns the number
    of BatchNorm layers re-estimated (0: nothing to do).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or len(data) == 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
        m.train()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(data))
    for _ in range(batches):
        index = torch.randint(len(data), (size,), generator=g)
        model(data.inputs[index].to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
    return len(norms)


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, data: Dataset, batch_size: int | None = None) -> float:
    """Percent of inputs on which the two models' top-1 predictions agree (label-free quality)."""
    device = next(student.parameters()).device
    batch_size = batch_size or eval_batch_size(device)
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    same = 0
    for i in range(0, len(data), batch_size):
        x = data.inputs[i : i + batch_size].to(device)
        same += int((student(x).argmax(1) == teacher(x).argmax(1)).sum())
    student.train(modes[0])
    teacher.train(modes[1])
    return 100.0 * same / len(data)


class Controller:
    """What :func:`fit` asks of a controller that steers the surgery from validation accuracy.

    The defaults follow the run's own settings: the configured learning-rate schedule, evaluations
    every ``eval_every`` iterations, and a run to the last iteration.
    :class:`dns_core.search.BudgetSearch` overrides them all.
    """

    backoffs = 0

    def lr_at(self, t: int, cfg: TrainConfig) -> float:
        return cfg.lr_at(t)

    def evaluates_at(self, done: int, cfg: TrainConfig) -> bool:
        """Evaluate on validation data once ``done`` iterations have run."""
        return bool(cfg.eval_every) and done % cfg.eval_every == 0

    def finished(self, done: int) -> bool:
        """True to end training after ``done`` iterations, before the configured count."""
        return False

    def observe(self, t: int, val_acc: float, model: nn.Module, opt: torch.optim.Optimizer, total: int) -> bool:
        """Record an evaluation at iteration ``t``; True if the state was rolled back."""
        return False

    def finish(self, val_acc: float, model: nn.Module, opt: torch.optim.Optimizer) -> bool:
        """At the end of training; True if another state than the last one is the result."""
        return False

    def points(self) -> list[dict[str, Any]] | None:
        """What progress reports at evaluations carry (a budget search's frontier); None: nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class FitResult:
    iterations: int
    seconds: float
    val_acc: float | None
    backoffs: int = 0
    restored_last_good: bool = False
    history: list[Progress] = field(default_factory=list)
    micro_batches: int = 1  # the split the run ended with (more than asked after running out of CUDA memory)


#: Settings that must match for a checkpoint to continue the same run.
_RESUME_KEYS = (
    "iterations",
    "batch_size",
    "lr",
    "lr_schedule",
    "warmup",
    "objective",
    "seed",
    "momentum",
    "weight_decay",
)


def _check_resumable(state: dict[str, Any], cfg: TrainConfig, surgery: Surgery | None) -> None:
    saved = state.get("config") or {}
    diff = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    method = surgery.method if surgery is not None else None
    if state.get("method") != method:
        diff.append(f"method ({state.get('method')} ≠ {method})")
    if diff:
        raise ConfigError(f"checkpoint belongs to a different run: {', '.join(diff)} differ")


def _objective(
    cfg: TrainConfig, out: torch.Tensor, y: torch.Tensor | None, teacher_out: torch.Tensor | None
) -> torch.Tensor:
    losses = []
    if cfg.objective in ("ce", "ce+distill"):
        if y is None:
            raise ConfigError("the cross-entropy objective needs labels; use objective='distill'")
        losses.append(nn.functional.cross_entropy(out, y))
    if cfg.objective in ("distill", "ce+distill"):
        assert teacher_out is not None
        T = cfg.temperature
        kl = nn.functional.kl_div(
            nn.functional.log_softmax(out / T, 1),
            nn.functional.log_softmax(teacher_out / T, 1),
            reduction="batchmean",
            log_target=True,
        )
        losses.append(kl * T * T)
    return losses[0] if len(losses) == 1 else sum(losses[1:], losses[0]) / len(losses)


def fit(
    model: nn.Module,
    train: Dataset,
    config: TrainConfig,
    *,
    surgery: Surgery | None = None,
    valid: Dataset | None = None,
    teacher: nn.Module | None = None,
    budget: Controller | None = None,
    callbacks: Callbacks | None = None,
    checkpoint: str | Path | None = None,
) -> FitResult:
    """Train ``model`` (with ``surgery`` attached, if any) for ``config.iterations`` iterations.

    With ``checkpoint`` set, the state is written there atomically every
    ``config.checkpoint_every`` iterations, and a run that finds the file resumes from it,
    continuing exactly as the uninterrupted run would have. ``budget`` (a :class:`Controller`)
    may set the learning rate, ask for evaluations, roll the state back and end the run early.
    """
    cfg = config
    cb = callbacks or Callbacks()
    device = resolve_device(cfg.device)
    model.to(device)
    model.train()
    if cfg.objective != "ce" and teacher is None:
        raise ValueError(f"objective {cfg.objective!r} needs a teacher model")
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if budget is not None and valid is None:
        raise ValueError("an accuracy budget needs validation data")
    torch.manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    stream = BatchStream(train, cfg.batch_size, cfg.seed, device)
    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = load_state(ckpt)
        _check_resumable(state, cfg, surgery)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if surgery is not None:
            surgery.load_state_dict(state["surgery"])
        if budget is not None and state.get("budget") is not None:
            budget.load_state_dict(state["budget"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = int(state["iteration"])

    def save(next_t: int) -> None:
        assert ckpt is not None
        save_state(
            ckpt,
            {
                "iteration": next_t,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "surgery": surgery.state_dict() if surgery is not None else None,
                "budget": budget.state_dict() if budget is not None else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "method": surgery.method if surgery is not None else None,
                "config": asdict(cfg),
            },
        )

    use_amp = cfg.amp and device.type == "cuda"
    channels_last = (
        cfg.channels_last and device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    micro = cfg.micro_batches

    def train_step(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Forward and backward over ``micro`` slices of the batch, gradients summed as one batch's."""
        nonlocal micro
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        while True:
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            try:
                parts = zip(x.chunk(micro), y.chunk(micro) if y is not None else [None] * micro, strict=False)
                for xs, ys in parts:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        out = model(xs)
                        t_out = None
                        if teacher is not None and cfg.objective != "ce":
                            with torch.no_grad():
                                t_out = teacher(xs)
                        loss = _objective(cfg, out.float(), ys, None if t_out is None else t_out.float())
                    part = loss * (len(xs) / len(x))
                    part.backward()  # type: ignore[no-untyped-call]
                    total += part.detach()
                return total
            except torch.cuda.OutOfMemoryError:
                if micro >= len(x):
                    raise
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                micro = min(2 * micro, len(x))

    history: list[Progress] = []
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    val_acc: float | None = None
    evaluated = -1  # the iteration whose model ``val_acc`` measured (-1: none yet)
    began = time.perf_counter()
    control = budget or Controller()
    ran = start

    def emit(t: int, event: str, acc: float | None = None) -> None:
        nonlocal loss_sum, loss_n
        p = Progress(
            iteration=t,
            total=cfg.iterations,
            loss=float(loss_sum) / max(loss_n, 1),
            lr=control.lr_at(max(t - 1, 0), cfg),
            val_acc=acc,
            event=event,
            compression=surgery.compression() if surgery is not None else None,
            layers=surgery.report() if surgery is not None else [],
            frontier=control.points() if event != "progress" else None,
        )
        loss_sum = torch.zeros((), device=device)
        loss_n = 0
        history.append(p)
        if cb.on_progress is not None:
            cb.on_progress(p)

    for t in range(start, cfg.iterations):
        if cb.should_cancel is not None and t % cfg.cancel_every == 0 and cb.should_cancel():
            raise Cancelled(t)
        if surgery is not None:
            surgery.step(t)
        lr = control.lr_at(t, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = stream.batch(t)
        loss = train_step(x, y)
        opt.step()
        loss_sum += loss
        loss_n += 1
        done = ran = t + 1
        if valid is not None and valid.targets is not None and control.evaluates_at(done, cfg):
            val_acc = evaluate(model, valid)
            backed_off = budget is not None and budget.observe(done, val_acc, model, opt, cfg.iterations)
            evaluated = -1 if backed_off else done  # a roll-back brought another state
            emit(done, "backoff" if backed_off else "eval", val_acc)
        elif done % cfg.log_every == 0 or done == cfg.iterations:
            emit(done, "progress")
        if ckpt is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            save(done)
            if cb.on_checkpoint is not None:
                cb.on_checkpoint(done, ckpt)
        if control.finished(done):
            if not history or history[-1].iteration != done:
                emit(done, "progress")
            break

    restored = False
    if valid is not None and valid.targets is not None:
        if evaluated != ran or val_acc is None:  # else the last iteration's evaluation measured this very model
            val_acc = evaluate(model, valid)
        if budget is not None:
            restored = budget.finish(val_acc, model, opt)
            if restored:
                val_acc = evaluate(model, valid)
    return FitResult(
        iterations=ran,
        seconds=time.perf_counter() - began,
        val_acc=val_acc,
        backoffs=budget.backoffs if budget is not None else 0,
        restored_last_good=restored,
        history=history,
        micro_batches=micro,
    )
