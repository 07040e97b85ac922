"""The trainer end to end on tiny synthetic latents: the stage chain with transfer reports,
the validation gate, the trivial baselines, non-finite losses, bad input, telemetry in
MLflow; and the pieces (pair dataset, global-batch sampler, gate) on their own."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.latent_store import LatentStore
from jobs import distributed, train, train_state, validation
from jobs.pair_data import GlobalBatchSampler, PairDataset, read_pairs
from tests.fixtures.train_run import read_json, run_stage, load_ckpt, make_run


def metrics(run_dir, stage):
    return [json.loads(l) for l in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


# --- the chain ------------------------------------------------------------------------

@pytest.mark.integration
def test_chain_transfers_weights_stage_to_stage(tmp_path, store, capsys):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage2.epochs=1",
                       "stage3.epochs=2", "stage3.sample_every=2", "generate.n=2",
                       "generate.griffin_lim_iters=2")
    for stage in ("stage1", "stage2", "stage3"):
        assert run_stage(run_dir, stage) == 0, capsys.readouterr().err[-2000:]
    r1 = read_json(run_dir / "stage1" / "transfer_report.json")
    r2 = read_json(run_dir / "stage2" / "transfer_report.json")
    r3 = read_json(run_dir / "stage3" / "transfer_report.json")
    assert r1["source"] is None
    assert r2["source"].endswith("stage1/best.pt")
    assert r3["source"].endswith("stage2/best.pt")
    # stage 2 = stage 1's network + the VAE: the core is loaded, the VAE is new
    assert r2["generator"]["counts"]["loaded"] > 0
    assert r2["generator"]["new"] and all(n.startswith("vae.") for n in r2["generator"]["new"])
    assert all(n.startswith(("core.", "latent_")) for n in r2["generator"]["loaded"])
    # stage 3 loads all of stage 2's generator; its discriminator is new
    assert r3["generator"]["counts"]["new"] == 0 and r3["generator"]["counts"]["loaded"] > 0
    assert r3["discriminator"]["counts"]["loaded"] == 0
    assert r3["discriminator"]["counts"]["new"] > 0
    # and the loaded tensors really are stage 1's best weights at stage 2's start
    best1 = load_ckpt(run_dir / "stage1" / "best.pt")["generator"]
    cfg = train.load_config(run_dir)
    ctx = train.build_context(cfg, run_dir, "stage2", distributed.setup(), {"codec": "mel"})
    before = {k: v.clone() for k, v in ctx.g.state_dict().items()}
    train_state.transfer_from_previous(ctx)
    name = r2["generator"]["loaded"][0]
    assert torch.equal(ctx.g.state_dict()[name], best1[name])
    assert not torch.equal(before[name], best1[name])
    # stage 3's checkpoints carry G and D for the audit, with the codec and config
    ck = load_ckpt(run_dir / "stage3" / "epoch_2.pt")
    assert ck["discriminator"] and ck["generator"] and ck["codec"]["codec"] == "mel"
    assert ck["parts"] == ["transformer", "vae", "gan"] and ck["config"]["stage3"]["epochs"] == 2
    # the sample hook ran (jobs.generate.log_samples) at epoch 2 and logged to MLflow
    import mlflow
    run_id = read_json(run_dir / "stage3" / "mlflow_run.json")["run_id"]
    files = mlflow.MlflowClient(store).list_artifacts(run_id, "samples/epoch_2")
    assert sorted(Path(f.path).suffix for f in files) == [".png", ".png", ".wav", ".wav"]
    # stage 3 metrics: D health, adversarial terms, schedules
    m3 = metrics(run_dir, "stage3")
    assert "train_total" not in m3[0]              # epoch 1 = D pre-training only
    for key in ("train_d_loss", "train_d_acc_real", "train_d_acc_fake", "train_d_real_mean",
                "train_d_fake_mean", "train_d_real_ln2_gap", "grad_norm_d_before", "lr_d"):
        assert key in m3[0] and math.isfinite(m3[0][key])
    for key in ("train_adv", "train_feature_matching", "train_g_loss", "train_kl"):
        assert key in m3[1]
    assert (m3[0]["adv_weight"], m3[1]["adv_weight"]) == (0.0, 0.1)
    assert (m3[0]["alpha"], m3[1]["alpha"]) == (0.0, 0.5)


@pytest.mark.integration
def test_d_pretraining_never_touches_the_generator(tmp_path, store):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=1",
                       "stage2.epochs=1", "stage3.epochs=1")
    for stage in ("stage1", "stage2", "stage3"):
        assert run_stage(run_dir, stage) == 0
    g2 = load_ckpt(run_dir / "stage2" / "best.pt")["generator"]
    s3 = load_ckpt(run_dir / "stage3" / "last.pt")
    assert all(torch.equal(g2[k], v) for k, v in s3["generator"].items())
    assert s3["opt_g"]["state"] == {}             # G's optimizer never stepped
    assert len(s3["opt_d"]["state"]) > 0          # D's did


@pytest.mark.integration
def test_failed_gate_exits_3_and_stops_the_chain(tmp_path, store, capsys):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=1",
                       "stage1.gate.min_improvement=0.5")
    assert run_stage(run_dir, "stage1") == train.EXIT_GATE
    gate = read_json(run_dir / "stage1" / "gate.json")
    assert gate["passed"] is False and "improved only 0.0%" in gate["reason"]
    err = capsys.readouterr().err
    assert "validation gate failed" in err and gate["reason"] in err
    assert read_json(run_dir / "stage1" / "exit.json")["exit_code"] == 3
    assert run_stage(run_dir, "stage2") == train.EXIT_BAD_INPUT
    assert "did not pass its validation gate" in capsys.readouterr().err


@pytest.mark.integration
def test_stage1_beats_both_trivial_baselines(tmp_path, store):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=4")
    assert run_stage(run_dir, "stage1") == 0
    last = metrics(run_dir, "stage1")[-1]
    base = read_json(run_dir / "stage1" / "baselines.json")
    assert base["val_baseline_repeat"] == last["val_baseline_repeat"]
    assert last["val_loss"] < base["val_baseline_mean"] < base["val_baseline_repeat"]
    # and it got there by learning: the val loss fell epoch after epoch
    history = [m["val_loss"] for m in metrics(run_dir, "stage1")]
    assert all(b < a for a, b in zip(history, history[1:])) and history[-1] < 0.95 * history[0]


@pytest.mark.integration
def test_telemetry_and_loss_terms_reach_mlflow(tmp_path, store):
    import mlflow
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=1")
    assert run_stage(run_dir, "stage1") == 0
    run_id = read_json(run_dir / "stage1" / "mlflow_run.json")["run_id"]
    logged = mlflow.MlflowClient(store).get_run(run_id).data.metrics
    for key in ("system/samples_per_s", "system/data_wait_share", "system/peak_mem_mb",
                "train/grad_norm_g_before", "train/grad_norm_g_after", "train/latent_l1",
                "val/latent_l1", "val/loss", "train/lr_g", "val/baseline_mean",
                "val/baseline_repeat", "train/alpha", "train/kl_weight", "val/gate_passed"):
        assert key in logged, key
    assert logged["system/samples_per_s"] > 0 and 0 <= logged["system/data_wait_share"] <= 1
    assert logged["system/peak_mem_mb"] > 10
    assert logged["train/grad_norm_g_after"] <= 1.0 + 1e-4     # clipped at stage grad_clip = 1


@pytest.mark.integration
def test_non_finite_loss_saves_error_checkpoint_and_exits_4(tmp_path, store, capsys):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}")
    shard = run_dir / "encode" / "shards" / "latents-00000.npy"
    data = np.load(shard)
    pair = read_pairs(run_dir / "pairs" / "train.jsonl")[0]
    manifest = read_json(run_dir / "encode" / "manifest.json")
    row = manifest["index"][pair["target_song"]][pair["target"]][1]
    data[row, 0, 0] = np.nan
    np.save(shard, data)
    assert run_stage(run_dir, "stage1") == train.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "non-finite loss in stage1 at epoch 1, batch" in err and "term 'latent_l1' = nan" in err
    state = load_ckpt(run_dir / "stage1" / "error.pt")
    assert all(torch.isfinite(v).all() for v in state["generator"].values())
    assert read_json(run_dir / "stage1" / "exit.json")["exit_code"] == 4


@pytest.mark.integration
def test_non_finite_gradient_norm_stops_training_like_a_non_finite_loss(tmp_path, store, capsys,
                                                                      monkeypatch):
    """A finite loss with an infinite gradient (e.g. from a damaged weight) must not be
    clipped into zero updates for a whole stage that then passes its gate."""
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}")
    build = train.build_context

    def with_infinite_gradient(*args, **kwargs):
        ctx = build(*args, **kwargs)
        weight = ctx.g.core.out_proj.weight
        weight.register_hook(lambda grad: grad * float("inf"))
        return ctx
    monkeypatch.setattr(train, "build_context", with_infinite_gradient)
    assert run_stage(run_dir, "stage1") == train.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "non-finite loss in stage1 at epoch 1, batch 1" in err
    assert "generator gradient term 'grad_norm_g' = inf" in err
    assert read_json(run_dir / "stage1" / "exit.json")["exit_code"] == 4


@pytest.mark.integration
def test_missing_inputs_exit_2_with_the_path(tmp_path, store, capsys):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}")
    (run_dir / "pairs" / "val.jsonl").unlink()
    assert run_stage(run_dir, "stage1") == train.EXIT_BAD_INPUT
    assert "val.jsonl" in capsys.readouterr().err
    assert run_stage(tmp_path / "nowhere", "stage1") == train.EXIT_BAD_INPUT
    assert "config.resolved.yaml" in capsys.readouterr().err
    run_dir2 = make_run(tmp_path / "b", f"mlflow.tracking_uri={store}")
    assert run_stage(run_dir2, "stage2") == train.EXIT_BAD_INPUT
    assert "stage1/best.pt" in capsys.readouterr().err


# --- pieces ---------------------------------------------------------------------------

def test_augmentation_probability_seeding_and_clean_validation(tmp_path):
    run_dir = make_run(tmp_path, variants=2)
    st = LatentStore(run_dir / "encode")
    pairs = read_pairs(run_dir / "pairs" / "train.jsonl") * 50        # 800 draws per epoch
    ds = PairDataset(st, pairs, augment_prob=0.3, seed=5)
    ds.set_epoch(1)

    def augmented(i):
        inp, tgt = ds[i]
        clean = torch.from_numpy(st.get(pairs[i]["song"], pairs[i]["input"]).astype(np.float32))
        return not torch.equal(inp, clean)
    flags = [augmented(i) for i in range(len(ds))]
    assert 0.25 < np.mean(flags) < 0.35
    assert flags == [augmented(i) for i in range(len(ds))]           # same epoch, same draws
    ds.set_epoch(2)
    assert flags != [augmented(i) for i in range(len(ds))]           # a new epoch redraws
    val_pairs = read_pairs(run_dir / "pairs" / "val.jsonl")
    val = PairDataset(st, val_pairs, augment_prob=0.0)
    for i, p in enumerate(val_pairs):
        assert torch.equal(val[i][0], torch.from_numpy(st.get(p["song"], p["input"]).astype(np.float32)))
    assert st.variants(val_pairs[0]["song"], 0) == []               # val songs have none
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (128, 75)


def test_global_batch_sampler_splits_each_global_batch_over_ranks():
    one = list(GlobalBatchSampler(22, 8, 0, 1, seed=3).__iter__())
    ranks = [GlobalBatchSampler(22, 8, r, 2, seed=3) for r in range(2)]
    split = [list(s) for s in ranks]
    assert len(one) == 2 and all(len(b) == 8 for b in one)           # 22 // 8, last dropped
    for k, batch in enumerate(one):
        assert split[0][k] + split[1][k] == batch                     # rank r = r-th half
    s = GlobalBatchSampler(22, 8, 0, 1, seed=3)
    s.set_epoch(1)
    assert list(s) != one                                             # reshuffled per epoch
    s.set_epoch(0, start_batch=1)
    assert list(s) == one[1:] and len(s) == 1                         # resume mid-epoch
    val = [GlobalBatchSampler(11, 4, r, 2, seed=3, shuffle=False, drop_last=False)
           for r in range(2)]
    seen = sorted(i for v in val for b in v for i in b)
    assert seen == list(range(11))                                    # each once, none dropped
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(22, 7, 0, 2, seed=0)
    with pytest.raises(ValueError, match="only 3 training pairs"):
        GlobalBatchSampler(3, 4, 0, 1, seed=0)


def test_read_pairs_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"song": "a", "input": 0, "target_song": "a", "target": 1}\n{"song": "a"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:2: pair is missing keys"):
        read_pairs(path)


@pytest.mark.integration
def test_creative_mode_trains_the_cascade_and_logs_mask_metrics(tmp_path, store, capsys):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.mode=creative",
                       "stage1.epochs=2", "stage1.gate.min_improvement=-100.0")
    assert run_stage(run_dir, "stage1") == 0, capsys.readouterr().err[-2000:]
    rows = metrics(run_dir, "stage1")
    last = rows[-1]
    for key in ("train_balance", "train_coverage", "train_temporal_diversity",
                "train_complementarity", "train_mask_in_mean", "train_mask_tgt_mean"):
        assert key in last and math.isfinite(last[key]), key
    assert 0.0 <= last["train_mask_in_mean"] <= 1.0
    assert 0.0 <= last["train_complementarity"] <= 1.0
    ckpt = load_ckpt(run_dir / "stage1" / "last.pt")
    assert ckpt["mode"] == "creative"
    assert any(k.startswith("agent.") for k in ckpt["generator"])   # the creative agent trained


# --- issue 11: the start-mean baseline, stage 3's diversity from noise, the gate's history --

@pytest.mark.integration
def test_stage1_baselines_include_the_start_chunks_mean_spectrum(tmp_path, store):
    from jobs.losses import generator_losses

    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=1")
    assert run_stage(run_dir, "stage1") == 0
    base = read_json(run_dir / "stage1" / "baselines.json")
    cfg = train.load_config(run_dir)
    st = LatentStore(run_dir / "encode")
    losses = []
    for p in read_pairs(run_dir / "pairs" / "val.jsonl"):
        inp = torch.from_numpy(np.asarray(st.get(p["song"], p["input"]), np.float32))[None]
        tgt = torch.from_numpy(np.asarray(st.get(p["target_song"], p["target"]), np.float32))[None]
        spectrum = inp.mean(dim=2, keepdim=True).expand_as(tgt)   # the start's mean, repeated
        terms = generator_losses({"output": spectrum}, inp, tgt, cfg.stage1, "mel", 1.0)
        losses.append(float(terms["total"]))
    assert base["val_baseline_start_mean"] == pytest.approx(np.mean(losses), rel=1e-4)
    # each song's level is its spectrum: the start chunk's mean beats the global mean latent
    assert base["val_baseline_start_mean"] < base["val_baseline_mean"] < base["val_baseline_repeat"]
    last = metrics(run_dir, "stage1")[-1]
    assert last["val_baseline_start_mean"] == base["val_baseline_start_mean"]


class _Constant(torch.nn.Module):
    """A collapsed generator: the same output whatever the input."""

    def noise_stats(self, kind):
        return None

    def forward(self, inputs, targets, mode, *args, **kwargs):
        return {"output": torch.full_like(inputs, 0.5)}


class _Echo(_Constant):
    """Returns what it is given."""

    def forward(self, inputs, targets, mode, *args, **kwargs):
        return {"output": inputs.clone()}


def _rms_pairwise(x: torch.Tensor) -> float:
    flat = x.reshape(len(x), -1).double()
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return float(((flat[i] - flat[j]).pow(2).sum(1) / flat.shape[1]).mean().sqrt())


def test_stage3_validation_measures_the_diversity_of_the_generator_from_noise(tmp_path,
                                                                            monkeypatch):
    run_dir = make_run(tmp_path)
    cfg = train.load_config(run_dir)
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    _, _, val_set, _, val_sampler = train.open_data(cfg, run_dir, cfg.stage3, info)
    loader = train.make_loader(val_set, val_sampler, cfg.stage3, info)
    ctx = train.build_context(cfg, run_dir, "stage3", info, {"codec": "mel"})
    rng = torch.get_rng_state()
    first = validation.validate(ctx, loader, 3)
    assert torch.equal(torch.get_rng_state(), rng)            # the training RNG is untouched
    assert 0 < first["val_diversity_ratio"] < 10
    assert validation.validate(ctx, loader, 3)["val_diversity_ratio"] == first["val_diversity_ratio"]
    ctx.g = _Constant()
    assert validation.validate(ctx, loader, 3)["val_diversity_ratio"] == pytest.approx(0.0, abs=1e-6)
    # the generator is given the curriculum's alpha-1 view; with that view replaced by the
    # clean input, an echo's ratio is the inputs' spread over the targets', over the whole set
    seen = []
    monkeypatch.setattr(validation, "mix_noise",
                        lambda x, alpha, generator=None, stats=None: seen.append(alpha) or x)
    ctx.g = _Echo()
    ratio = validation.validate(ctx, loader, 3)["val_diversity_ratio"]
    inputs = torch.stack([val_set[i][0] for i in range(len(val_set))])
    targets = torch.stack([val_set[i][1] for i in range(len(val_set))])
    assert ratio == pytest.approx(_rms_pairwise(inputs) / _rms_pairwise(targets), rel=1e-6)
    assert seen and set(seen) == {1.0}
    # stages without a discriminator do not pay for it
    ctx2 = train.build_context(cfg, run_dir, "stage2", info, {"codec": "mel"})
    assert "val_diversity_ratio" not in validation.validate(ctx2, loader, 1)


@pytest.mark.integration
def test_stage2_gate_reads_the_history_and_fails_on_posterior_collapse(tmp_path, store):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=1",
                       "stage2.epochs=2", "stage2.gate.last_epochs=2",
                       "stage2.gate.kl_floor_tolerance=1000.0")
    assert run_stage(run_dir, "stage1") == 0
    assert run_stage(run_dir, "stage2") == train.EXIT_GATE
    gate = read_json(run_dir / "stage2" / "gate.json")
    assert "posterior collapse" in gate["reason"] and "free-bits floor 0.1" in gate["reason"]
    assert [c["rule"] for c in gate["checks"]] == ["posterior_collapse"]
    assert read_json(run_dir / "stage2" / "exit.json")["exit_code"] == train.EXIT_GATE


@pytest.mark.integration
def test_stage3_gate_judges_the_epochs_after_d_pretraining(tmp_path, store):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=1",
                       "stage2.epochs=1", "stage3.epochs=3", "stage3.gate.last_epochs=2",
                       "stage3.gate.min_diversity_ratio=1000.0", "stage3.gate.min_d_loss=0.0")
    for stage in ("stage1", "stage2"):
        assert run_stage(run_dir, stage) == 0
    assert run_stage(run_dir, "stage3") == train.EXIT_GATE
    rows = metrics(run_dir, "stage3")
    assert all(math.isfinite(r["val_diversity_ratio"]) for r in rows)
    gate = read_json(run_dir / "stage3" / "gate.json")
    checks = {c["rule"]: c for c in gate["checks"]}
    assert not checks["mode_collapse"]["passed"] and checks["d_collapse"]["passed"]
    assert "last 2 epochs" in gate["reason"]     # epochs 2 and 3; epoch 1 is D pre-training
    shown = ", ".join(f"{r['val_diversity_ratio']:.3g}" for r in rows[1:])
    assert shown in gate["reason"]
