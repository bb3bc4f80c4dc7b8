"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, each through its own library.

Each is optional (``pip install 'opd-fast[tracking]'`` installs all three). One that is switched on but
not installed is said once, with both ways out, and the run goes on with ``metrics.jsonl``. A resumed
run continues the same tracker run: wandb by ``id = run id`` with ``resume="allow"``, MLflow by the
run tagged with that id, TensorBoard by its event directory in the run directory.

What they receive: every metrics row's numbers (``eval/`` prefixed for evaluation rows), and the sample
completions every ``metrics.samples_every`` steps as a table (wandb ``Table``, MLflow ``log_table``,
TensorBoard text).

Public API: ``Tracker``, ``SampleRecord``, ``RunIdentity``, ``open_trackers``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import MetricsConfig

RUN_ID_TAG = "opd_fast.run_id"


@dataclass(frozen=True)
class SampleRecord:
    """One logged completion: what the student wrote, its reward, and how far it was from the teacher."""

    step: int
    domain: str
    prompt: str
    completion: str
    reference: str
    reward: float  # the domain's verifier (loss.verifiers, the task's verify, or exact match vs the reference)
    divergence_per_token: float  # mean over the completion's tokens of the configured divergence
    tokens: int


@dataclass(frozen=True)
class RunIdentity:
    """What names a run in every tracker: the run id kept across resumes, a display name, the config."""

    run_id: str
    name: str
    config: dict[str, Any]


class Tracker(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def samples(self, records: list[SampleRecord], step: int) -> None: ...

    def close(self) -> None: ...


def _columns(records: list[SampleRecord]) -> tuple[list[str], list[list[Any]]]:
    names = [f.name for f in dataclasses.fields(SampleRecord)]
    return names, [list(dataclasses.astuple(r)) for r in records]


class TensorBoardTracker:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def samples(self, records: list[SampleRecord], step: int) -> None:
        names, rows = _columns(records)
        cells = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        cells += ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", "\\n") for v in row) + " |"
                  for row in rows]
        self.writer.add_text("samples", "\n".join(cells), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, cfg: MetricsConfig, run_dir: Path, identity: RunIdentity) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.wandb_project, name=identity.name, id=identity.run_id, resume="allow",
                              dir=str(run_dir), config=identity.config, mode=cfg.wandb_mode or None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def samples(self, records: list[SampleRecord], step: int) -> None:
        names, rows = _columns(records)
        self.run.log({"samples": self.wandb.Table(columns=names, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, cfg: MetricsConfig, identity: RunIdentity) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri or None)
        experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(cfg.mlflow_experiment))
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{identity.run_id}'")
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=identity.name,
                                                 tags={RUN_ID_TAG: identity.run_id}).info.run_id
            self.client.log_dict(self.run_id, identity.config, "config.json")

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])

    def samples(self, records: list[SampleRecord], step: int) -> None:
        names, rows = _columns(records)
        self.client.log_table(self.run_id, {n: [row[i] for row in rows] for i, n in enumerate(names)},
                              f"samples/step-{step:08d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# tracker -> (the config key that switches it on, the package its library comes from)
SWITCHES = {"tensorboard": ("metrics.tensorboard", "tensorboard"), "wandb": ("metrics.wandb", "wandb"),
            "mlflow": ("metrics.mlflow", "mlflow-skinny")}


def open_trackers(cfg: MetricsConfig, run_dir: Path, identity: RunIdentity) -> list[Tracker]:
    """The trackers ``cfg`` switches on; one whose library is missing is skipped with one warning."""
    makers = {"tensorboard": lambda: TensorBoardTracker(run_dir), "wandb": lambda: WandbTracker(cfg, run_dir, identity),
              "mlflow": lambda: MlflowTracker(cfg, identity)}
    trackers: list[Tracker] = []
    for name, make in makers.items():
        if not getattr(cfg, name):
            continue
        key, package = SWITCHES[name]
        try:
            trackers.append(make())
        except ImportError:
            warnings.warn(f"{key} is on but the {package} package is not installed: metrics go to metrics.jsonl "
                          f"only (pip install {package}, or 'opd-fast[tracking]' for every tracker; or set "
                          f"{key}=false)", stacklevel=3)
    return trackers
