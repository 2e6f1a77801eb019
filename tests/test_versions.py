"""`magpie-hub versions` and `magpie-hub diff` against the local test Hub (real clients, subprocesses)."""

from __future__ import annotations

import re

import pytest
from conftest import run_cli
from datasets import Dataset
from hub_server import LocalHub
from huggingface_hub import DatasetCard, DatasetCardData
from test_publish import hub_env, hub_get, publish

TOKEN = "hf_versionstesttoken0123456"
REPO = "org/versioned"


def write(directory, configs: dict[str, dict[str, list]], *, dataset_info: bool) -> None:
    """Configs given column by column; README with configs (+ dataset_info when asked)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, columns in configs.items():
        (directory / name).mkdir(exist_ok=True)
        Dataset.from_dict(columns).to_parquet(directory / name / "train-00000-of-00001.parquet")
    meta = {"configs": [{"config_name": n, "data_files": [{"split": "train", "path": f"{n}/train-*.parquet"}]}
                        for n in configs]}
    if dataset_info:
        meta["dataset_info"] = [{"config_name": n, "splits": [{"name": "train", "num_examples": len(c["uuid"])}]}
                                for n, c in configs.items()]
    (directory / "README.md").write_text(str(DatasetCard(f"---\n{DatasetCardData(**meta).to_yaml()}\n---\n# v\n")))


def cols(n: int, categories: list[str], **extra: list) -> dict[str, list]:
    return {"uuid": [f"u{i}" for i in range(n)], "instruction": [f"q{i}" for i in range(n)],
            "category": categories, "language": ["EN"] * n, **extra}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """v1.0.0 and v1.1.0 of REPO published with the CLI, plus v1.9.0 / v1.10.0 tags on the last commit."""
    hub = LocalHub(tmp_path_factory.mktemp("hub"), token=TOKEN).start()
    d = tmp_path_factory.mktemp("data") / "ds"
    write(d, {"single_turn": cols(4, ["math", "math", "coding", "coding"]),
              "old_cfg": cols(2, ["math", "math"])}, dataset_info=True)
    assert publish(hub, d, REPO, "v1.0.0").returncode == 0
    for f in (d / "old_cfg").iterdir():
        f.unlink()
    (d / "old_cfg").rmdir()
    # v1.1.0: more rows, a new column, a shifted category mix, a new config; no dataset_info in the card
    write(d, {"single_turn": cols(8, ["math"] * 6 + ["coding"] * 2, difficulty=["easy"] * 4 + ["hard"] * 4),
              "new_cfg": cols(3, ["writing"] * 3)}, dataset_info=False)
    assert publish(hub, d, REPO, "v1.1.0").returncode == 0
    import urllib.request

    for tag in ("v1.10.0", "v1.9.0"):
        req = urllib.request.Request(f"{hub.url}/api/datasets/{REPO}/tag/main", data=f'{{"tag": "{tag}"}}'.encode(),
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        urllib.request.urlopen(req, timeout=10).close()
    yield hub
    hub.stop()


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.strip().startswith("│")]


def test_versions_lists_tags_with_commit_date_and_rows(published):
    proc = run_cli("versions", REPO, env=hub_env(published))
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert [r[0] for r in rows] == ["v1.0.0", "v1.1.0", "v1.9.0", "v1.10.0"]  # semantic order
    tags = {t["name"]: t["targetCommit"] for t in hub_get(published, f"/api/datasets/{REPO}/refs")["tags"]}
    for r in rows:
        assert r[1] == tags[r[0]][:12] and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", r[2])
    by_tag = {r[0]: r for r in rows}
    assert by_tag["v1.0.0"][3] == "old_cfg: 2, single_turn: 4" and by_tag["v1.0.0"][4] == "6"  # card dataset_info
    assert by_tag["v1.1.0"][3] == "new_cfg: 3, single_turn: 8" and by_tag["v1.1.0"][4] == "11"  # parquet footers


def test_diff_reports_configs_rows_columns_and_shifts(published):
    proc = run_cli("diff", REPO, "v1.0.0", "v1.1.0", env=hub_env(published))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "configs added: new_cfg; removed: old_cfg" in out
    rows = {r[0]: r for r in table_rows(out)}
    assert rows["single_turn"][1:] == ["4", "8", "+4", "difficulty", "-"]
    assert rows["new_cfg"][1:4] == ["-", "3", "added"] and rows["old_cfg"][1:4] == ["2", "-", "removed"]
    assert "single_turn / category: shift (total variation 0.250)" in out
    assert rows["math"][1:] == ["50.0%", "75.0%", "+25.0"] and rows["coding"][1:] == ["50.0%", "25.0%", "-25.0"]
    assert "single_turn / language: distribution unchanged" in out
    assert rows["hard"][1:] == ["0.0%", "50.0%", "+50.0"]  # a tag column that appeared in v1.1.0


def test_diff_of_identical_versions(published):
    proc = run_cli("diff", REPO, "v1.1.0", "v1.10.0", env=hub_env(published))
    assert proc.returncode == 0, proc.stderr
    assert "configs added: none; removed: none" in proc.stdout
    assert "shift" not in proc.stdout and proc.stdout.count("distribution unchanged") == 5


def test_unknown_version_and_repo_are_one_line(published):
    proc = run_cli("diff", REPO, "v1.0.0", "v9.9.9", env=hub_env(published))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {REPO} has no version 'v9.9.9' (tags: v1.0.0, v1.1.0, v1.9.0, v1.10.0); see `magpie-hub "
        f"versions {REPO}`"]
    proc = run_cli("versions", "org/absent", env=hub_env(published))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "not found" in proc.stderr


def test_layout_and_hub_start_without_datasets():
    """Layout names live once (magpie_hub.layout); the Hub commands read them without importing datasets."""
    import subprocess
    import sys

    code = ("import sys, magpie_hub.layout, magpie_hub.hub.publish, magpie_hub.hub.versions; "
            "print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
