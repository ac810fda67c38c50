import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from dns_core import DNS, Callbacks, Cancelled, Progress, Target, TrainConfig, evaluate, fit, models
from dns_core.checkpoint import load_state, remove_stale_temporaries, save_state
from dns_core.compress import compress
from dns_core.data import BatchStream, Dataset, synthetic_classification
from dns_core.reference import train_reference
from dns_core.train import Controller


def _run(tmp: Path, cancel_at: int | None, iterations: int = 30) -> tuple[nn.Module, DNS, list[Progress]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    surgery = DNS(model, crate=0.3, gamma=0.05, iter_stop=25, seed=7)
    data = synthetic_classification(256, shape=(1, 8, 8), num_classes=4)
    history: list[Progress] = []
    cb = Callbacks(
        on_progress=history.append, should_cancel=(lambda: len(history) >= cancel_at) if cancel_at is not None else None
    )
    cfg = TrainConfig(
        iterations=iterations,
        batch_size=16,
        lr=0.05,
        log_every=1,
        cancel_every=1,
        checkpoint_every=10,
        eval_every=0,
        device="cpu",
    )
    fit(model, data, cfg, surgery=surgery, callbacks=cb, checkpoint=tmp)
    return model, surgery, history


def test_resumed_run_matches_uninterrupted_step_for_step(tmp_path: Path) -> None:
    full_model, full_surgery, full_hist = _run(tmp_path / "a.ckpt", None)
    with pytest.raises(Cancelled):
        _run(tmp_path / "b.ckpt", cancel_at=17)  # dies after iteration 17; last checkpoint at 10
    assert load_state(tmp_path / "b.ckpt")["iteration"] == 10
    model, surgery, hist = _run(tmp_path / "b.ckpt", None)  # a new process would build fresh objects too
    assert [p.iteration for p in hist] == list(range(11, 31))
    assert [p.loss for p in hist] == [p.loss for p in full_hist[10:]]
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    assert surgery.stats == full_surgery.stats
    assert [r.kept for r in surgery.report()] == [r.kept for r in full_surgery.report()]


def test_checkpoint_files_hold_no_pickle(tmp_path: Path) -> None:
    state: dict[str | int, object] = {"a": torch.arange(3), "b": [1, 2.5, "x", None, {"c": torch.ones(2)}], 4: True}
    save_state(tmp_path / "s.ckpt", state)
    raw = (tmp_path / "s.ckpt").read_bytes()
    assert b"\x80\x04" not in raw[:16]  # safetensors, not a pickle stream
    back = load_state(tmp_path / "s.ckpt")
    assert torch.equal(back["a"], torch.arange(3))
    assert back["b"][:4] == [1, 2.5, "x", None]
    assert torch.equal(back["b"][4]["c"], torch.ones(2))
    assert back[4] is True
    assert not list(tmp_path.glob(".*.tmp"))


def test_remove_stale_temporaries_leaves_the_checkpoint_and_other_files(tmp_path: Path) -> None:
    save_state(tmp_path / "s.ckpt", {"a": torch.ones(1)})
    stale = [tmp_path / ".s.ckpt.k3x_9q1z.tmp", tmp_path / ".s.ckpt.0a1b2c3d.tmp"]  # killed save_state calls
    kept = [tmp_path / ".other.ckpt.0a1b2c3d.tmp", tmp_path / "s.ckpt.tmp", tmp_path / ".s.ckptX.0a1b2c3d.tmp"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    folder = tmp_path / ".s.ckpt.zz9w8v7u.tmp"  # save_state's folder, safetensors' own temporary inside
    folder.mkdir()
    (folder / ".tmpAb3dEf").write_bytes(b"partial")
    stale.append(folder)
    assert remove_stale_temporaries(tmp_path / "s.ckpt") == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert load_state(tmp_path / "s.ckpt")["a"].item() == 1


def test_batch_stream_is_a_function_of_t() -> None:
    data = synthetic_classification(100, shape=(3,))
    a, b = BatchStream(data, 32, seed=1), BatchStream(data, 32, seed=1)
    assert torch.equal(a.batch(7)[0], b.batch(7)[0])
    assert torch.equal(a.batch(2)[0], BatchStream(data, 32, seed=1).batch(2)[0])
    assert not torch.equal(a.batch(0)[0], a.batch(3)[0])  # next epoch, new permutation


@pytest.fixture(scope="module")
def digits_reference(digits: tuple[Dataset, Dataset]) -> nn.Module:
    return train_reference("lenet-300-100", digits[0], epochs=15, device="cpu")


def test_target_controller_hits_its_target(digits: tuple[Dataset, Dataset], digits_reference: nn.Module) -> None:
    train, valid = digits
    cfg = TrainConfig(iterations=600, eval_every=100, device="cpu")
    result = compress(
        copy.deepcopy(digits_reference), train, valid, method="dns", target=Target(compression=25.0), config=cfg
    )
    assert result.report["compression"] == pytest.approx(25.0, rel=0.05)
    assert result.report["val_acc"] > 80.0
    # the report says which timing ran: DNS's own, as no schedule was given
    assert result.report["settings"]["schedule"]["ramp_end"] == 0.3
    assert result.report["settings"]["schedule"]["surgery_end"] == 0.5
    # and how often its masks changed: 180 ramp iterations give at least 64 updates
    assert result.report["settings"]["schedule"]["update_interval"] == 2
    assert sum(p.numel() for p in result.model.parameters() if p.ndim > 1) > 0


def test_label_free_self_distillation_holds_a_high_compression_at_a_high_learning_rate(
    digits: tuple[Dataset, Dataset], digits_reference: nn.Module
) -> None:
    """At temperature 4 this run diverged (11% accuracy): the T²-scaled KL's gradient is 4x cross-entropy's."""
    train, valid = digits
    cfg = TrainConfig(iterations=1000, lr=0.03, eval_every=500, device="cpu")
    result = compress(
        copy.deepcopy(digits_reference), Dataset(train.inputs), valid, method="dns", target=Target(compression=50.0),
        config=cfg,
    )  # fmt: skip
    assert result.report["train"]["objective"] == "distill"
    assert evaluate(result.model, valid) > evaluate(digits_reference, valid) - 5.0


def test_label_free_self_distillation(digits: tuple[Dataset, Dataset], digits_reference: nn.Module) -> None:
    train, valid = digits
    unlabeled = Dataset(train.inputs)
    cfg = TrainConfig(iterations=300, eval_every=100, device="cpu")
    result = compress(
        copy.deepcopy(digits_reference),
        unlabeled,
        Dataset(valid.inputs),
        method="dns",
        target=Target(compression=10.0),
        config=cfg,
    )
    assert result.report["train"]["objective"] == "distill"
    assert result.report["val_acc"] > 80.0  # agreement with the dense model, in percent
    assert evaluate(result.model, valid) > 80.0  # and it still classifies


def test_cross_entropy_needs_labels() -> None:
    model = models.build("lenet-300-100")
    with pytest.raises(ValueError, match="needs labels"):
        fit(model, Dataset(torch.randn(64, 1, 28, 28)), TrainConfig(iterations=2, device="cpu"))


def test_bad_train_config() -> None:
    with pytest.raises(ValueError):
        TrainConfig(iterations=10, lr=0)
    with pytest.raises(ValueError):
        TrainConfig(iterations=10, objective="mse")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_surgery_with_bf16_autocast() -> None:
    model = models.build("lenet-5")
    surgery = DNS(model, crate=1.0, iter_stop=50)
    data = synthetic_classification(512)
    fit(model, data, TrainConfig(iterations=50, device="cuda"), surgery=surgery)
    assert next(model.parameters()).is_cuda
    assert surgery.compression() > 1.0
    conv = surgery.layers[0].dense("weight")
    assert conv.dim() == 4 and conv.is_contiguous(memory_format=torch.channels_last)  # convolutions in NHWC


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compress_reports_its_own_peak_memory(digits: tuple[Dataset, Dataset]) -> None:
    train, valid = digits
    result = compress(models.build("lenet-300-100"), train, valid, target=Target(compression=4.0),
                      config=TrainConfig(iterations=20, batch_size=32, device="cuda", eval_every=0))  # fmt: skip
    peak = result.report["peak_memory"]
    assert peak["device"].startswith("cuda") and peak["scope"] == "run" and 0 < peak["bytes"] < 2**30
    # given on the CPU, trained on CUDA, handed back on the CPU: its figures are the CPU's
    assert next(result.model.parameters()).device.type == "cpu"
    assert result.report["val_acc"] == evaluate(result.model, valid)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    _run(tmp_path / "a.ckpt", None, iterations=10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    surgery = DNS(model, crate=0.3, gamma=0.05, iter_stop=25, seed=7)
    data = synthetic_classification(256, shape=(1, 8, 8), num_classes=4)
    cfg = TrainConfig(iterations=40, batch_size=16, lr=0.05, eval_every=0, device="cpu")
    with pytest.raises(ValueError, match="different run: iterations"):
        fit(model, data, cfg, surgery=surgery, checkpoint=tmp_path / "a.ckpt")


def test_evaluation_runs_in_cache_sized_batches_on_a_cpu_and_counts_every_example() -> None:
    from dns_core.train import EVAL_BATCH_CPU, EVAL_BATCH_GPU, agreement, eval_batch_size

    torch.manual_seed(0)
    data = synthetic_classification(1000, shape=(1, 8, 8), num_classes=4)
    seen: list[int] = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    teacher = copy.deepcopy(model)
    model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    with torch.no_grad():
        teacher.get_parameter("3.weight").mul_(-1)  # another model: it agrees on some examples only
        logits = model(data.inputs)
        want = 100.0 * float((logits.argmax(1) == data.targets).sum()) / len(data)
        agree = 100.0 * float((logits.argmax(1) == teacher(data.inputs).argmax(1)).sum()) / len(data)
    seen.clear()
    assert evaluate(model, data) == pytest.approx(want)
    assert max(seen) == EVAL_BATCH_CPU < len(data) and sum(seen) == len(data)
    seen.clear()
    assert agreement(model, teacher, data) == pytest.approx(agree) and 0 < agree < 100
    assert max(seen) == EVAL_BATCH_CPU and sum(seen) == len(data)
    seen.clear()
    assert evaluate(model, data, batch_size=300) == pytest.approx(want)
    assert seen == [300, 300, 300, 100]
    assert eval_batch_size(torch.device("cuda")) == EVAL_BATCH_GPU > EVAL_BATCH_CPU


def test_batchnorm_statistics_are_re_estimated_from_the_data() -> None:
    from dns_core.train import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 3))
    data = synthetic_classification(256, shape=(1, 8, 8), num_classes=3)
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.fill_(5.0)  # stale statistics, as after pruning
        bn.running_var.fill_(9.0)
        conv_out = model[0](data.inputs)
    model.train()
    assert recalibrate_batchnorm(model, data, batches=200, batch_size=64, seed=1) == 1
    assert model.training and bn.momentum == 0.1  # modes and momentum as they were
    want_mean, want_var = conv_out.mean((0, 2, 3)), conv_out.var((0, 2, 3))
    assert torch.allclose(bn.running_mean, want_mean, atol=0.05)
    assert torch.allclose(bn.running_var, want_var, rtol=0.1)
    assert recalibrate_batchnorm(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), data) == 0


