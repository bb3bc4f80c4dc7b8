"""Trackers (wandb offline, MLflow file store, missing packages) and sample completions in the run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from opd_fast.runner.config import MetricsConfig
from opd_fast.runner.metrics import SAMPLES_FILE, MetricsLogger, read_metrics
from opd_fast.runner.trackers import RunIdentity, SampleRecord, open_trackers
from opd_fast.runner.trainer import train

IDENTITY = RunIdentity(run_id="0123abcd", name="run", config={"optim": {"lr": 0.1}})
RECORD = SampleRecord(step=2, domain="a", prompt="ab=", completion="ab", reference="ab", reward=1.0,
                      divergence_per_token=0.25, tokens=2)


def log_two_steps(run_dir: Path, metrics: MetricsConfig, start_step: int = 0) -> None:
    logger = MetricsLogger(run_dir, total_steps=2, start_step=start_step, metrics=metrics, identity=IDENTITY)
    for step in range(start_step + 1, 3):
        logger.log({"step": step, "loss": 1.0 / step, "source": "student", "skipped": False})
    logger.log_samples([RECORD])
    logger.close()


def test_missing_tracker_packages_are_each_said_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("wandb", "mlflow", "mlflow.tracking", "mlflow.entities"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.warns(UserWarning) as caught:
        trackers = open_trackers(MetricsConfig(tensorboard=False, wandb=True, mlflow=True), tmp_path, IDENTITY)
    assert trackers == []
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "metrics.wandb is on but the wandb package is not installed" in messages[0]
    assert "metrics.mlflow is on but the mlflow-skinny package is not installed" in messages[1]
    assert all("opd-fast[tracking]" in m for m in messages)


def test_wandb_offline_run_is_written_under_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_two_steps(tmp_path, MetricsConfig(progress=False, tensorboard=False, wandb=True, wandb_mode="offline"))
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{IDENTITY.run_id}"))
    assert len(runs) == 1 and list(runs[0].glob(f"run-{IDENTITY.run_id}.wandb"))


def test_mlflow_file_store_gets_metrics_samples_and_resumes_the_same_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    metrics = MetricsConfig(progress=False, tensorboard=False, mlflow=True, mlflow_tracking_uri=uri)
    log_two_steps(tmp_path / "run", metrics)
    log_two_steps(tmp_path / "run", metrics, start_step=1)  # a resume continues the run tagged with the run id
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "opd-fast"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (1, 1.0), (2, 0.5), (2, 0.5)]
    assert "skipped" not in run.data.metrics and "source" not in run.data.metrics  # only numbers are metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/step-00000002.json"}


def test_sample_completions_every_n_steps(make_config, tmp_path: Path) -> None:
    train(make_config(tmp_path / "run", optim={"steps": 3}, metrics={"samples_every": 2, "samples_per_step": 3}))
    rows = read_metrics(tmp_path / "run", SAMPLES_FILE)
    assert [r["step"] for r in rows] == [2, 2, 2]
    assert set(rows[0]) == {"step", "domain", "prompt", "completion", "reference", "reward", "divergence_per_token",
                            "tokens"}
    assert all(r["divergence_per_token"] > -1e-5 and r["reward"] in (0.0, 1.0) for r in rows)
    assert json.loads((tmp_path / "run" / SAMPLES_FILE).read_text().splitlines()[0])["prompt"].endswith("=")
