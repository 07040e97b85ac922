"""Checks made before anything is queued: each failure names the key to change."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.preflight import Partition, check_music, check_partition, partitions
from tests.fixtures.config import make_cfg
from tests.fixtures.pipeline import pipeline_cli
from tests.fixtures.slurm import needs_slurm

GPU_NODE = {"gpu*": Partition("gpu*", 2, 4, 32, 256000), "cpu": Partition("cpu", 8, 0, 64, 512000)}


def test_a_folder_without_audio_files_is_refused_naming_the_key(tmp_path):
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "notes.txt").write_text("no music here")
    cfg = make_cfg(tmp_path, f"data.source={tmp_path / 'music'}")
    with pytest.raises(ConfigError, match="data.source = .*no audio files"):
        check_music(cfg)
    (tmp_path / "music" / "deep").mkdir()
    (tmp_path / "music" / "deep" / "a.MP3").write_bytes(b"")
    check_music(cfg)


@pytest.mark.integration
def test_the_cli_stops_before_submitting_when_the_folder_has_no_audio(tmp_path):
    res = pipeline_cli("run", "prepare", "--cluster", "local", "--data", str(tmp_path),
                       f"run.root={tmp_path}/runs")
    assert res.returncode == 2 and "no audio files" in res.stderr
    assert not (tmp_path / "runs" / "default").exists()


def test_partition_checks_name_the_key_that_asks_too_much(tmp_path):
    cfg = make_cfg(tmp_path)
    for step in cfg.cluster.steps.values():
        step.gpus_per_node, step.cpus_per_task, step.mem_gb, step.nodes = 1, 4, 16, 1
    check_partition(cfg, ["stage3"], GPU_NODE)
    cfg.cluster.steps["stage3"].gpus_per_node = 8
    with pytest.raises(ConfigError, match=r"cluster.steps.stage3.gpus_per_node = 8: partition gpu "
                                          r"offers at most 4 GPUs"):
        check_partition(cfg, ["stage3"], GPU_NODE)
    cfg.cluster.steps["stage3"].gpus_per_node = 4
    cfg.cluster.steps["stage3"].mem_gb = 300
    with pytest.raises(ConfigError, match="cluster.steps.stage3.mem_gb = 300"):
        check_partition(cfg, ["stage3"], GPU_NODE)
    cfg.cluster.partition = "cpu"
    cfg.cluster.steps["stage3"].mem_gb = 16
    with pytest.raises(ConfigError, match="gpus_per_node = 4: partition cpu offers at most 0"):
        check_partition(cfg, ["stage3"], GPU_NODE)
    cfg.cluster.partition = "nope"
    with pytest.raises(ConfigError, match="cluster.partition = nope: no such partition .*gpu, cpu"):
        check_partition(cfg, ["stage1"], GPU_NODE)


@pytest.mark.integration
@needs_slurm
def test_the_real_partition_is_read_and_a_step_asking_too_much_stops_the_submission(tmp_path):
    found = partitions()
    default = [p for name, p in found.items() if name.endswith("*")][0]
    assert default.gpus == 4 and default.cpus >= 1
    res = pipeline_cli("run", "stage3", "--experiment", "demo", "--cluster", "slurm",
                       "--dry-run", "--gpus", "8", f"run.root={tmp_path}/runs")
    assert res.returncode == 2
    assert "cluster.steps.stage1.gpus_per_node = 8: partition debug offers at most 4 GPUs" in res.stderr
    res = pipeline_cli("run", "stage3", "--experiment", "demo", "--cluster", "slurm", "--dry-run",
                       "cluster.partition=gpu-big", f"run.root={tmp_path}/runs")
    assert res.returncode == 2 and "cluster.partition = gpu-big: no such partition" in res.stderr
    res = pipeline_cli("run", "stage3", "--experiment", "demo", "--cluster", "slurm", "--dry-run",
                       "cluster.sbatch_extra.constraint=a100", "cluster.sbatch_extra.exclude=node7",
                       f"run.root={tmp_path}/runs")
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --constraint=a100" in res.stdout and "#SBATCH --exclude=node7" in res.stdout
    res = pipeline_cli("run", "stage3", "--experiment", "demo", "--cluster", "slurm", "--dry-run",
                       "cluster.sbatch_extra.nodes=2", f"run.root={tmp_path}/runs")
    assert res.returncode == 2 and "cluster.sbatch_extra.nodes" in res.stderr
