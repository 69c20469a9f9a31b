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


def test_layered_files_and_includes(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "recipe.yaml").write_text("train: {epochs: 9, batch_size: 4}\noptim: {lr: 0.2}\n")
    (tmp_path / "parts" / "data.yaml").write_text("include: recipe.yaml\ndata: {dataset: imagefolder}\ntrain: {epochs: 5}\n")
    (tmp_path / "student.yaml").write_text("model: {name: resnet14}\noptim: {lr: 0.3}\n")
    config = load_config([tmp_path / "parts" / "data.yaml", tmp_path / "student.yaml"], ["train.batch_size=2"])
    # include < the including file < later files < overrides
    assert (config.train.epochs, config.optim.lr, config.train.batch_size) == (5, 0.3, 2)
    assert config.data.dataset == "imagefolder" and config.model.name == "resnet14"
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(MakdError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("include: {a: 1}\n")
    with pytest.raises(MakdError, match="include must be a file name or a list"):
        load_config(tmp_path / "bad.yaml")


def test_dataset_choices_come_from_the_registry():
    from makd.data.registry import DATASETS

    with pytest.raises(MakdError, match=r"data.dataset: unknown dataset 'mnist' \(choose from .*fashion_mnist.*imagefolder"):
        load_config(overrides=["data.dataset=mnist"])
    assert {"fashion_mnist", "imagefolder", "manifest", "cub200"} <= set(DATASETS.names())
