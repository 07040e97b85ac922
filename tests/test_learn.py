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
             baselines: Optional[dict] = None, table: Optional[dict] = None,
             verdict: Optional[str] = None, gates: Optional[dict] = None,
             states: Optional[dict] = None, probe: Optional[dict] = None) -> Path:
    """A run folder holding only the files the report reads; None leaves a file out."""
    if val_losses is not None:
        write(run_dir / "stage1" / "metrics.jsonl",
              "".join(json.dumps({"epoch": i + 1, "val_loss": v, "loss": 9.0}) + "\n"
                      for i, v in enumerate(val_losses)))
    if baselines is not None:
        write(run_dir / "stage1" / "baselines.json", baselines)
    if probe is not None:
        write(run_dir / "stage1" / "order_probe.json", probe)
    if table is not None:
        write(run_dir / "evaluate" / "metrics.json", {"checkpoint": "stage3/last.pt",
                                                      "metrics": {}, "picks": [0, 1, 2],
                                                      "table": table})
    if verdict is not None:
        write(run_dir / "audit" / "reading.txt",
              f"audit of generator epoch 20\nverdict: {verdict}\n- newest D loss 0.12\n")
    for stage, (passed, reason) in (gates or {}).items():
        write(run_dir / stage / "gate.json", {"passed": passed == "passed",
                                              "warned": passed == "warned",
                                              "reason": reason, "best": 1.0})
    states = {s: "COMPLETED" for s in STEPS} if states is None else states
    write(run_dir / "pipeline.json",
          {"steps": {s: {"state": st, "submitted_at": time.time(), "signature": "x",
                         "reason": "" if st == "COMPLETED" else f"exit code 3: {s} gate failed"}
                     for s, st in states.items()}})
    return run_dir


def figures(**values):
    return {k: {"mean": v, "std": 0.01, "picks": 3} for k, v in values.items()}


PRIOR = figures(two_sample_accuracy=1.0, periodicity=0.05, rms_db_diff=18.0, precision=0.3,
                recall=0.6, frechet_ratio=0.9)
TWINS = {"prior": PRIOR,
         "white": figures(two_sample_accuracy=1.0, periodicity=0.01, rms_db_diff=9.0,
                          precision=0.0, recall=0.0),
         "shuffled": figures(two_sample_accuracy=1.0, periodicity=0.02, rms_db_diff=0.1,
                             precision=0.1, recall=0.7),
         "real": figures(periodicity=0.44, rms_db_diff=0.0, two_sample_accuracy=0.6)}
GOOD = dict(val_losses=[3.0, 2.0, 2.2],
            baselines={"val_baseline_repeat": 4.0, "val_baseline_mean": 3.0,
                       "val_baseline_start_mean": 2.8, "val_baseline_period": 2.5},
            probe={"order_gain": 0.08, "val_loss_permuted": 2.16, "retrieval_accuracy": 0.5,
                   "retrieval_chance": 0.14, "pairs": 21},
            table={"generated": figures(two_sample_accuracy=0.8, periodicity=0.3,
                                        rms_db_diff=-1.0, precision=0.4, recall=0.5,
                                        frechet_ratio=1.5), **TWINS},
            verdict="healthy",
            gates={"stage1": ("passed", "margin 20% over period"),
                   "stage2": ("passed", "KL above the floor"), "stage3": ("passed", "D loss 0.5")})
BAD = dict(val_losses=[3.0, 2.9],
           baselines={"val_baseline_repeat": 4.0, "val_baseline_mean": 3.0},
           probe={"order_gain": -0.004},
           table={"generated": figures(two_sample_accuracy=0.98, periodicity=0.1,
                                       rms_db_diff=17.0, precision=0.5, recall=0.3), **TWINS},
           verdict="trouble",
           gates={"stage1": ("warned", "margin 3.3%; needed 5%"), "stage2": ("passed", "ok"),
                  "stage3": ("FAILED", "mode collapse | diversity 0.1")})


