"""The DAG and its signatures: what a target needs, and what reruns after a change."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import config, dag
from tests.fixtures.config import make_cfg

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


def test_how_chunk_spreads_its_work_is_not_in_its_signature(tmp_path):
    base = dag.signatures(make_cfg(tmp_path), ["chunk"])
    spread = dag.signatures(make_cfg(tmp_path, "data.workers=4", "data.num_shards=3",
                                     "data.max_failed_share=0.9"), ["chunk"])
    longer = dag.signatures(make_cfg(tmp_path, "data.chunk_seconds=5"), ["chunk"])
    assert spread == base and longer["chunk"] != base["chunk"]


def test_the_clean_latents_part_leaves_out_augmentation_and_pairs(tmp_path):
    def sigs(*overrides: str) -> tuple[str, str]:
        cfg = make_cfg(tmp_path, *overrides)
        return dag.signature_of(cfg, "encode", "clean"), dag.signature_of(cfg, "encode")
    clean, whole = sigs()
    assert clean != whole
    for other in (["encode.augment.variants=3"], ["pairs.gap=2"]):
        assert sigs(*other)[0] == clean and sigs(*other)[1] != whole
    for other in (["encode.shard_size=7"], ["data.chunk_seconds=5"], ["run.seed=9"]):
        assert sigs(*other)[0] != clean
    with pytest.raises(dag.DagError, match="no part 'x'"):
        dag.signature_of(make_cfg(tmp_path), "encode", "x")


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
