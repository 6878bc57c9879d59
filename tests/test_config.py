"""The run config: types converted, bad input rejected with the offending key named."""

import json
from pathlib import Path

import pytest
import yaml

from dist_audio.config import (
    ConfigError,
    SashimiConfig,
    TFSWAConfig,
    config_from_dict,
    load_config,
    save_config,
)
from dist_audio.data.manifest import check_data_compatible

BASE = {
    "model": {"name": "sashimi", "d_model": 16, "n_layers": 2},
    "data": {"shards": "somewhere", "batch_size": 2, "segment_seconds": 0.5},
    "train": {"max_steps": 3},
}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_loads_typed_sections_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert isinstance(cfg.model, SashimiConfig)
    assert cfg.model.d_model == 16 and cfg.model.s4.mode == "diag"
    assert cfg.data.batch_size == 2 and cfg.optim.lr == 1e-3
    assert cfg.run_dir == Path("runs") / "run"


def test_overrides_reach_nested_keys_and_parse_values(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=3e-4", "model.s4.mode=dplr", "model.s4.init=legs",
                                              "model.pool=[2, 2]", "train.name=exp1"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.s4.mode == "dplr" and cfg.model.pool == [2, 2]
    assert cfg.train.name == "exp1"


def test_override_switches_model(tmp_path):
    raw = {**BASE, "model": {"name": "tfswa"}, "data": {**BASE["data"], "task": "separation"}}
    cfg = load_config(write(tmp_path, raw))
    assert isinstance(cfg.model, TFSWAConfig) and cfg.model.sources == ["drums", "bass", "other", "vocals"]


@pytest.mark.parametrize(
    ("override", "key", "text"),
    [
        ("optim.lrr=1", "optim.lrr", "unknown key"),
        ("model.d_model=abc", "model.d_model", "expected an integer"),
        ("model.glu=1", "model.glu", "expected true or false"),
        ("data.batch_size=-1", "data.batch_size", "must be > 0"),
        ("model.s4.mode=fancy", "model.s4.mode", "must be one of"),
        ("model.name=wavenet", "model.name", "must be one of"),
        ("data.bits=4", "data.bits", "must equal model.bits"),
        ("data.task=separation", "data.task", "trains on 'autoregressive'"),
        ("model.s4.mode=dplr", "model.s4.init", "legs"),
        ("nosection.x=1", "nosection", "unknown key"),
        ("data=3", "data", "expected a mapping"),
        ("optim.lr", "optim.lr", "key.path=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, key, text):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), [override])
    assert err.value.key == key
    assert text in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["model.head=dml", "optim.betas=[0.8, 0.99]"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "saved.yaml").read_text()))
    assert again == cfg


def _manifest(tmp_path: Path, **fields) -> Path:
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"layout": "files", "channels": 1, "sample_rate": 16000, "stems": [], "options": {"chunk_seconds": 2.0},
                "splits": {"train": {"samples": 4, "min_seconds": 1.0}}}
    manifest.update(fields)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards


def test_data_checks_against_manifest(tmp_path):
    shards = _manifest(tmp_path)
    cfg = config_from_dict({**BASE, "data": {**BASE["data"], "shards": str(shards)}})
    check_data_compatible(cfg)
    cfg.model.sample_rate = 8000
    with pytest.raises(ConfigError, match="16000 Hz audio") as err:
        check_data_compatible(cfg)
    assert err.value.key == "model.sample_rate"
    cfg.model.sample_rate = 16000
    cfg.data.segment_seconds = 1.5
    with pytest.raises(ConfigError, match="longer than the shortest training chunk") as err:
        check_data_compatible(cfg)
    assert err.value.key == "data.segment_seconds"
    cfg.data.shards = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="directory not found"):
        check_data_compatible(cfg)


def test_separation_needs_matching_stems(tmp_path):
    shards = _manifest(tmp_path, layout="musdb", channels=2, stems=["mixture", "drums", "bass"])
    raw = {"model": {"name": "tfswa", "sources": ["drums", "vocals"], "sample_rate": 16000},
           "data": {"shards": str(shards), "task": "separation", "sources": ["drums", "vocals"]}}
    with pytest.raises(ConfigError, match="not among the shards' stems") as err:
        check_data_compatible(config_from_dict(raw))
    assert err.value.key == "model.sources"