def test_compress_reports_the_batchnorm_step(digits: tuple[Dataset, Dataset]) -> None:
    train, valid = digits
    model = models.build("resnet-small", width=4)
    result = compress(model, train, valid, target=Target(compression=2.0),
                      config=TrainConfig(iterations=30, batch_size=32, device="cpu", eval_every=0))  # fmt: skip
    norm = result.report["batchnorm"]
    assert norm["layers"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert norm["val_acc"] == result.report["val_acc"] == max(norm["val_acc_before"], norm["val_acc_after"])
    assert norm["kept"] == (norm["val_acc_after"] >= norm["val_acc_before"])
    assert result.report["val_acc"] == evaluate(result.model, valid)
    # the stem and the head are small beside what 2x keeps: left dense, and said so
    assert result.report["left_dense"] == ["stem.0", "fc"]
    whole = {layer["name"] for layer in result.report["layers"] if layer["kept"] == layer["total"]}
    assert whole == {"stem.0", "fc"}  # reported whole, beside the pruned layers
    peak = result.report["peak_memory"]
    assert peak["device"] == "cpu" and peak["scope"] == "process" and peak["bytes"] > 10 * 2**20
    lenet = compress(models.build("lenet-300-100"), train, valid, target=Target(compression=2.0),
                     config=TrainConfig(iterations=10, batch_size=32, device="cpu", eval_every=0))  # fmt: skip
    assert lenet.report["batchnorm"] is None


def test_compress_measures_each_model_once_on_each_set(digits: tuple[Dataset, Dataset]) -> None:
    """The reference once on validation and test (not at all where the caller has its figures), the pruned
    model once on each: squashing keeps the function, so the training loop's last evaluation stands."""
    train, valid = digits
    test = valid.subset(torch.arange(100))
    cfg = TrainConfig(iterations=10, batch_size=32, device="cpu", eval_every=0)
    seen = {"valid": 0, "test": 0}  # examples of each set through the model
    sets = {"valid": valid.inputs.untyped_storage().data_ptr(), "test": test.inputs.untyped_storage().data_ptr()}

    def count(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        for name, ptr in sets.items():
            seen[name] += len(args[0]) if args[0].untyped_storage().data_ptr() == ptr else 0

    def counted() -> nn.Module:
        torch.manual_seed(0)
        model = models.build("lenet-300-100")
        model.register_forward_pre_hook(count)
        return model

    model = counted()
    ref = (evaluate(model, valid), evaluate(model, test))
    seen.update(valid=0, test=0)
    result = compress(model, train, valid, target=Target(compression=2.0), config=cfg, test=test)
    assert seen == {"valid": 2 * len(valid), "test": 2 * len(test)}
    assert (result.report["reference_val_acc"], result.report["reference_test_acc"]) == ref
    assert result.report["val_acc"] == evaluate(result.model, valid)
    assert result.report["test_acc"] == evaluate(result.model, test)
    model = counted()
    seen.update(valid=0, test=0)
    given = compress(model, train, valid, target=Target(compression=2.0), config=cfg, test=test, reference_acc=ref)
    assert seen == {"valid": len(valid), "test": len(test)}
    assert (given.report["reference_val_acc"], given.report["reference_test_acc"]) == ref
    assert (given.report["val_acc"], given.report["test_acc"]) == (result.report["val_acc"], result.report["test_acc"])
    # evaluations every 5 iterations of 10: the one at the last iteration is the final figure, not measured again
    model = counted()
    seen.update(valid=0, test=0)
    done = fit(model, train, replace(cfg, eval_every=5), valid=valid)
    assert seen == {"valid": 2 * len(valid), "test": 0}
    assert done.val_acc == evaluate(model, valid) == done.history[-1].val_acc

    class RollsBack(Controller):
        """Brings another state back at the last evaluation, as a budget search does after a miss."""

        def evaluates_at(self, done: int, cfg: TrainConfig) -> bool:
            return done == cfg.iterations

        def observe(self, t: int, val_acc: float, model: nn.Module, opt: torch.optim.Optimizer, total: int) -> bool:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()  # every example in one class
            return True

    model = counted()
    seen.update(valid=0, test=0)
    back = fit(model, train, cfg, valid=valid, budget=RollsBack())
    assert seen == {"valid": 2 * len(valid), "test": 0}  # the state brought back is measured again
    before = back.history[-1].val_acc  # the state that was evaluated, then replaced
    assert before is not None and back.val_acc == evaluate(model, valid) < before


def _trained(cfg: TrainConfig, data: Dataset, make: Callable[[], nn.Module] | None = None) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    model = make() if make is not None else models.build("lenet-300-100")
    surgery = DNS(model, crate=0.5, iter_stop=cfg.iterations)
    result = fit(model, data, cfg, surgery=surgery)
    return model, result.micro_batches


def test_micro_batches_add_up_to_the_batch_step(digits: tuple[Dataset, Dataset]) -> None:
    """Gradients summed over micro-batches are the batch's gradient: the same weights, to rounding."""
    cfg = TrainConfig(iterations=12, batch_size=32, device="cpu", eval_every=0)
    whole, _ = _trained(cfg, digits[0])
    split, micro = _trained(TrainConfig(**{**cfg.__dict__, "micro_batches": 4}), digits[0])
    assert micro == 4
    for (name, a), (_, b) in zip(whole.state_dict().items(), split.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    with pytest.raises(ValueError, match="micro_batches must be in"):
        TrainConfig(iterations=1, batch_size=8, micro_batches=9)


class _SmallMemory(nn.Module):
    """LeNet-300-100 that 'runs out of CUDA memory' on more than 8 examples at once."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> "_SmallMemory":
        self.net = models.build("lenet-300-100")  # from the caller's seed, as _trained builds its reference
        self.sizes: list[int] = []
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        out: torch.Tensor = self.net(x)
        return out


def test_a_batch_that_runs_out_of_memory_is_split_until_it_fits(digits: tuple[Dataset, Dataset]) -> None:
    cfg = TrainConfig(iterations=6, batch_size=32, device="cpu", eval_every=0)
    model = _SmallMemory()
    _, micro = _trained(cfg, digits[0], lambda: model.reset())
    assert micro == 4 and model.sizes[:3] == [32, 16, 8]  # halved until it fits, then kept
    assert set(model.sizes[3:]) == {8}
    reference, _ = _trained(TrainConfig(**{**cfg.__dict__, "micro_batches": 4}), digits[0])
    for (name, a), (_, b) in zip(model.net.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
