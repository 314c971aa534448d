"""Ray fan-out: one task per model, in parallel; the driver commits what passed, skips what is current."""
import io

import pytest

from contract import manifest
from contract.config import ModelConfig, ProjectConfig
from export_jobs.run import export_models
from tests.tiny import make_tiny_bert

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_two_models_export_in_parallel_then_skip(ray_local, tmp_path):
    a = make_tiny_bert(tmp_path / "a", seed=1)
    b = make_tiny_bert(tmp_path / "b", seed=2, normalize=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    config = ProjectConfig(artifacts=str(tmp_path / "art"), models=(
        ModelConfig(id="a", source=str(a)), ModelConfig(id="b", source=str(b), mode="plain"),
        ModelConfig(id="broken", source=str(broken))))
    log = io.StringIO()
    results = {r.id: r for r in export_models(config, out=log)}
    assert results["a"].status == results["b"].status == "ok"
    assert results["broken"].status == "failed" and "broken" in log.getvalue()
    # the two good tasks overlapped in time: they ran in parallel, not one after the other
    assert results["a"].started < results["b"].finished and results["b"].started < results["a"].finished
    entries = manifest.load(config.artifacts)
    assert set(entries) == {"a", "b"}
    assert entries["a"].metadata.normalize is True and entries["b"].metadata.mode == "plain"
    again = export_models(config, only=["a", "b"], out=None)
    assert {r.status for r in again} == {"skipped"}
    assert "max abs diff" in log.getvalue()  # the summary table
