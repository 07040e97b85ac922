"""MLflow a researcher can read: the experiment opens on its training runs, the parent run
holds headline params, the resolved config and each step's results, metric names are
grouped, generate's child run holds its audio, sweep points are tagged."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from jobs import generate
from pipeline import tracking
from tests.fixtures.config import make_cfg
from tests.fixtures.pipeline import TINY, submit
from tests.fixtures.tiny_gan_run import build_run, save_stage3

# the tests open stores, none is about building one: each starts from a copy of an empty one
pytestmark = pytest.mark.usefixtures("empty_store")


def client_of(cfg) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking.tracking_uri(cfg))


def parent_of(run_dir: Path) -> str:
    return json.loads((Path(run_dir) / tracking.PARENT_FILE).read_text())["run_id"]


@pytest.mark.parametrize("name, step, grouped", [
    ("val_loss", "stage1", "val/loss"),
    ("best_val_loss", "stage2", "val/best_val_loss"),
    ("val_baseline_mean", "stage1", "val/baseline_mean"),
    ("gate_passed", "stage1", "val/gate_passed"),
    ("train_total", "stage3", "train/total"),
    ("lr_g", "stage3", "train/lr_g"),
    ("train_d_loss", "stage3", "gan/d_loss"),
    ("train_adv", "stage3", "gan/adv"),
    ("grad_norm_d_before", "stage3", "gan/grad_norm_d_before"),
    ("lr_d", "stage3", "gan/lr_d"),
    ("samples_per_s", "stage1", "system/samples_per_s"),
    ("cuda_peak_reserved_mb", "stage1", "system/cuda_peak_reserved_mb"),
    ("chunks", "chunk/shard-0-of-2", "data/chunks"),
    ("pairs_train", "pairs", "data/pairs_train"),
    ("audit_fake_bce_vs_real", "audit/gen_epoch_4", "audit/fake_bce_vs_real"),
    ("frechet_ratio", "evaluate", "eval/frechet_ratio"),
    ("system/cpu_utilization_percentage", "stage1", "system/cpu_utilization_percentage"),
    ("stage1/best_val_loss", "pairs", "stage1/best_val_loss"),
])
def test_metric_name_rules(name, step, grouped):
    assert tracking.metric_name(name, step) == grouped


def test_the_experiment_opens_on_training_runs_and_steps_log_grouped_names(tmp_path):
    cfg = make_cfg(tmp_path)
    with tracking.step_run(cfg, tmp_path / "runs" / "t", "stage1") as tr:
        tr.log_metrics({"val_loss": 1.0, "train_total": 2.0, "samples_per_s": 3.0}, step=1)
        run_id = tr.run_id
    client = client_of(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    assert exp.tags[tracking.KIND_TAG] == "custom_model_development"
    assert set(client.get_run(run_id).data.metrics) == {"val/loss", "train/total",
                                                        "system/samples_per_s"}
    params = client.get_run(run_id).data.params            # a stage's run: sizes and seed
    assert params["seed"] == str(cfg.run.seed) and params["model.d_model"] == "64"
    # the models' parameter counts come from the trainer: test_telemetry_training


def test_runs_page_opens_the_training_view(tmp_path):
    cfg = make_cfg(tmp_path)
    exp = tracking.setup(cfg)[1]
    assert tracking.runs_page(cfg, "http://h:1") == \
        f"http://h:1/#/experiments/{exp}/runs?workflowType=machine_learning"


def test_a_kind_chosen_in_the_ui_is_kept(tmp_path):
    cfg = make_cfg(tmp_path)
    tracking.log_parent_params(cfg, tmp_path / "runs" / "t")
    client = client_of(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    client.set_experiment_tag(exp.experiment_id, tracking.KIND_TAG, "genai_development")
    with tracking.step_run(cfg, tmp_path / "runs" / "t", "pairs"):
        pass
    assert client.get_experiment(exp.experiment_id).tags[tracking.KIND_TAG] == "genai_development"


@pytest.mark.integration
def test_parent_run_of_a_tiny_local_run_has_headline_params_config_and_results(tmp_path):
    root = tmp_path / "runs"
    res = submit("prepare", root, "r", cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = make_cfg(tmp_path, "run.name=r", *TINY)
    client = client_of(cfg)
    parent = client.get_run(parent_of(root / "r"))
    params = parent.data.params
    assert params["codec"] == "mel" and params["seed"] == str(cfg.run.seed)
    assert params["model.d_model"] == str(cfg.model.transformer.d_model)
    assert params["stage1.lr"] == str(cfg.stage1.lr)
    assert params["stage3.batch_size"] == str(cfg.stage3.batch_size)
    assert len(params["git_commit"]) >= 40
    assert parent.data.metrics["data/audio_hours"] > 0
    assert parent.data.metrics["data/pairs_train"] > 0
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["config.resolved.yaml"]
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags[tracking.KIND_TAG] == "custom_model_development"
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    shard = next(c for c in children if c.info.run_name.startswith("chunk/"))
    assert shard.data.metrics["data/chunks"] > 0
    assert all("/" in name for c in children for name in c.data.metrics)


def test_finished_steps_put_their_headline_results_on_the_parent(tmp_path):
    cfg = make_cfg(tmp_path)
    run_dir = tmp_path / "runs" / "t"
    (run_dir / "stage1").mkdir(parents=True)
    (run_dir / "stage1" / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "val_loss": v}) + "\n" for e, v in [(1, 3.0), (2, 2.5), (3, 2.7)]))
    (run_dir / "stage1" / "gate.json").write_text(json.dumps({"passed": True}))
    (run_dir / "stage1" / "model_size.json").write_text(json.dumps({"generator_params": 12345}))
    (run_dir / "evaluate").mkdir()
    (run_dir / "evaluate" / "metrics.json").write_text(json.dumps(
        {"metrics": {"frechet_ratio": 1.4, "diversity_ratio": 0.9, "two_sample_accuracy": 0.97,
                     "two_sample_accuracy_white": 1.0}, "verdict": "the generator misses 4 of 4"}))
    (run_dir / "audit").mkdir()
    (run_dir / "audit" / "reading.txt").write_text("audit of ...\nverdict: healthy\n- fine\n")
    for step in ("stage1", "evaluate", "audit/gen_epoch_3"):
        with tracking.step_run(cfg, run_dir, step):
            pass
    parent = client_of(cfg).get_run(parent_of(run_dir)).data
    assert parent.metrics["stage1/best_val_loss"] == 2.5
    assert parent.metrics["stage1/last_val_loss"] == 2.7
    assert parent.metrics["stage1/gate_passed"] == 1.0
    assert parent.metrics["stage1/generator_params"] == 12345   # what the trainer recorded
    assert parent.metrics["eval/frechet_ratio"] == 1.4
    assert parent.metrics["eval/two_sample_accuracy"] == 0.97
    assert "eval/two_sample_accuracy_white" not in parent.metrics   # headline figures only
    assert parent.tags["evaluate.verdict"] == "the generator misses 4 of 4"
    assert parent.tags["audit.verdict"] == "healthy"


def test_a_step_skipped_as_complete_puts_its_results_on_the_parent(tmp_path):
    cfg = make_cfg(tmp_path)
    run_dir = tmp_path / "runs" / "t"
    (run_dir / "evaluate").mkdir(parents=True)
    (run_dir / "evaluate" / "metrics.json").write_text(json.dumps({"metrics": {"periodicity": 0.2}}))
    tracking.log_step_results(cfg, run_dir, "evaluate")
    assert client_of(cfg).get_run(parent_of(run_dir)).data.metrics["eval/periodicity"] == 0.2


def test_a_failed_step_puts_nothing_on_the_parent(tmp_path):
    cfg = make_cfg(tmp_path)
    run_dir = tmp_path / "runs" / "t"
    (run_dir / "stage1").mkdir(parents=True)
    (run_dir / "stage1" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_loss": 3.0}))
    with pytest.raises(RuntimeError):
        with tracking.step_run(cfg, run_dir, "stage1"):
            raise RuntimeError("died")
    assert "stage1/best_val_loss" not in client_of(cfg).get_run(parent_of(run_dir)).data.metrics


def test_a_changed_headline_param_keeps_its_first_value_and_is_tagged(tmp_path):
    run_dir = tmp_path / "runs" / "t"
    tracking.log_parent_params(make_cfg(tmp_path), run_dir)
    cfg = make_cfg(tmp_path, "stage3.lr=0.5")
    tracking.log_parent_params(cfg, run_dir)
    parent = client_of(cfg).get_run(parent_of(run_dir)).data
    assert parent.params["stage3.lr"] != "0.5" and parent.tags["changed.stage3.lr"] == "0.5"


def test_sweep_points_are_tagged_on_parent_and_child_runs(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.run.sweep, cfg.run.sweep_point = "lr-sweep", "stage3.lr=0.001"   # run.sweep, run.sweep_point
    run_dir = tmp_path / "runs" / "t"
    tracking.log_parent_params(cfg, run_dir)
    with tracking.step_run(cfg, run_dir, "pairs") as tr:
        child = tr.run_id
    client = client_of(cfg)
    for run_id in (parent_of(run_dir), child):
        tags = client.get_run(run_id).data.tags
        assert tags["sweep"] == "lr-sweep" and tags["sweep.point"] == "stage3.lr=0.001"
    assert "of sweep `lr-sweep`" in client.get_run(parent_of(run_dir)).data.tags["mlflow.note.content"]
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    found = client.search_runs([exp.experiment_id], "tags.sweep = 'lr-sweep'")
    assert {r.info.run_id for r in found} == {parent_of(run_dir), child}


def test_generate_is_a_child_run_with_its_audio_and_settings(tmp_path):
    cfg, run_dir = build_run(tmp_path)
    save_stage3(cfg, run_dir, [1, 2])
    result = generate.run(cfg, run_dir, n=2, temperature=0.8, seed=5)
    client = client_of(cfg)
    run_id = json.loads((run_dir / "generate" / tracking.CHILD_FILE).read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.run_name == "generate" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent_of(run_dir)
    assert run.data.params["n"] == "2" and run.data.params["temperature"] == "0.8"
    assert run.data.params["seed"] == "5" and run.data.params["checkpoint"] == result["checkpoint"]
    files = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert files == {f"samples/sample_{i}.{ext}" for i in range(2) for ext in ("wav", "png")}
    parent = client.get_run(parent_of(run_dir)).data
    assert parent.metrics["generate/samples"] == 2


def test_gpu_system_metrics_need_cuda_and_pynvml(monkeypatch, capsys):
    import sys

    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not tracking.warn_without_gpu_monitor()          # CPU: nothing to ask for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", None)        # not importable
    assert not tracking.warn_without_gpu_monitor()
    assert "pip install nvidia-ml-py" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pynvml", object())    # importable: MLflow's monitor logs GPUs
    assert tracking.warn_without_gpu_monitor()


def test_cuda_memory_figures_go_under_system(monkeypatch):
    import types

    import torch

    from jobs import telemetry
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d: {"num_alloc_retries": 2, "num_ooms": 0})
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=80 * 2**30))
    figures = telemetry.cuda_memory(torch.device("cuda", 0))
    assert figures == {"cuda_peak_reserved_mb": 3.0, "cuda_total_mb": 80 * 1024.0,
                       "cuda_alloc_retries": 2.0, "cuda_ooms": 0.0}
    assert {tracking.metric_name(k, "stage3") for k in figures} == {
        "system/cuda_peak_reserved_mb", "system/cuda_total_mb", "system/cuda_alloc_retries",
        "system/cuda_ooms"}


def test_a_step_shared_through_the_store_gives_its_results_to_every_run_linking_it(tmp_path):
    root = tmp_path / "runs"
    version = root / "store" / "stage1" / "abc"
    version.mkdir(parents=True)
    (version / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_loss": 2.0}) + "\n")
    cfg_a, cfg_b = make_cfg(tmp_path, "run.name=a"), make_cfg(tmp_path, "run.name=b")
    for name in ("a", "b"):
        (root / name).mkdir()
        (root / name / "stage1").symlink_to(version)
    tracking.log_parent_params(cfg_b, root / "b")       # b waits on a's job for stage 1
    with tracking.step_run(cfg_a, root / "a", "stage1"):
        pass
    client = client_of(cfg_a)
    for name in ("a", "b"):
        assert client.get_run(parent_of(root / name)).data.metrics["stage1/best_val_loss"] == 2.0
