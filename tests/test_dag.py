"""Unit tests of the DAG, signatures, run state, sbatch header and the submitter's checks."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config, dag, run, slurm_executor, state
from pipeline.launch import train_command
from tests.conftest import make_cfg

REPO = Path(__file__).resolve().parent.parent


def test_plan_pulls_in_upstream_steps_in_order():
    assert dag.plan("prepare") == ["chunk", "pairs", "encode"]
    assert dag.plan("stage2") == ["chunk", "pairs", "encode", "stage1", "stage2"]
    assert dag.plan("all")[-1] == "audit" and "generate" not in dag.plan("all")
    assert dag.plan("demo")[-2:] == ["generate", "evaluate"]
    with pytest.raises(dag.DagError, match="unknown target 'stage4'"):
        dag.plan("stage4")


def test_downstream_follows_dependencies_within_the_target():
    assert dag.downstream("stage1", dag.plan("all")) == ["stage1", "stage2", "stage3", "audit"]
    assert dag.downstream("stage3", dag.plan("demo")) == ["stage3", "audit", "generate", "evaluate"]
    assert dag.downstream("encode", dag.plan("prepare")) == ["encode"]


def test_signature_changes_only_downstream_of_the_changed_section(tmp_path):
    base = dag.signatures(make_cfg(tmp_path), dag.plan("all"))
    again = dag.signatures(make_cfg(tmp_path), dag.plan("all"))
    assert base == again
    lr = dag.signatures(make_cfg(tmp_path, "stage2.lr=0.123"), dag.plan("all"))
    same = [s for s in base if base[s] == lr[s]]
    assert same == ["chunk", "pairs", "encode", "stage1"]
    # resources and the run name change where a step runs, not what it computes
    moved = dag.signatures(make_cfg(tmp_path, "run.name=other", "cluster.steps.stage1.gpus_per_node=4"),
                           dag.plan("all"))
    assert moved == base


def test_editing_a_yaml_default_changes_the_signature(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    before = dag.signatures(config.load("demo", "local", config_dir=configs), ["chunk", "pairs"])
    text = (configs / "defaults.yaml").read_text()
    assert "  gap: 0 " in text
    (configs / "defaults.yaml").write_text(text.replace("  gap: 0 ", "  gap: 1 "))
    after = dag.signatures(config.load("demo", "local", config_dir=configs), ["chunk", "pairs"])
    assert before["chunk"] == after["chunk"] and before["pairs"] != after["pairs"]


def test_editing_imported_code_changes_the_signature(tmp_path, monkeypatch):
    for pkg in dag.CODE_PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(dag, "ROOT", tmp_path)
    dag.code_files.cache_clear()
    try:
        files = {p.name for p in dag.code_files("data_prep.chunk")}
        assert {"chunk.py", "decode.py"} <= files      # decode.py is imported by chunk.py
        cfg = make_cfg(tmp_path)
        before = dag.signatures(cfg, dag.plan("prepare"))
        with open(tmp_path / "data_prep" / "decode.py", "a") as fh:
            fh.write("\n# an edit\n")
        after = dag.signatures(cfg, dag.plan("prepare"))
        assert all(before[s] != after[s] for s in ("chunk", "pairs", "encode"))
    finally:
        dag.code_files.cache_clear()


def test_the_run_folder_layout_and_codec_rule_are_step_code():
    """They moved out of jobs/ into pipeline/: editing them must still rerun the steps."""
    files = {p.name for p in dag.code_files("jobs.generate")}
    assert {"generate.py", "fakes.py", "load_generator.py", "samples.py", "run_folder.py",
            "codec_facts.py"} <= files
    assert "run_folder.py" in {p.name for p in dag.code_files("data_prep.pairs")}
    assert "launch.py" not in files and "state.py" not in files   # orchestration is not


def test_markers_decide_completion_and_unfinished_shards(tmp_path):
    run_dir = tmp_path / "r"
    state.write_marker(run_dir, "chunk", state.COMPLETED, "sig", 0, 3)
    state.write_marker(run_dir, "chunk", state.FAILED, "sig", 1, 3, reason="boom")
    state.write_marker(run_dir, "chunk", state.COMPLETED, "old", 2, 3)
    assert state.unfinished_shards(run_dir, "chunk", "sig", 3) == [1, 2]
    assert not state.is_complete(run_dir, "chunk", "sig", 3)
    state.write_marker(run_dir, "pairs", state.COMPLETED, "p")
    assert state.is_complete(run_dir, "pairs", "p") and not state.is_complete(run_dir, "pairs", "q")
    assert not state.is_complete(run_dir, "encode", "e")


def test_pipeline_json_records_history_and_finds_jobs(tmp_path):
    state.record_step(tmp_path, "chunk", job_id="10", array_tasks=["10_0", "10_1"], state="PENDING")
    state.record_step(tmp_path, "stage1", job_id="12", state="PENDING")
    state.record_step(tmp_path, "stage1", job_id="20", state="PENDING")
    data = state.load(tmp_path)
    assert [h["job_id"] for h in data["steps"]["stage1"]["history"]] == ["12", "20"]
    assert state.find_job(data, "10_1") == "chunk"
    assert state.find_job(data, "12") == "stage1"
    assert state.find_job(data, "99") is None


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


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_config_error_stops_before_anything_is_written(tmp_path):
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local",
                   f"run.root={tmp_path}/runs", "stage1.lrr=0.1", cwd=REPO)
    assert res.returncode == 2
    assert "unknown key 'stage1.lrr'" in res.stderr and "stage1.lr" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_local_dry_run_prints_commands_and_writes_nothing(tmp_path):
    res = _run_cli("stage1", "--experiment", "demo", "--cluster", "local", "--dry-run",
                   "--gpus", "2", f"run.root={tmp_path}/runs", cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("pipeline.launch") == 2 + 1 + 1 + 1   # 2 chunk shards, 3 steps
    assert "--step stage1" in res.stdout
    assert not (tmp_path / "runs").exists()


def test_unknown_force_step_is_a_clear_error(tmp_path):
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local", "--force", "stage9",
                   f"run.root={tmp_path}/runs", cwd=REPO)
    assert res.returncode == 2 and "unknown step 'stage9'" in res.stderr
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local", "--force", "stage1",
                   f"run.root={tmp_path}/runs", cwd=REPO)
    assert res.returncode == 2 and "not a step of target prepare" in res.stderr


def test_what_a_job_would_find_out_in_the_queue_is_checked_at_submission(tmp_path):
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local", "--data",
                   str(tmp_path / "nonexistent"), f"run.root={tmp_path}/runs", cwd=REPO)
    assert res.returncode == 2
    assert f"data.source = {tmp_path / 'nonexistent'}: no such folder" in res.stderr
    assert not (tmp_path / "runs").exists()
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local",
                   "encode.codec=encodec", "encode.pretrained=true",
                   f"encode.weights_dir={tmp_path / 'weights'}", f"run.root={tmp_path}/runs",
                   cwd=REPO)
    assert res.returncode == 2
    assert f"EnCodec weights {tmp_path / 'weights' / 'encodec_24khz-d7cc33bc.th'}" in res.stderr
    assert "make fetch-weights" in res.stderr and not (tmp_path / "runs").exists()
