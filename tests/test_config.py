import pytest

from makd.config import load_config, parse_overrides, save_config
from makd.errors import MakdError


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 8\nloss:\n  aspect_bce: {weight: 2}\n")
    config = load_config(path, ["train.epochs=3", "loss.aspect_bce.temperature=2.5", "labels.splits=[train, test]"])
    assert config.train.epochs == 3 and config.train.batch_size == 8
    assert config.loss["aspect_bce"].weight == 2 and config.loss["aspect_bce"].model_extra == {"temperature": 2.5}
    assert config.loss["ce"].weight == 1.0  # untouched defaults survive a partial override
    assert config.labels.splits == ["train", "test"]


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(overrides=["model.width=8", "train.seed=3"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1 (got 0)"),
    ("train.epoch=3", "train.epoch: Extra inputs are not permitted"),
    ("optim.lr=fast", "optim.lr: Input should be a valid number"),
    ("labels.permute=sometimes", "labels.permute: Input should be 'none', 'images' or 'within_class'"),
    ("noequals", "not of the form key.sub=value"),
])
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(MakdError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(MakdError, match="is not valid YAML"):
        load_config(path)
    with pytest.raises(MakdError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=0.5", "a.d=true", "e=null", "f=hello"]) == {
        "a": {"b": 1, "c": 0.5, "d": True}, "e": None, "f": "hello"}
