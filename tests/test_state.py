"""Run state: the markers jobs write decide completion; pipeline.json keeps the history."""
from __future__ import annotations

from pipeline import state


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
