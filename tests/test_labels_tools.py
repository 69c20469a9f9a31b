"""The merge check of sharded label jobs, and import/export of the official {image_name: [p_1, ..., p_Q]} JSON."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import PixelTeacher, make_question_set

from makd.cli import main
from makd.config import load_config
from makd.errors import MakdError
from makd.labels import LabelStore, label_split, samples_to_label
from makd.labels.official import export_official, import_official
from makd.labels.store import shard_name


@pytest.fixture()
def split(fmnist_test):
    return fmnist_test.subset(np.arange(10), "part")


def test_check_finds_missing_shards_duplicates_and_damage(tmp_path, split, capsys):
    qs = make_question_set(split.class_names, n=3)
    out = tmp_path / "s"
    label_split(split, PixelTeacher(), qs, out, shard_size=3, rank=1, world_size=2, progress=False, share_only=True)
    store = LabelStore.open(out)
    coverage = store.check()
    assert coverage.missing == [0, 2] and not coverage.problems and not coverage.complete
    assert "rank 0/2: 0, 2" in coverage.report(world_size=2)
    assert main(["labels", "check", str(out), "--world-size", "2"]) == 1
    assert "missing shards: 0, 2" in capsys.readouterr().out

    label_split(split, PixelTeacher(), qs, out, shard_size=3, rank=0, world_size=2, progress=False)
    assert store.check().complete and main(["labels", "check", str(out)]) == 0
    assert "every sample covered exactly once" in capsys.readouterr().out

    # A shard rewritten with another shard's rows: duplicated ids (and the sample order no longer matches).
    pq.write_table(pq.read_table(out / shard_name(0)), out / shard_name(1))
    problems = store.check().problems
    assert any("3 sample id(s) appear more than once" in p for p in problems)
    (out / shard_name(2)).write_bytes(b"PAR1 garbage")
    assert any(p.startswith("shard-00002.parquet: unreadable") for p in store.check().problems)
    pq.write_table(pq.read_table(out / shard_name(0)).slice(0, 2), out / shard_name(0))
    assert "shard-00000.parquet: 2 rows, expected 3" in store.check().problems


@pytest.fixture()
def config(tmp_path, tiny_imagefolder):
    qs = make_question_set(["Sandal", "T-shirt_top", "Trouser"], n=4)
    qs.save(tmp_path / "q.json")
    return load_config(overrides=[f"questions={tmp_path / 'q.json'}", "data.dataset=imagefolder",
                                  f"data.root={tiny_imagefolder}", "data.train_per_class=4", "data.val_per_class=2",
                                  "labels.splits=[train,test]", f"labels.path={tmp_path / 'labels'}", "labels.shard_size=5"])


def test_official_json_round_trip(tmp_path, config, capsys):
    samples = samples_to_label(config)
    store = label_split(samples, PixelTeacher(), make_question_set(["Sandal", "T-shirt_top", "Trouser"], n=4),
                        config.labels.path, shard_size=5, progress=False)
    ids, logodds, _ = store.read()
    assert main(["labels", "export", str(config.labels.path), "-o", str(tmp_path / "official.json")]) == 0
    exported = json.loads((tmp_path / "official.json").read_text())
    assert list(exported) == ids
    np.testing.assert_allclose(np.array(list(exported.values())), 1 / (1 + np.exp(-logodds.astype(np.float64))), rtol=1e-6)

    # The official file keyed by file name, with an image of another dataset and without two of ours.
    by_name = {sid.rsplit("/", 1)[-1]: row for sid, row in exported.items()}
    skipped = [ids[3], ids[17]]
    for sid in skipped:
        del by_name[sid.rsplit("/", 1)[-1]]
    by_name["not_in_this_dataset.jpg"] = [0.5] * 4
    (tmp_path / "names.json").write_text(json.dumps(by_name))
    imported, n, unmatched = import_official(config, tmp_path / "names.json", tmp_path / "imported")
    assert (n, unmatched) == (len(ids) - 2, 1)
    got_ids, got, mass = imported.read()
    keep = [i for i, sid in enumerate(ids) if sid not in skipped]
    assert got_ids == [ids[i] for i in keep] and np.all(mass == 1)
    np.testing.assert_allclose(got, logodds[keep], atol=1e-5)
    assert imported.meta["teacher"]["name"] == "official-json" and imported.check().complete

    # The CLI: same import from the sample-id keyed file, then a file that does not fit the question set.
    assert main(["labels", "import", "--json", str(tmp_path / "official.json"), "-o", str(tmp_path / "cli"),
                 f"questions={config.questions}", "data.dataset=imagefolder", f"data.root={config.data.root}",
                 "data.train_per_class=4", "data.val_per_class=2", "labels.splits=[train,test]"]) == 0
    assert f"{len(ids)} samples imported" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps({ids[0]: [0.1, 0.2]}))
    with pytest.raises(MakdError, match=r"bad.json: '.*' has 2 values, the question set has 4 questions"):
        import_official(config, tmp_path / "bad.json", tmp_path / "bad")
    (tmp_path / "bad.json").write_text(json.dumps({ids[0]: [0.1, 0.2, 1.5, 0.0]}))
    with pytest.raises(MakdError, match="not a probability"):
        import_official(config, tmp_path / "bad.json", tmp_path / "bad")
    (tmp_path / "none.json").write_text(json.dumps({"x.jpg": [0.1] * 4}))
    with pytest.raises(MakdError, match="none of its 1 keys"):
        import_official(config, tmp_path / "none.json", tmp_path / "bad")


def test_export_by_name_refuses_clashes(tmp_path, fmnist_test):
    split = fmnist_test.subset(np.arange(3), "part")
    split.sample_ids = ["a/1.png", "b/1.png", "b/2.png"]
    store = label_split(split, PixelTeacher(), make_question_set(split.class_names, n=2), tmp_path / "s",
                        progress=False)
    with pytest.raises(MakdError, match="two samples are named '1.png'"):
        export_official(store, tmp_path / "o.json", key="name")
