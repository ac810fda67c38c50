"""CompressSpec: the one mapping from a job's JSON spec to the engine's Target, MethodSettings and TrainConfig."""

import subprocess
import sys
from typing import Any

import pytest

from dns_core.defaults import BUILTIN_SETS, CODECS, METHODS
from dns_core.errors import ConfigError, InputError
from dns_core.spec import CompressSpec

JOB = {"method": "dns", "target": {"compression": 5.0, "max_accuracy_drop": 1.0}, "settings": {"iterations": 300}}


def test_a_job_spec_maps_to_the_engine_with_the_defaults() -> None:
    target, settings, config = CompressSpec.from_json(JOB, device="cpu", checkpoint_every=100).build()
    assert target is not None and (target.compression, target.max_accuracy_drop) == (5.0, 1.0)
    assert (settings.crate, settings.gamma, settings.power, settings.iter_stop) == (1.0, 1e-4, 1.0, None)
    assert (config.iterations, config.batch_size, config.lr, config.seed) == (300, 64, 0.01, 0)
    assert (config.device, config.checkpoint_every) == ("cpu", 100)
    assert (config.eval_every, config.log_every) == (12, 6)  # 25 evaluations; progress 50 times a run, ≤ 100 apart
    assert CompressSpec(iterations=25_000).train_config().log_every == 100


def test_the_json_wins_over_the_callers_defaults_and_null_takes_them() -> None:
    job = JOB | {"settings": {"iterations": None, "lr": 0.05, "seed": 7, "codec": "int8"}}
    spec = CompressSpec.from_json(job, iterations=20_000)
    assert (spec.iterations, spec.lr, spec.seed, spec.codec) == (20_000, 0.05, 7, "int8")


def test_the_crate_driven_method_takes_no_target() -> None:
    job = {"method": "dns-fixed-crates", "target": {"max_accuracy_drop": 1.0}, "settings": {"crates": {"fc1": 3}}}
    target, settings, _ = CompressSpec.from_json(job).build()
    assert target is None and settings.crates == {"fc1": 3.0}


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"method": "magic"}, "unknown method 'magic'"),
        (JOB | {"settings": {"codec": "zip"}}, "unknown codec 'zip'"),
        (
            JOB | {"settings": {"allocation": "even"}},
            "unknown allocation 'even'; choose one of balanced, global, layer, uniform",
        ),
        (JOB | {"settings": {"first_last": "keep"}}, "unknown first_last 'keep'; choose one of auto, dense, prune"),
        (JOB | {"settings": {"include": "fc*"}}, "include must be a list of layer names or glob patterns"),
        (JOB | {"settings": {"exclude": [""]}}, "exclude must hold non-empty strings"),
        (JOB | {"settings": {"include": []}}, "include must name at least one layer pattern"),
        (JOB | {"settings": {"gamma": "fast"}}, "gamma must be a number"),
        (JOB | {"settings": {"crate": 2.0, "power": 1}}, "crate, power set(s) the thresholds of the dns-fixed-crates"),
        (JOB | {"settings": {"lr": True}}, "lr must be a number"),
        (JOB | {"settings": {"lr": "nan"}}, "lr must be a finite number"),
        (JOB | {"settings": {"iterations": float("inf")}}, "iterations must be a number"),
        (JOB | {"settings": {"crates": {"fc1": "x"}}}, "crates['fc1'] must be a number"),
        (JOB | {"settings": {"momentum": 0.5}}, "unknown key(s) in the settings: momentum"),
        (JOB | {"priority": 1}, "unknown key(s) in the job spec: priority"),
        (JOB | {"target": [5]}, "target must be a JSON object"),
    ],
)
def test_a_spec_that_cannot_be_read_is_a_config_error(job: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        CompressSpec.from_json(job)
    assert message in str(e.value) and isinstance(e.value, InputError)


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"method": "agp"}, "give a target compression, per-layer kept fractions, or an accuracy budget alone"),
        ({"method": "one-shot", "target": {"max_accuracy_drop": 0.5}}, "needs a compression"),
        (JOB | {"settings": {"lr": -1}}, "lr must be positive"),
    ],
)
def test_settings_that_cannot_work_together_fail_on_build_as_input_errors(job: dict[str, Any], message: str) -> None:
    spec = CompressSpec.from_json(job)
    with pytest.raises(InputError, match=message):
        spec.build()


def test_the_lists_and_the_spec_load_without_torch() -> None:
    code = "import sys, dns_core.spec, dns_core.defaults, dns_core.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "dns-fixed-crates" in METHODS and "int8" in CODECS and "digits" in BUILTIN_SETS
