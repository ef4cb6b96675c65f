"""An experiment row's models:/...@alias is resolved once, before any row runs: the row loads that
version, and the Result protocol records the version and the sha256 of its files."""
import json

import pytest
import torch
import yaml

from metatta import tracking
from metatta.experiment import MethodSpec
from metatta.references import pin_references, reference_record
from metatta.safe_files import sha256_file


@pytest.fixture
def mlflow_uri(module_mlflow_uri):  # one store for the module: each test registers its own model names
    return module_mlflow_uri


def write_adapter(directory, value):
    directory.mkdir(parents=True)
    torch.save({"w": torch.tensor([float(value)])}, directory / tracking.ADAPTER_WEIGHTS)
    (directory / tracking.ADAPTER_CONFIG).write_text(json.dumps({"kind": "mgg"}))
    return directory


def test_aliases_are_pinned_to_their_version_and_hashed(tmp_path, mlflow_uri):
    with tracking.start_run("r", experiment="refs") as run:
        for value in (1, 2):
            version = tracking.register_adapter("mgg_r", write_adapter(tmp_path / f"a{value}", value), run.info.run_id)
            tracking.promote_if_better("mgg_r", version, 10.0 - value)
        settings_dir = tracking.write_settings_dir(tmp_path / "s", {"lr": 0.01}, {"method": "tent"})
        tracking.register_settings("tent_s", settings_dir, run.info.run_id)
        tracking.promote_if_better("tent_s", "1", 5.0)
    specs = [MethodSpec("source"),
             MethodSpec("mgtta", adapter="models:/mgg_r@champion"),
             MethodSpec("mgtta", label="again", adapter="models:/mgg_r@champion", settings="models:/tent_s@champion"),
             MethodSpec("mgtta", label="local", adapter=str(tmp_path / "a1"))]
    pinned, records = pin_references(specs)
    assert [s.adapter for s in pinned] == [None, "models:/mgg_r/2", "models:/mgg_r/2", str(tmp_path / "a1")]
    assert pinned[2].settings == "models:/tent_s/1" and specs[1].adapter == "models:/mgg_r@champion"
    assert records[0] == {}
    adapter = records[1]["adapter"]
    weights_sha = sha256_file(tmp_path / "a2" / tracking.ADAPTER_WEIGHTS)
    assert {k: adapter[k] for k in ("ref", "name", "alias", "version", "uri", "sha256")} == {
        "ref": "models:/mgg_r@champion", "name": "mgg_r", "alias": "champion", "version": "2",
        "uri": "models:/mgg_r/2", "sha256": weights_sha}
    assert set(adapter["files"]) == {tracking.ADAPTER_WEIGHTS, tracking.ADAPTER_CONFIG}
    assert records[2]["adapter"] == adapter
    assert records[2]["settings"]["version"] == "1"
    assert records[2]["settings"]["sha256"] == sha256_file(settings_dir / tracking.SETTINGS_FILE)
    assert records[3]["adapter"]["path"] == str((tmp_path / "a1").resolve())
    assert records[3]["adapter"]["sha256"] == sha256_file(tmp_path / "a1" / tracking.ADAPTER_WEIGHTS)
    json.dumps(records)  # goes into results.json as is
    yaml.safe_dump(records)


def test_an_unknown_reference_fails_before_anything_runs(tmp_path, mlflow_uri):
    with pytest.raises(tracking.NotRegistered, match="no registered model 'nope'"):
        pin_references([MethodSpec("mgtta", adapter="models:/nope@champion")])
    with pytest.raises(FileNotFoundError, match="no such file"):
        reference_record(str(tmp_path / "absent"), "adapter")
