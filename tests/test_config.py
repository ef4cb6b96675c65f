import dataclasses

import pytest

from metatta.config import ConfigError, apply_override, build_dataclass, load_config


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 1


@dataclasses.dataclass
class Outer:
    name: str = "x"
    inner: Inner = dataclasses.field(default_factory=Inner)
    tags: list[str] = dataclasses.field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.999)
    maybe: int | None = None


def test_build_nested_and_coerce():
    cfg = build_dataclass(Outer, {"inner": {"lr": "1e-4", "steps": 3}, "tags": ["a"], "betas": [0.5, 0.6]})
    assert cfg.inner.lr == 1e-4 and cfg.inner.steps == 3
    assert cfg.betas == (0.5, 0.6) and cfg.tags == ["a"] and cfg.maybe is None


@pytest.mark.parametrize(
    "values, field",
    [
        ({"nope": 1}, "nope"),
        ({"inner": {"steps": 1.5}}, "inner.steps"),
        ({"inner": {"lr": "fast"}}, "inner.lr"),
        ({"betas": [0.1]}, "betas"),
        ({"name": 3}, "name"),
        ({"maybe": "x"}, "maybe"),
    ],
)
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        build_dataclass(Outer, values, where="cfg")


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stream: {batch_size: 200}\nmethods:\n  - {name: tent}\n")
    data = load_config(path, ["stream.batch_size=16", "methods.0.config.lr=1e-4", "new.key=true"])
    assert data["stream"]["batch_size"] == 16
    assert data["methods"][0]["config"]["lr"] == 1e-4
    assert data["new"]["key"] is True


def test_override_errors(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override({}, "novalue")
    with pytest.raises(ConfigError, match="index"):
        apply_override({"methods": []}, "methods.3.lr=1")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
