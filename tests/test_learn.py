"""The learning report, from fake run folders with synthetic numbers (no pipeline runs)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import pytest

from pipeline import learn
from pipeline.learn import TARGETS, CorpusRun, build_report, measure

STEPS = ("chunk", "pairs", "encode", "stage1", "stage2", "stage3", "audit", "generate", "evaluate")


def write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def fake_run(run_dir: Path, val_losses: Optional[list[float]] = None,
             baselines: Optional[dict] = None, metrics: Optional[dict] = None,
             verdict: Optional[str] = None, gates: Optional[dict] = None,
             states: Optional[dict] = None) -> Path:
    """A run folder holding only the files the report reads; None leaves a file out."""
    if val_losses is not None:
        write(run_dir / "stage1" / "metrics.jsonl",
              "".join(json.dumps({"epoch": i + 1, "val_loss": v, "loss": 9.0}) + "\n"
                      for i, v in enumerate(val_losses)))
    if baselines is not None:
        write(run_dir / "stage1" / "baselines.json", baselines)
    if metrics is not None:
        write(run_dir / "evaluate" / "metrics.json", {"checkpoint": "stage3/last.pt",
                                                      "metrics": metrics})
    if verdict is not None:
        write(run_dir / "audit" / "reading.txt",
              f"audit of generator epoch 20\nverdict: {verdict}\n- newest D loss 0.12\n")
    for stage, (passed, reason) in (gates or {}).items():
        write(run_dir / stage / "gate.json", {"passed": passed, "reason": reason, "best": 1.0})
    states = {s: "COMPLETED" for s in STEPS} if states is None else states
    write(run_dir / "pipeline.json",
          {"steps": {s: {"state": st, "submitted_at": time.time(), "signature": "x",
                         "reason": "" if st == "COMPLETED" else f"exit code 3: {s} gate failed"}
                     for s, st in states.items()}})
    return run_dir


GOOD = dict(val_losses=[3.0, 2.0, 2.2],
            baselines={"val_baseline_repeat": 4.0, "val_baseline_mean": 3.0,
                       "val_baseline_start_mean": 2.8},
            metrics={"diversity_ratio": 0.9, "frechet_ratio": 1.5, "flatness_generated": 0.02,
                     "flatness_real": 0.015, "recall": 0.6, "rms_db_real": -20.0},
            verdict="healthy",
            gates={"stage1": (True, "margin 28.6% over start_mean"),
                   "stage2": (True, "KL above the floor"), "stage3": (True, "D loss 0.5")})
BAD = dict(val_losses=[3.0, 2.9],
           baselines={"val_baseline_repeat": 4.0, "val_baseline_mean": 3.0},
           metrics={"diversity_ratio": 0.1, "frechet_ratio": 6.7, "flatness_generated": 0.098,
                    "flatness_real": 0.013},
           verdict="trouble",
           gates={"stage1": (True, "ok"), "stage2": (True, "ok"),
                  "stage3": (False, "mode collapse | diversity 0.1")})


def table(markdown: str) -> dict[str, list[str]]:
    """Table rows of the report: first cell -> the other cells."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def label(key: str) -> str:
    return next(t.label for t in TARGETS if t.key == key)


def test_two_corpora_numbers_and_marks(tmp_path):
    good = CorpusRun("learn_seed1234", fake_run(tmp_path / "a", **GOOD), wall_s=131.4)
    bad = CorpusRun("learn_seed777", fake_run(tmp_path / "b", **BAD), wall_s=99.6, exit_code=1,
                    notes=["pipeline exit code 1"])
    md = build_report([good, bad], "python -m pipeline.learn", "2026-01-02T03:04:05", "`abc123`")
    rows = table(md)
    assert "`python -m pipeline.learn`" in md and "2026-01-02T03:04:05" in md and "abc123" in md
    assert rows["measurement"] == ["target", "learn_seed1234", "met", "learn_seed777", "met"]
    assert rows["stage-1 best val loss"][1] == "2" and rows["stage-1 best val loss"][3] == "2.9"
    assert rows["best trivial baseline"][1] == "2.8 (start_mean)"
    assert rows["best trivial baseline"][3] == "3 (mean)"
    # 1 - 2.0 / 2.8 = 28.6 %; 1 - 2.9 / 3.0 = 3.3 %
    assert rows[label("stage1_margin")] == [">= 20%", "28.6%", "PASS", "3.3%", "**MISS**"]
    assert rows[label("diversity_ratio")] == ["0.5 .. 1.5", "0.9", "PASS", "0.1", "**MISS**"]
    assert rows[label("frechet_ratio")] == ["<= 2", "1.5", "PASS", "6.7", "**MISS**"]
    assert rows[label("flatness_ratio")] == ["0.5 .. 2", "1.33 (0.02 / 0.015)", "PASS",
                                             "7.54 (0.098 / 0.013)", "**MISS**"]
    assert rows[label("audit_verdict")] == ['not "trouble"', "healthy", "PASS", "trouble",
                                            "**MISS**"]
    assert rows["recall"][1] == "0.6" and rows["recall"][3] == "n/a"
    assert "rms_db_real" not in rows and "precision" not in rows
    assert rows["stage3 gate"][1] == "passed: D loss 0.5"
    assert rows["stage3 gate"][3] == "FAILED: mode collapse \\| diversity 0.1"
    assert rows["wall time"][1] == "131 s" and rows["wall time"][3] == "100 s"
    assert rows["what failed"][1] == "nothing"
    assert rows["what failed"][3] == "pipeline exit code 1"
    assert "Targets met: 5 of 10." in md