def table(markdown: str) -> dict[str, list[str]]:
    """Table rows of the report: first cell -> the other cells (the first table wins)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.setdefault(cells[0], cells[1:])
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
    assert rows["target"] == ["rule", "learn_seed1234", "met", "learn_seed777", "met"]
    # 1 - 2.0 / 2.5 = 20.0 % over the period baseline; 1 - 2.9 / 3.0 = 3.3 %
    assert rows[label("stage1_margin")] == [">= 5%", "20.0%", "PASS", "3.3%", "**MISS**"]
    assert rows[label("stage1_order_gain")] == [">= 3%", "8.0%", "PASS", "-0.4%", "**MISS**"]
    assert rows[label("two_sample_accuracy")][1:] == ["0.8", "PASS", "0.98", "**MISS**"]
    assert rows[label("periodicity")][1:] == ["0.3", "PASS", "0.1", "**MISS**"]
    assert rows[label("rms_db_diff")][1:] == ["-1", "PASS", "17", "**MISS**"]
    assert rows[label("precision")][1:] == ["0.4", "PASS", "0.5", "**MISS**"]
    assert rows[label("audit_verdict")][1:] == ["healthy", "PASS", "trouble", "**MISS**"]
    assert f"Targets met: {len(TARGETS)} of {2 * len(TARGETS)}." in md
    # the per-corpus sections: the generator beside its twins, stage 1 beside its baselines
    good_part = md.split("## learn_seed1234")[1].split("## learn_seed777")[0]
    assert "| figure | generated | prior | white | shuffled | real |" in good_part
    assert "| two-sample accuracy | 0.8 ±0.01 PASS | 1 ±0.01 **MISS** | 1 ±0.01 **MISS** | " \
           "1 ±0.01 **MISS** | 0.6 ±0.01 |" in good_part
    assert "| baseline `period` | 2.5 | +0.0% |" in good_part
    assert "| stage 1 (best.pt) | 2 | +20.0% |" in good_part
    assert "order gain 8.0%" in good_part and "0.5 top-1 (chance 0.14, 21 pairs)" in good_part
    # the shuffled twin has real loudness by construction: that target is not for it
    assert "rms_db_diff: missed by prior, white" in good_part
    assert "two_sample_accuracy: missed by prior, white, shuffled" in good_part
    bad_part = md.split("## learn_seed777")[1]
    assert "stage1 gate: warned: margin 3.3%; needed 5%" in bad_part
    assert "stage3 gate: FAILED: mode collapse \\| diversity 0.1" in bad_part
    assert "what failed: pipeline exit code 1" in bad_part and "wall time 100 s" in bad_part


def test_missing_files_are_na_and_miss_and_the_failure_is_said(tmp_path):
    states = {s: "COMPLETED" for s in STEPS[:5]} | {"stage3": "FAILED"}
    run_dir = fake_run(tmp_path / "c", val_losses=[3.0, 2.0], baselines=None, table=None,
                       verdict=None, gates={"stage1": ("passed", "ok")}, states=states)
    md = build_report([CorpusRun("learn_seed5", run_dir)], "cmd", "today", "`c0ffee`")
    rows = table(md)
    for t in TARGETS:
        assert rows[t.label][1:] == ["n/a", "**MISS**"], t.key
    assert "n/a: no evaluation from this run." in md
    assert "stage2 gate: n/a" in md and "wall time n/a" in md
    assert "stage3 FAILED: exit code 3: stage3 gate failed" in md
    assert "not run: audit, generate, evaluate" in md
    assert "Targets met: 0 of 7." in md


def test_no_pipeline_json_and_an_empty_folder(tmp_path):
    fig = measure(CorpusRun("x", tmp_path / "nothing"))
    assert all(v == (None, False) for v in fig.values.values())
    assert fig.problems == ["no pipeline.json: the pipeline did not start"]
    assert [t.key for t in fig.misses()] == [t.key for t in TARGETS]


def test_best_val_loss_falls_back_to_gate_json(tmp_path):
    run_dir = fake_run(tmp_path / "d", baselines={"val_baseline_mean": 2.0},
                       gates={"stage1": (True, "ok")})   # gate.json "best" is 1.0
    fig = measure(CorpusRun("d", run_dir))
    assert fig.best_val == 1.0 and fig.values["stage1_margin"][0] == pytest.approx(0.5)


def test_audit_verdict_from_a_summary_json(tmp_path):
    run_dir = fake_run(tmp_path / "e", verdict="trouble")
    write(run_dir / "audit" / "summary.json", {"verdict": "unclear"})
    assert measure(CorpusRun("e", run_dir)).values["audit_verdict"] == ("unclear", True)


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
    assert fig.values["stage1_margin"][0] == pytest.approx(1 - 2.0 / 2.5)   # skipped = current
    assert fig.values["periodicity"] == (None, False)
    assert fig.values["audit_verdict"] == (None, False)
    assert fig.gates["stage3"] is None and fig.table == {}
    assert fig.problems == ["stage3 FAILED: exit code 1",
                            "not run: chunk, pairs, encode, stage2, audit, generate, evaluate"]


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
    assert "MISS learn_seed2: bar-scale periodicity" in printed and "MISS learn_seed1" not in printed


def test_main_stops_on_a_bad_override_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(learn, "run_corpus", lambda *a: pytest.fail("must not run"))
    assert learn.main(["--out", str(tmp_path / "x.md"), "--overrides", "stage1.epochz=3"]) == 2
    assert "epochz" in capsys.readouterr().err and not (tmp_path / "x.md").exists()
    assert learn.main(["--seeds", "3", "3", "--out", str(tmp_path / "x.md")]) == 2


def test_misses_are_listed_under_the_table(tmp_path):
    md = build_report([CorpusRun("learn_seed777", fake_run(tmp_path / "g", **BAD))], "c", "d", "e")
    missed = md.split("Missed:")[1]
    assert "- learn_seed777: stage-1 margin over the best trivial baseline = 3.3% (target >= 5%)" \
        in missed
    assert missed.split("##")[0].count("- learn_seed777:") == 7
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
            fake_run(run_dir, **{**GOOD, "table": None, "verdict": None,
                                 "gates": {"stage3": ("FAILED", "mode collapse")}},
                     states={s: "COMPLETED" for s in STEPS[:5]} | {"stage3": "FAILED"})
            write(run_dir / "stage3" / "last.pt", "weights")
            return 1
        if cmd[2] == "jobs.audit":
            write(run_dir / "audit" / "reading.txt", "verdict: unclear\n")
        else:
            write(run_dir / "evaluate" / "metrics.json", {"metrics": {}, "table": GOOD["table"]})
        return 0

    monkeypatch.setattr(learn, "_run_logged", fake_run_logged)
    run = learn.run_corpus("learn_seed9", run_dir, 9, "demo", ["stage3.epochs=2"])
    assert calls == ["pipeline.run", "jobs.audit", "jobs.evaluate"]
    assert run.exit_code == 1 and run.wall_s is not None and run.since is not None
    assert any("audit run directly on stage3/last.pt" in n for n in run.notes)
    fig = measure(run)
    assert fig.values["audit_verdict"] == ("unclear", True)
    assert fig.values["periodicity"] == (0.3, True)
    assert fig.gates["stage3"] == ("FAILED", "mode collapse")


def test_run_corpus_leaves_audit_alone_when_stage3_did_not_train(tmp_path, monkeypatch):
    calls = []

    def fake_run_logged(cmd, log):
        calls.append(cmd[2])
        fake_run(tmp_path / "r", states={"chunk": "FAILED"})
        return 1

    monkeypatch.setattr(learn, "_run_logged", fake_run_logged)
    run = learn.run_corpus("r", tmp_path / "r", 1, "demo", [])
    assert calls == ["pipeline.run"] and run.notes[0].startswith("pipeline exit code 1")
