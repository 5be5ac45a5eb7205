"""The resource check that refuses a job whose actor pools would leave no room for its tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ResourcesConfig, StageResources
from pipeline.dataflow import resource_shortfall


def resources(invert_cpus: float, score_cpus: float, invert_gpus: float = 0.0) -> ResourcesConfig:
    return ResourcesConfig(
        invert_edit=StageResources(num_cpus=invert_cpus, num_gpus=invert_gpus),
        score=StageResources(num_cpus=score_cpus, batch_size=16),
    )


def test_default_resources_fit_two_cpus():
    assert resource_shortfall(ResourcesConfig(), {"CPU": 2.0}) is None


def test_pools_holding_every_cpu_are_refused_with_the_keys_to_change():
    # 1 + 1 CPUs held by the pools leaves nothing for the 0.5-CPU read tasks: the job would never start.
    message = resource_shortfall(resources(1.0, 1.0), {"CPU": 2.0})
    assert message is not None
    assert "resources.invert_edit: 1 x 1.0" in message and "resources.score: 1 x 1.0" in message
    assert "num_cpus" in message and "2 CPU" in message
    assert resource_shortfall(resources(1.0, 1.0), {"CPU": 3.0}) is None


def test_missing_gpus_are_named():
    message = resource_shortfall(resources(0.5, 0.5, invert_gpus=1.0), {"CPU": 8.0})
    assert message is not None and "GPU" in message and "num_gpus" in message
    assert resource_shortfall(resources(0.5, 0.5, invert_gpus=1.0), {"CPU": 8.0, "GPU": 1.0}) is None


@dataclass(frozen=True)
class WithCaptioning(ResourcesConfig):
    """The resources of a job with one more task stage."""

    caption: StageResources = field(default_factory=lambda: StageResources(num_cpus=1.5))


def test_every_task_stage_of_the_resources_is_checked():
    # The pools hold 0.5 + 0.5 CPUs; the added stage's 1.5-CPU tasks no longer fit beside them.
    message = resource_shortfall(WithCaptioning(), {"CPU": 2.0})
    assert message is not None and "resources.caption.num_cpus needs 1.5 more" in message
    assert resource_shortfall(WithCaptioning(), {"CPU": 2.5}) is None
