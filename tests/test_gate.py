"""The validation gate: each rule on a synthetic per-epoch metrics history (as metrics.jsonl
holds it), the shipped defaults on a collapsed and a healthy run, warn versus stop, and the
reason reaching `pipeline.status`."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from jobs.gate import evaluate_gate
from pipeline import config
from pipeline.schema import GateConfig

LEVELS = 3


def gate_cfg(**changes) -> GateConfig:
    """Every rule off; `changes` switches on the ones a test is about."""
    base = dict(require_finite=True, min_improvement=0.0, max_val_loss=None,
                beat_baselines=False, min_margin=0.0, last_epochs=3, kl_floor_tolerance=None,
                min_d_loss=None, min_diversity_ratio=None)
    return GateConfig(**(base | changes))


def history(val_losses, **series) -> list[dict]:
    """metrics.jsonl-like lines: epoch, val_loss and any per-epoch series given by name."""
    rows = [{"epoch": i + 1, "val_loss": v} for i, v in enumerate(val_losses)]
    for key, values in series.items():
        for row, value in zip(rows, values):
            row[key] = value
    return rows


def kl_history(levels_per_epoch) -> list[dict]:
    rows = history([1.0] * len(levels_per_epoch))
    for row, levels in zip(rows, levels_per_epoch):
        row.update({f"val_kl_level_{i}": v for i, v in enumerate(levels)})
    return rows


def gan_history(d_losses, ratios, alphas=None) -> list[dict]:
    n = len(d_losses)
    return history([1.0] * n, train_d_loss=d_losses, val_diversity_ratio=ratios,
                   alpha=alphas if alphas is not None else [1.0] * n)


# --- progress and finiteness (the rules kept from before) --------------------------------

def test_improvement_rule_and_max_val_loss_and_finiteness():
    g = gate_cfg(min_improvement=0.1)
    assert evaluate_gate(g, history([1.0, 0.85]))["passed"]
    res = evaluate_gate(g, history([1.0, 0.95]))
    assert not res["passed"] and "improved only 5.0%" in res["reason"]
    assert "needed 10.0%" in res["reason"]
    assert not evaluate_gate(g, history([1.0, float("nan")]))["passed"]
    assert "non-finite" in evaluate_gate(g, history([1.0, float("inf"), 0.5]))["reason"]
    g2 = gate_cfg(min_improvement=0.5, max_val_loss=0.96)
    assert evaluate_gate(g2, history([1.0, 0.95]))["passed"]       # either one suffices
    res = evaluate_gate(g2, [])
    assert not res["passed"] and "no validation loss" in res["reason"]


def test_improvement_rule_is_off_at_zero_so_a_fast_learner_passes():
    # 25 real pieces: 16.7% below the best baseline after epoch 1, 0.2% better in 19 more
    fast = history([0.833] + [0.833 - 0.0001 * i for i in range(1, 20)])
    base = {"val_baseline_repeat": 1.4, "val_baseline_mean": 1.0}
    res = evaluate_gate(gate_cfg(beat_baselines=True, min_margin=0.05), fast, base)
    assert res["passed"], res["reason"]
    assert res["margin"] == pytest.approx(1 - 0.8311 / 1.0)
    assert "val_baseline_mean" in res["reason"]
    # the old rule, still available, fails that same run
    old = evaluate_gate(gate_cfg(min_improvement=0.01), fast, base)
    assert not old["passed"] and "improved only 0.2%" in old["reason"]


# --- stage 1: the margin over the best trivial baseline ----------------------------------

def test_stage1_margin_is_measured_against_the_best_baseline():
    base = {"val_baseline_repeat": 1.2, "val_baseline_mean": 0.8,
            "val_baseline_start_mean": 0.7}
    g = gate_cfg(beat_baselines=True, min_margin=0.1)
    res = evaluate_gate(g, history([1.0, 0.65]), base)           # 7.1% below 0.7
    assert not res["passed"]
    assert "val_baseline_start_mean 0.7" in res["reason"] and "needed 10.0%" in res["reason"]
    assert res["margin"] == pytest.approx(1 - 0.65 / 0.7)
    assert res["best_baseline"] == "val_baseline_start_mean"
    assert evaluate_gate(g, history([1.0, 0.6]), base)["passed"]  # 14.3% below
    # min_margin 0: strictly below every baseline
    g0 = gate_cfg(beat_baselines=True)
    res = evaluate_gate(g0, history([1.0, 0.75]), base)
    assert not res["passed"] and "val_baseline_start_mean 0.7" in res["reason"]
    assert evaluate_gate(g0, history([1.0, 0.69]), base)["passed"]
    # no baselines (creative mode): the rule is not applied, and gate.json says so
    res = evaluate_gate(g, history([1.0, 0.95]))
    assert res["passed"] and "no trivial baselines" in res["reason"]


def test_stage1_margin_is_over_the_structure_aware_baselines_too():
    # the corpus: stage 1 3.052, start_mean 3.126, the input's period tiled 2.697
    base = {"val_baseline_repeat": 4.1, "val_baseline_mean": 3.4,
            "val_baseline_start_mean": 3.126, "val_baseline_period": 2.697,
            "val_baseline_last_bar": 2.9}
    g = gate_cfg(beat_baselines=True, min_margin=0.05)
    res = evaluate_gate(g, history([3.3, 3.052]), base)
    assert not res["passed"] and res["best_baseline"] == "val_baseline_period"
    assert "not below the best trivial baseline val_baseline_period 2.697" in res["reason"]
    assert res["margin"] == pytest.approx(1 - 3.052 / 2.697)
    without = {k: v for k, v in base.items() if k not in ("val_baseline_period",
                                                          "val_baseline_last_bar")}
    assert evaluate_gate(gate_cfg(beat_baselines=True), history([3.3, 3.052]), without)["passed"]
    res = evaluate_gate(g, history([3.3, 2.5]), base)                 # 7.3% below 2.697
    assert res["passed"] and "val_baseline_period" in res["reason"]


# --- stage 1: the order probe --------------------------------------------------------------

def probe(ordered: float, permuted: float) -> dict:
    return {"val_loss": ordered, "val_loss_permuted": permuted,
            "order_gain": permuted / ordered - 1.0}


def test_order_rule_needs_the_permuted_input_to_score_worse():
    g = gate_cfg(min_order_gain=0.03)
    h = history([1.0, 0.9])
    res = evaluate_gate(g, h, order_probe=probe(3.052, 3.041))     # the issue: better permuted
    assert not res["passed"] and res["order_gain"] == pytest.approx(3.041 / 3.052 - 1)
    assert "permuted in time the val loss is 0.4% better" in res["reason"]
    assert "needed at least 3.0% worse" in res["reason"]
    res = evaluate_gate(g, h, order_probe=probe(3.0, 3.06))        # 2% worse: not enough
    assert not res["passed"] and "2.0% worse" in res["reason"]
    res = evaluate_gate(g, h, order_probe=probe(3.0, 3.3))         # 10% worse
    assert res["passed"] and "10.0% worse" in res["reason"]
    nan = {"val_loss": 3.0, "val_loss_permuted": math.nan, "order_gain": math.nan}
    assert not evaluate_gate(g, h, order_probe=nan)["passed"]
    res = evaluate_gate(g, h)                                       # creative: no probe
    assert res["passed"] and "order not judged" in res["reason"]
    off = evaluate_gate(gate_cfg(), h, order_probe=probe(3.0, 2.0))
    assert off["passed"] and all(c["rule"] != "order" for c in off["checks"])


# --- on_fail: stop or warn ------------------------------------------------------------------

def test_on_fail_warn_marks_a_failed_gate_warned_and_stop_does_not():
    h, p = history([1.0, 0.9]), probe(3.0, 3.0)
    stop = evaluate_gate(gate_cfg(min_order_gain=0.03), h, order_probe=p)
    assert not stop["passed"] and stop["warned"] is False and stop["on_fail"] == "stop"
    warn = evaluate_gate(gate_cfg(min_order_gain=0.03, on_fail="warn"), h, order_probe=p)
    assert not warn["passed"] and warn["warned"] is True and warn["on_fail"] == "warn"
    assert warn["reason"] == stop["reason"]
    ok = evaluate_gate(gate_cfg(on_fail="warn"), h)
    assert ok["passed"] and ok["warned"] is False
    json.dumps(warn)


def test_demo_and_its_experiments_warn_and_the_cluster_default_stops():
    for name in ("demo", "aurl", "musicvae", "musigan", "powermuse"):
        cfg = config.load(name, "slurm")
        assert [getattr(cfg, s).gate.on_fail for s in ("stage1", "stage2", "stage3")] == \
            ["warn"] * 3, name
    default = config.load(None, "slurm")
    assert [getattr(default, s).gate.on_fail for s in ("stage1", "stage2", "stage3")] == \
        ["stop"] * 3
    with pytest.raises(config.ConfigError, match="on_fail"):
        config.load(None, "local", ["stage2.gate.on_fail=wran"])


# --- stage 2: posterior collapse ---------------------------------------------------------

def test_stage2_fails_when_every_vae_level_sits_at_the_free_bits_floor():
    g = gate_cfg(kl_floor_tolerance=0.01)
    collapsed = kl_history([[2.0, 1.5, 1.0]] + [[0.1, 0.104, 0.03]] * 3)
    res = evaluate_gate(g, collapsed, free_bits=0.1)
    assert not res["passed"] and "posterior collapse" in res["reason"]
    assert "free-bits floor 0.1" in res["reason"] and "last 3 epochs" in res["reason"]
    # one level carrying information in one of those epochs is not collapse
    alive = kl_history([[2.0, 1.5, 1.0]] + [[0.1, 0.104, 0.03]] * 2 + [[0.1, 0.3, 0.03]])
    assert evaluate_gate(g, alive, free_bits=0.1)["passed"]
    # the tolerance: 0.12 is above 0.1 + 0.01
    above = kl_history([[0.12, 0.1, 0.1]] * 3)
    assert evaluate_gate(g, above, free_bits=0.1)["passed"]
    # collapse earlier in training, recovered in the last epochs, passes
    recovered = kl_history([[0.05] * LEVELS] * 3 + [[0.5] * LEVELS] * 3)
    assert evaluate_gate(g, recovered, free_bits=0.1)["passed"]


def test_stage2_rule_needs_the_window_and_names_missing_metrics():
    g = gate_cfg(kl_floor_tolerance=0.01)
    short = kl_history([[0.05] * LEVELS] * 2)
    res = evaluate_gate(g, short, free_bits=0.1)
    assert res["passed"] and "not judged" in res["reason"]
    res = evaluate_gate(g, history([1.0, 0.9, 0.8]), free_bits=0.1)
    assert not res["passed"] and "val_kl_level_" in res["reason"]
    res = evaluate_gate(g, kl_history([[0.05] * LEVELS] * 3), free_bits=None)
    assert not res["passed"] and "free_bits" in res["reason"]


# --- stage 3: discriminator collapse and mode collapse ------------------------------------

def test_stage3_fails_on_discriminator_collapse_for_the_last_epochs():
    g = gate_cfg(min_d_loss=0.2)
    collapsed = gan_history([0.05, 0.5, 0.15, 0.12, 0.11], [0.8] * 5)
    res = evaluate_gate(g, collapsed, d_pretrain_epochs=1)
    assert not res["passed"] and "discriminator collapse" in res["reason"]
    assert "ln 2" in res["reason"]
    one_dip = gan_history([0.05, 0.5, 0.15, 0.45, 0.11], [0.8] * 5)
    assert evaluate_gate(g, one_dip, d_pretrain_epochs=1)["passed"]
    # D pre-training epochs (G frozen, D wins by design) are not judged
    pretrain = gan_history([0.05, 0.05, 0.1, 0.1], [0.8] * 4)
    res = evaluate_gate(g, pretrain, d_pretrain_epochs=2)
    assert res["passed"] and "not judged" in res["reason"]


def test_stage3_fails_on_mode_collapse_of_the_noise_generator():
    g = gate_cfg(min_diversity_ratio=0.3)
    collapsed = gan_history([0.5] * 5, [0.9, 0.5, 0.11, 0.1, 0.09])
    res = evaluate_gate(g, collapsed, d_pretrain_epochs=1)
    assert not res["passed"] and "mode collapse" in res["reason"]
    assert "0.09" in res["reason"]
    varied = gan_history([0.5] * 5, [0.1, 0.1, 0.7, 0.8, 0.75])
    assert evaluate_gate(g, varied, d_pretrain_epochs=1)["passed"]
    # curriculum off: the generator is never trained from noise, so this is not judged
    off = gan_history([0.5] * 5, [0.1] * 5, alphas=[0.0] * 5)
    res = evaluate_gate(g, off, d_pretrain_epochs=1)
    assert res["passed"] and "not judged" in res["reason"]
    missing = history([1.0] * 5, train_d_loss=[0.5] * 5, alpha=[1.0] * 5)
    res = evaluate_gate(g, missing, d_pretrain_epochs=1)
    assert not res["passed"] and "val_diversity_ratio" in res["reason"]


def test_every_failed_rule_is_reported_and_listed_in_checks():
    g = gate_cfg(min_d_loss=0.2, min_diversity_ratio=0.3)
    res = evaluate_gate(g, gan_history([0.12] * 6, [0.1] * 6), d_pretrain_epochs=1)
    assert not res["passed"]
    assert "discriminator collapse" in res["reason"] and "mode collapse" in res["reason"]
    failed = {c["rule"] for c in res["checks"] if not c["passed"]}
    assert failed == {"d_collapse", "mode_collapse"}
    json.dumps(res)                                  # gate.json must be writable as JSON


# --- the shipped defaults -----------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    return config.load(None, "local")


def test_shipped_defaults_fail_todays_collapsed_stage3_and_pass_a_healthy_one(shipped):
    s3 = shipped.stage3
    epochs = 20
    alphas = [min(1.0, 0.1 * max(0, e - 5)) for e in range(1, epochs + 1)]
    collapsed = gan_history([0.6] * 8 + [0.12] * 12, [0.5] * 8 + [0.1] * 12, alphas)
    res = evaluate_gate(s3.gate, collapsed, free_bits=s3.kl.free_bits,
                        d_pretrain_epochs=s3.gan.d_pretrain_epochs)
    assert not res["passed"]
    assert "discriminator collapse" in res["reason"] and "mode collapse" in res["reason"]
    healthy = gan_history([0.55, 0.6, 0.5, 0.45] * 5, [0.8, 0.9, 0.7, 1.1] * 5, alphas)
    res = evaluate_gate(s3.gate, healthy, free_bits=s3.kl.free_bits,
                        d_pretrain_epochs=s3.gan.d_pretrain_epochs)
    assert res["passed"], res["reason"]


def test_shipped_defaults_for_stages_1_and_2(shipped):
    s1, s2 = shipped.stage1, shipped.stage2
    base = {"val_baseline_repeat": 4.0, "val_baseline_mean": 3.2,
            "val_baseline_start_mean": 3.0}
    fast = history([2.5, 2.499, 2.498])                   # 16.7% below, flat after epoch 1
    assert evaluate_gate(s1.gate, fast, base)["passed"]
    worse = history([3.5, 3.1, 3.05])                      # beats the mean, not start_mean
    assert not evaluate_gate(s1.gate, worse, base)["passed"]
    close = history([3.5, 3.0, 2.9])                        # 3.3% below start_mean: under 5%
    res = evaluate_gate(s1.gate, close, base)
    assert not res["passed"] and "needed 5.0%" in res["reason"]
    assert s1.gate.on_fail == "stop" and not res["warned"]
    # the order probe: at least 3% worse with the input's frames permuted
    assert not evaluate_gate(s1.gate, fast, base, order_probe=probe(2.498, 2.52))["passed"]
    assert evaluate_gate(s1.gate, fast, base, order_probe=probe(2.498, 2.8))["passed"]
    assert s2.gate.min_order_gain is None and s2.baselines is None
    fb = s2.kl.free_bits
    collapsed = kl_history([[1.0] * LEVELS] * 3 + [[fb * 0.5] * LEVELS] * 5)
    assert not evaluate_gate(s2.gate, collapsed, free_bits=fb)["passed"]
    used = kl_history([[1.0] * LEVELS] * 3 + [[fb * 0.5, fb * 3, fb * 0.5]] * 5)
    assert evaluate_gate(s2.gate, used, free_bits=fb)["passed"]


# --- metrics.jsonl ------------------------------------------------------------------------

def test_read_history_reads_metrics_jsonl(tmp_path):
    from jobs.gate import read_history

    path = tmp_path / "metrics.jsonl"
    assert read_history(path) == []
    path.write_text('{"epoch": 1, "val_loss": 1.0}\n\n{"epoch": 2, "val_loss": NaN}\n')
    rows = read_history(path)
    assert rows[0] == {"epoch": 1, "val_loss": 1.0} and math.isnan(rows[1]["val_loss"])
    path.write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_history(path)



# --- make status --------------------------------------------------------------------------

def test_status_shows_the_gate_reason_of_a_failed_stage(tmp_path):
    from pipeline import state, status
    from pipeline.atomic import atomic_write_json

    cfg = config.load("demo", "local", [f"run.root={tmp_path}", "run.name=g"])
    run_dir = tmp_path / "g"
    run_dir.mkdir()
    config.write_resolved(cfg, run_dir)
    atomic_write_json(run_dir / state.STATE_FILE, {
        "cluster": "local", "steps": {s: {"job_id": "", "signature": "sig", "state": "FAILED"}
                                      for s in ("stage1", "stage3")}})
    reason = "best val loss 3.05 is only 1.2% below the best trivial baseline"
    atomic_write_json(run_dir / "stage1" / "gate.json", {"passed": False, "reason": reason})
    (run_dir / "stage1" / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "val_loss": 3.05, "best_val_loss": 3.05}) + "\n")
    # the launcher's marker carries the reason ...
    state.write_marker(run_dir, "stage1", state.FAILED, "sig",
                       reason=f"validation gate failed: {reason}")
    # ... and a marker without one (written by a launcher that died) falls back to gate.json
    collapse = "mode collapse: val_diversity_ratio below 0.3 in each of the last 3 epochs"
    atomic_write_json(run_dir / "stage3" / "gate.json", {"passed": False, "reason": collapse})
    (run_dir / "stage3" / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "val_loss": 1.0, "best_val_loss": 1.0, "val_diversity_ratio": 0.1}) + "\n")
    state.write_marker(run_dir, "stage3", state.FAILED, "sig")
    data = json.loads((run_dir / state.STATE_FILE).read_text())
    data["steps"]["evaluate"] = {"job_id": "", "signature": "sig", "state": "COMPLETED"}
    atomic_write_json(run_dir / state.STATE_FILE, data)
    figures = {"frechet_ratio": 0.87, "two_sample_accuracy": 0.97, "periodicity": 0.105,
               "rms_db_diff": 17.2, "two_sample_accuracy_prior": 1.0}
    atomic_write_json(run_dir / "evaluate" / "metrics.json",
                      {"checkpoint": "x", "epoch": 20, "metrics": figures})
    state.write_marker(run_dir, "evaluate", state.COMPLETED, "sig")
    # stage 2 missed its gate with on_fail warn: COMPLETED, and the note says it plainly
    missed = "posterior collapse: every VAE level's val KL is at or below the free-bits floor"
    atomic_write_json(run_dir / "stage2" / "gate.json",
                      {"passed": False, "warned": True, "on_fail": "warn", "reason": missed})
    state.write_marker(run_dir, "stage2", state.COMPLETED, "sig")
    data = json.loads((run_dir / state.STATE_FILE).read_text())
    data["steps"]["stage2"] = {"job_id": "", "signature": "sig", "state": "COMPLETED"}
    atomic_write_json(run_dir / state.STATE_FILE, data)
    rows = {r["step"]: r for r in status.step_rows(run_dir)}
    assert rows["stage2"]["state"] == "COMPLETED"
    assert rows["stage2"]["note"] == f"gate missed (warned): {missed}"
    assert rows["evaluate"]["note"] == ""
    assert rows["stage1"]["state"] == "FAILED" and reason in rows["stage1"]["note"]
    assert rows["stage3"]["note"] == f"validation gate failed: {collapse}"
    assert "val_diversity_ratio=0.1" in rows["stage3"]["metric"]
    assert reason in status.format_table(list(rows.values()))
    # evaluate: the figures that the trivial twins fail, not the per-frame ones
    assert rows["evaluate"]["metric"] == \
        "two_sample_accuracy=0.97 periodicity=0.105 rms_db_diff=17.2"
