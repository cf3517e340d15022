"""Unit tests of result rows: atomic writes, collection, hashing, provenance."""

import pandas as pd
import pytest

from lorafa import results

from .conftest import compose_cfg


def test_write_row_is_atomic_and_round_trips(tmp_path):
    row = {"model": "m", "score": 0.5, "loss_curve": [1.0, 0.5], "git_dirty": False}
    path = results.write_row(row, tmp_path / "job")
    assert path.name == "result.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["result.parquet"]  # no temporary file left
    back = pd.read_parquet(path).iloc[0]
    assert back["model"] == "m" and list(back["loss_curve"]) == [1.0, 0.5]


@pytest.mark.fault("a write that fails")
def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        results.write_row({"a": 1}, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.bad_input("a corrupted result file met by collect")
def test_collect_gathers_rows_and_names_unreadable_files(tmp_path):
    for i in range(3):
        results.write_row({"job": i, "score": i / 10}, tmp_path / str(i))
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "result.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match=r"skipping unreadable result .*3/result.parquet"):
        table = results.collect(tmp_path)
    assert sorted(table["job"]) == [0, 1, 2] and sorted(table["job_dir"]) == ["0", "1", "2"]
    assert pd.read_parquet(tmp_path / "results.parquet").shape == table.shape


def test_collect_cli(tmp_path, capsys):
    results.write_row({"model": "x", "method": "lorafa", "status": "ok"}, tmp_path / "0")
    assert results.main(["collect", str(tmp_path)]) == 0
    assert "1 result rows" in capsys.readouterr().out
    assert (tmp_path / "results.parquet").exists()


def test_config_hash_ignores_where_a_job_writes_but_not_what_it_computes():
    a = compose_cfg([], output_dir="/tmp/a")
    b = compose_cfg([], output_dir="/tmp/b")
    c = compose_cfg(["seed=1"], output_dir="/tmp/a")
    assert results.config_hash(a) == results.config_hash(b) != results.config_hash(c)


def test_provenance_names_code_versions_and_device():
    import torch

    prov = results.provenance(compose_cfg(), torch.device("cpu"))
    assert prov["schema_version"] == results.SCHEMA_VERSION
    assert prov["torch_version"] == torch.__version__ and prov["device"].startswith("cpu")
    assert len(prov["git_sha"]) in (40, len("unknown")) and isinstance(prov["git_dirty"], bool)
    assert '"method"' in prov["config"]


def test_results_tables_are_only_appended_to_deduplicated_by_config_hash(tmp_path, capsys):
    dest = tmp_path / "results" / "t.parquet"
    first = pd.DataFrame({"config_hash": ["a", "b"], "schema_version": 1, "score": [0.1, 0.2]})
    table, added = results.append_rows(first, dest)
    assert added == 2 and list(table["config_hash"]) == ["a", "b"]
    again = pd.DataFrame({"config_hash": ["b", "c", "c"], "schema_version": 1, "score": [0.9, 0.3, 0.4]})
    table, added = results.append_rows(again, dest)
    assert added == 1  # b is there already, c twice in the new rows: once
    back = pd.read_parquet(dest)
    assert list(back["config_hash"]) == ["a", "b", "c"] and list(back["score"]) == [0.1, 0.2, 0.3]  # old rows as they were
    with pytest.raises(ValueError, match="config_hash"):
        results.append_rows(pd.DataFrame({"schema_version": [1], "score": [1.0]}), dest)
    # the CLI: a sweep directory's rows into a table
    for i, h in enumerate(["c", "d"]):
        results.write_row({"config_hash": h, "schema_version": 1, "score": 0.5}, tmp_path / "sweep" / str(i))
    assert results.main(["append", str(tmp_path / "sweep"), str(dest)]) == 0
    assert "1 of 2 rows added" in capsys.readouterr().out
    assert list(pd.read_parquet(dest)["config_hash"]) == ["a", "b", "c", "d"]


def test_a_rerun_skips_only_this_configs_final_rows(tmp_path):
    cfg = compose_cfg([], output_dir=str(tmp_path))
    assert results.finished_row(tmp_path, cfg) is None  # nothing yet
    results.write_row({"config_hash": results.config_hash(cfg), "status": "ok", "score": 0.7}, tmp_path)
    assert results.finished_row(tmp_path, cfg)["score"] == 0.7
    for status in ("oom", "diverged"):
        results.write_row({"config_hash": results.config_hash(cfg), "status": status}, tmp_path)
        assert results.finished_row(tmp_path, cfg) is not None
    results.write_row({"config_hash": results.config_hash(cfg), "status": "failed"}, tmp_path)
    assert results.finished_row(tmp_path, cfg) is None  # failed (maybe transient): run again
    results.write_row({"config_hash": "another", "status": "ok"}, tmp_path)
    assert results.finished_row(tmp_path, cfg) is None  # the sweep changed: run again
    (tmp_path / "result.parquet").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="unreadable"):
        assert results.finished_row(tmp_path, cfg) is None