def test_missing_files_are_na_and_miss_and_the_failure_is_said(tmp_path):
    states = {s: "COMPLETED" for s in STEPS[:5]} | {"stage3": "FAILED"}
    run_dir = fake_run(tmp_path / "c", val_losses=[3.0, 2.0], baselines=None, metrics=None,
                       verdict=None, gates={"stage1": (True, "ok")}, states=states)
    md = build_report([CorpusRun("learn_seed5", run_dir)], "cmd", "today", "`c0ffee`")
    rows = table(md)
    assert rows["best trivial baseline"][1] == "n/a"
    for key in ("stage1_margin", "diversity_ratio", "frechet_ratio", "flatness_ratio",
                "audit_verdict"):
        assert rows[label(key)][1:] == ["n/a", "**MISS**"], key
    for key in ("precision", "recall", "density", "coverage"):   # no extra figure was written
        assert rows[key][1] == "n/a"
    assert rows["stage2 gate"][1] == "n/a" and rows["wall time"][1] == "n/a"
    assert "stage3 FAILED: exit code 3: stage3 gate failed" in rows["what failed"][1]
    assert "not run: audit, generate, evaluate" in rows["what failed"][1]
    assert "Targets met: 0 of 5." in md


def test_no_pipeline_json_and_an_empty_folder(tmp_path):
    fig = measure(CorpusRun("x", tmp_path / "nothing"))
    assert all(v is None for v in fig.values.values())
    assert fig.problems == ["no pipeline.json: the pipeline did not start"]
    assert [t.key for t in fig.misses()] == [t.key for t in TARGETS]


def test_best_val_loss_falls_back_to_gate_json(tmp_path):
    run_dir = fake_run(tmp_path / "d", baselines={"val_baseline_mean": 2.0},
                       gates={"stage1": (True, "ok")})   # gate.json "best" is 1.0
    fig = measure(CorpusRun("d", run_dir))
    assert fig.best_val == 1.0 and fig.values["stage1_margin"] == pytest.approx(0.5)


def test_audit_verdict_from_a_summary_json(tmp_path):
    run_dir = fake_run(tmp_path / "e", verdict="trouble")
    write(run_dir / "audit" / "summary.json", {"verdict": "unclear"})
    assert measure(CorpusRun("e", run_dir)).values["audit_verdict"] == "unclear"


def test_files_left_from_an_earlier_run_are_not_reported(tmp_path):
    run_dir = fake_run(tmp_path / "f", **GOOD)
    old = time.time() - 3600
    for path in run_dir.rglob("*"):
        if path.is_file() and path.name != "pipeline.json":
            os.utime(path, (old, old))
    since = time.time() - 60
    # audit, generate, evaluate were not reached this time; stage 1 was skipped as complete
    steps = {s: {"state": "COMPLETED", "submitted_at": old} for s in STEPS}
    steps["stage1"]["skipped_at"] = since + 1
    steps["stage3"] = {"state": "FAILED", "submitted_at": since + 2, "reason": "exit code 1"}
    write(run_dir / "pipeline.json", {"steps": steps})
    fig = measure(CorpusRun("f", run_dir, since=since))
    assert fig.values["stage1_margin"] == pytest.approx(1 - 2.0 / 2.8)   # skipped = current
    assert fig.values["diversity_ratio"] is None and fig.values["audit_verdict"] is None
    assert fig.gates["stage3"] is None and fig.extra == {}
    assert fig.problems == ["stage3 FAILED: exit code 1",
                            "not run: chunk, pairs, encode, stage2, audit, generate, evaluate"]


@pytest.mark.parametrize("key, value, met", [
    ("stage1_margin", 0.20, True), ("stage1_margin", 0.199, False),
    ("diversity_ratio", 0.5, True), ("diversity_ratio", 1.5, True),
    ("diversity_ratio", 1.51, False), ("diversity_ratio", float("nan"), False),
    ("frechet_ratio", 2.0, True), ("frechet_ratio", 0.1, True), ("frechet_ratio", 2.01, False),
    ("flatness_ratio", 0.49, False), ("flatness_ratio", float("inf"), False),
    ("audit_verdict", "unclear", True), ("audit_verdict", "trouble", False),
    ("audit_verdict", None, False), ("frechet_ratio", None, False)])
