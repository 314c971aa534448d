"""The manifest: atomic, verified, and only ever pointing at complete artifacts."""
import json

import pytest

from contract import manifest
from contract.manifest import EncoderMeta, ManifestEntry, ManifestError, Parity


def _entry(root, model_id="m", text="graph") -> ManifestEntry:
    staging = manifest.new_staging(root, model_id)
    (staging / "model.onnx").write_text(text)
    files = manifest.describe_files(staging)
    directory = manifest.publish(root, model_id, staging)
    return ManifestEntry(id=model_id, task="embedding", family="bert", source="x", fingerprint="f",
                         directory=directory, files=files, opset=18,
                         parity=Parity(max_abs_diff=1e-7, tolerance=1e-4, cases=3),
                         metadata=EncoderMeta(tokenizer="tokenizer.json", mode="sentence", inputs=("input_ids",),
                                              outputs=("sentence_embedding",), model_type="bert"))


def test_commit_load_verify(tmp_path):
    entry = _entry(tmp_path)
    manifest.commit(tmp_path, entry)
    loaded = manifest.load(tmp_path)["m"]
    assert loaded == entry
    manifest.verify(tmp_path, loaded)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["models"]["m"]["files"][0]["sha256"] == entry.files[0].sha256


def test_verify_detects_tampering(tmp_path):
    entry = _entry(tmp_path)
    manifest.commit(tmp_path, entry)
    entry.model_path(tmp_path).write_text("grapH")
    with pytest.raises(ManifestError, match="differs"):
        manifest.verify(tmp_path, entry)


def test_verify_only_named_files(tmp_path):
    """The ingress checks the tokenizer it loads, not the whole model: ``only`` limits the check to those files."""
    entry = _entry(tmp_path)
    manifest.commit(tmp_path, entry)
    entry.model_path(tmp_path).write_text("grapH")
    manifest.verify(tmp_path, entry, only={"tokenizer.json"})  # not an entry file: nothing to check
    with pytest.raises(ManifestError, match="model.onnx"):
        manifest.verify(tmp_path, entry, only={"model.onnx"})


def test_commit_refuses_entry_without_files(tmp_path):
    entry = _entry(tmp_path)
    entry.model_path(tmp_path).unlink()
    with pytest.raises(ManifestError):
        manifest.commit(tmp_path, entry)
    assert manifest.load(tmp_path) == {}


def test_new_version_replaces_entry_and_keeps_other_models(tmp_path):
    manifest.commit(tmp_path, _entry(tmp_path, "a"))
    manifest.commit(tmp_path, _entry(tmp_path, "b"))
    newer = _entry(tmp_path, "a", "graph v2")
    manifest.commit(tmp_path, newer)
    entries = manifest.load(tmp_path)
    assert set(entries) == {"a", "b"} and entries["a"].directory == newer.directory
    assert not list(tmp_path.glob(".manifest.json.*.tmp"))


def test_an_entry_from_an_older_exporter_is_not_served(tmp_path):
    """Untyped metadata (before artifact kinds) does not load: the model counts as not exported, so the app builder
    exports it again instead of failing on every entry of the manifest."""
    manifest.commit(tmp_path, _entry(tmp_path, "new"))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    old = dict(raw["models"]["new"], id="old", metadata={"tokenizer": "tokenizer.json", "mode": "sentence"})
    raw["models"]["old"] = old
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert set(manifest.load(tmp_path)) == {"new"}


def test_reexports_are_versions_and_only_the_newest_two_stay(tiny_bert_dir, tmp_path):
    """A re-export (export_jobs --force) publishes beside the served version and switches the manifest; the
    version before stays for replicas of the app built on it; a third export removes the oldest."""
    from contract.config import ModelConfig, ProjectConfig
    from export_jobs.job import export_one

    cfg = ModelConfig(id="tiny", source=str(tiny_bert_dir))
    keep = ProjectConfig(models=(cfg,)).keep_versions
    assert keep == 2

    def reexport() -> tuple[ManifestEntry, list[str]]:
        entry = export_one(cfg, tmp_path)
        before = manifest.load(tmp_path).get("tiny")
        if before is not None:  # published, not yet switched: the manifest still serves the previous one
            assert (tmp_path / entry.directory).is_dir() and before.directory != entry.directory
        return entry, manifest.commit(tmp_path, entry, keep=keep)

    (first, removed), (second, removed_2) = reexport(), reexport()
    assert removed == removed_2 == []
    assert manifest.versions(tmp_path, "tiny") == [first.dir_path(tmp_path).name, second.dir_path(tmp_path).name]
    assert manifest.load(tmp_path)["tiny"].directory == second.directory
    manifest.verify(tmp_path, first)  # the previous version is intact: its replicas can still start
    third, removed_3 = reexport()
    assert removed_3 == [first.directory] and not first.dir_path(tmp_path).exists()
    assert manifest.versions(tmp_path, "tiny") == [second.dir_path(tmp_path).name, third.dir_path(tmp_path).name]
    assert manifest.load(tmp_path)["tiny"] == third
    manifest.verify(tmp_path, second)
    manifest.verify(tmp_path, third)


def test_keep_one_leaves_only_the_served_version_and_ignores_other_directories(tmp_path):
    first = _entry(tmp_path, "a")
    manifest.commit(tmp_path, first)
    (tmp_path / "a" / "notes").mkdir()  # not a version name: never removed
    newer = _entry(tmp_path, "a", "graph v2")
    assert manifest.commit(tmp_path, newer, keep=1) == [first.directory]
    assert manifest.versions(tmp_path, "a") == [newer.dir_path(tmp_path).name]
    assert (tmp_path / "a" / "notes").is_dir()
    with pytest.raises(ValueError, match="at least 1"):
        manifest.commit(tmp_path, _entry(tmp_path, "a", "graph v3"), keep=0)
    assert manifest.load(tmp_path)["a"] == newer  # refused before the switch
