"""The one-call GPU benchmark (``bench/gpu_bench.py``), dry-run on CPU under the Triton interpreter.

Its numbers mean nothing here; the point is that every stage runs end to end (correctness against
float64, the big-shape row check, timing and JSON after every entry) so the script cannot rot
before the next GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "bench" / "gpu_bench.py"

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the dry run runs the Triton kernels on CPU tensors with TRITON_INTERPRET=1",
)


def _run(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--toy", "--out", str(out), "--dtypes", "fp32", "--repeats", "1",
         "--wheels", str(tmp_path / "no-wheels"), *options],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.is_file(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_dry_run_covers_every_stage(tmp_path):
    """One divergence and feature of each stage (the peers' own adapters are tested in this folder)."""
    proc, data = _run(tmp_path, "--divergences", "forward_kl", "--features", "teacher_lse", "--peers", "",
                      "--skip", "opd_fast[reverse_kl],opd_fast[jsd],opd_fast[jsd,cached]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = data["stages"]
    checks = stages["correctness"]
    features = {(c.get("divergence"), c.get("feature")) for c in checks if "feature" in c}
    assert features == {("forward_kl", "teacher_lse")}
    assert {c["loss"] for c in checks if "loss" in c} == {"topk_bucket", "logprobs_entropy"}
    assert all(c["ok"] for c in checks + stages["correctness_big_shape"]), checks
    timed = {t["implementation"]: t for t in stages["timing"]}
    assert {"gemm_floor", "opd_fast[forward_kl]", "opd_fast[forward_kl,cached]", "opd_fast[forward_kl,teacher_lse]",
            "naive_torch[forward_kl]"} <= set(timed)
    assert all(t["status"] == "ok" and t["median_ms"] > 0 for t in timed.values()), timed
    assert data["summary"] == {"checks": len(checks) + len(stages["correctness_big_shape"]), "failed": 0,
                               "skipped": 0}


def test_an_exhausted_budget_skips_and_still_writes_json(tmp_path):
    proc, data = _run(tmp_path, "--budget-s", "0", "--divergences", "tvd", "--peers", "")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert data["environment"]["interpreter"] is True
    assert data["summary"]["checks"] == len(data["stages"].get("correctness", []))
    skipped = [s["what"] for s in data["skipped"]]
    assert any(s.startswith("correctness fp32 tvd") for s in skipped)
    assert any(s.startswith("timing") for s in skipped)