def test_target_bounds(key, value, met):
    target = next(t for t in TARGETS if t.key == key)
    assert target.met(value) is met


def test_main_writes_the_report_and_exits_0_with_misses(tmp_path, monkeypatch, capsys):
    """main with the pipeline replaced by fake run folders: one per seed, misses printed."""
    seen = []

    def fake_corpus(name, run_dir, seed, experiment, overrides):
        seen.append((name, seed, experiment, tuple(overrides)))
        return CorpusRun(name, fake_run(tmp_path / name, **(GOOD if seed == 1 else BAD)),
                         wall_s=1.0, exit_code=0)

    monkeypatch.setattr(learn, "run_corpus", fake_corpus)
    out = tmp_path / "learning.md"
    code = learn.main(["--seeds", "1", "2", "--out", str(out), "--overrides", "stage1.epochs=3"])
    assert code == 0
    assert seen == [("learn_seed1", 1, "demo", ("stage1.epochs=3",)),
                    ("learn_seed2", 2, "demo", ("stage1.epochs=3",))]
    text = out.read_text()
    assert "--seeds 1 2 --experiment demo --overrides stage1.epochs=3" in text
    printed = capsys.readouterr().out
    assert "MISS learn_seed2: diversity ratio" in printed and "MISS learn_seed1" not in printed


def test_main_stops_on_a_bad_override_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(learn, "run_corpus", lambda *a: pytest.fail("must not run"))
    assert learn.main(["--out", str(tmp_path / "x.md"), "--overrides", "stage1.epochz=3"]) == 2
    assert "epochz" in capsys.readouterr().err and not (tmp_path / "x.md").exists()
    assert learn.main(["--seeds", "3", "3", "--out", str(tmp_path / "x.md")]) == 2


def test_misses_are_listed_under_the_table(tmp_path):
    md = build_report([CorpusRun("learn_seed777", fake_run(tmp_path / "g", **BAD))], "c", "d", "e")
    missed = md.split("Missed:")[1]
    assert "- learn_seed777: stage-1 margin over the best trivial baseline = 3.3% (target >= 20%)" \
        in missed
    assert missed.count("- learn_seed777:") == 5
    assert "Missed:" not in build_report([CorpusRun("a", fake_run(tmp_path / "h", **GOOD))],
                                         "c", "d", "e")


def test_run_corpus_measures_stage3_when_its_gate_stopped_the_chain(tmp_path, monkeypatch):
    """Pipeline faked: stage 3 trains, fails its gate; audit and evaluate then run directly."""
    run_dir = tmp_path / "learn_seed9"
    calls = []

    def fake_run_logged(cmd, log):
        calls.append(cmd[2])
        if cmd[2] == "pipeline.run":
            assert cmd[3:] == ["demo", "--experiment", "demo", "--cluster", "local", "--run",
                               "learn_seed9", "run.seed=9", "stage3.epochs=2"]
            fake_run(run_dir, **{**GOOD, "metrics": None, "verdict": None,
                                 "gates": {"stage3": (False, "mode collapse")}},
                     states={s: "COMPLETED" for s in STEPS[:5]} | {"stage3": "FAILED"})
            write(run_dir / "stage3" / "last.pt", "weights")
            return 1
        if cmd[2] == "jobs.audit":
            write(run_dir / "audit" / "reading.txt", "verdict: unclear\n")
        else:
            write(run_dir / "evaluate" / "metrics.json", {"metrics": GOOD["metrics"]})
        return 0

    monkeypatch.setattr(learn, "_run_logged", fake_run_logged)
    run = learn.run_corpus("learn_seed9", run_dir, 9, "demo", ["stage3.epochs=2"])
    assert calls == ["pipeline.run", "jobs.audit", "jobs.evaluate"]
    assert run.exit_code == 1 and run.wall_s is not None and run.since is not None
    assert any("audit run directly on stage3/last.pt" in n for n in run.notes)
    fig = measure(run)
    assert fig.values["audit_verdict"] == "unclear" and fig.values["diversity_ratio"] == 0.9
    assert fig.gates["stage3"] == (False, "mode collapse")


def test_run_corpus_leaves_audit_alone_when_stage3_did_not_train(tmp_path, monkeypatch):
    calls = []

    def fake_run_logged(cmd, log):
        calls.append(cmd[2])
        fake_run(tmp_path / "r", states={"chunk": "FAILED"})
        return 1

    monkeypatch.setattr(learn, "_run_logged", fake_run_logged)
    run = learn.run_corpus("r", tmp_path / "r", 1, "demo", [])
    assert calls == ["pipeline.run"] and run.notes[0].startswith("pipeline exit code 1")
