"""What a job is given to run: the sbatch header from the template and the cluster profile,
and the training command (torchrun only for several processes)."""
from __future__ import annotations

from pipeline import config, slurm_executor
from pipeline.launch import train_command
from tests.fixtures.config import make_cfg


def test_sbatch_header_comes_from_the_template_and_the_profile(tmp_path):
    cfg = config.load("demo", "slurm", [f"run.root={tmp_path}", "cluster.account=proj7",
                                         "cluster.steps.stage1.gpus_per_node=4"])
    lines = slurm_executor.render_header(cfg, "stage1", "r1")
    assert "#SBATCH --account=proj7" in lines and "#SBATCH --gpus-per-node=4" in lines
    assert not any("--partition" in line for line in lines)   # empty in the profile
    params = slurm_executor.header_parameters(lines)
    assert params["gpus_per_node"] == 4 and params["account"] == "proj7"
    assert params["signal_delay_s"] == cfg.cluster.signal_delay_s
    assert params["additional_parameters"] == {"requeue": True}
    encode = slurm_executor.render_header(cfg, "encode", "r1")     # 0 GPUs: no gres line
    assert not any("gpus" in line for line in encode)


def test_local_training_command_uses_torchrun_only_for_several_processes(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    one = train_command(make_cfg(tmp_path, "cluster.steps.stage1.gpus_per_node=1"), tmp_path, "stage1")
    assert one[1:3] == ["-m", "jobs.train"]
    four = train_command(make_cfg(tmp_path, "cluster.steps.stage1.gpus_per_node=4"), tmp_path, "stage1")
    assert four[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in four and "--standalone" in four
