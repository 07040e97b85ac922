"""Training basics on tiny CPU runs: gradient accumulation (one process and two DDP ranks),
the generator's EMA and who reads it, precision checks, the GPU rule, epoch-file retention
with the audit reading the discriminator-only files, step-level logging, and continuing a
finished stage with a new schedule (continue_from)."""
from __future__ import annotations

import json

import mlflow
import pytest
import torch

from jobs import audit, distributed, evaluate, generate, train, train_state
from jobs.ema import Ema
from jobs.load_generator import load_generator
from pipeline.run_folder import read_encode_manifest as read_manifest
from jobs.train_step import generator_step
from tests.fixtures.train_run import read_json, run_stage, load_ckpt, make_run, run, torchrun_cmd


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- gradient accumulation ------------------------------------------------------------

@pytest.mark.integration
def test_two_half_batches_accumulated_equal_one_full_batch(tmp_path, store):
    full = make_run(tmp_path / "full", f"mlflow.tracking_uri={store}")
    accum = make_run(tmp_path / "accum", f"mlflow.tracking_uri={store}",
                     "stage1.grad_accum_steps=2")
    assert run_stage(full, "stage1") == 0
    assert run_stage(accum, "stage1") == 0
    a, b = load_ckpt(full / "stage1" / "last.pt"), load_ckpt(accum / "stage1" / "last.pt")
    assert a["step"] == b["step"] == 2 * 4       # 16 pairs / global batch 4, 2 epochs
    assert a["batch_in_epoch"] == b["batch_in_epoch"] == 0
    diff = max_diff(a["generator"], b["generator"])
    init = train.build_context(train.load_config(full), full, "stage1",
                               distributed.DistInfo(0, 1, 0, torch.device("cpu")),
                               {"codec": "mel"}).g.state_dict()
    moved = max_diff(init, a["generator"])
    print(f"accumulation 2 x 2 vs 1 x 4 after 8 AdamW steps: max abs weight difference "
          f"{diff:.3g} (weights moved up to {moved:.3g})")
    assert diff < 1e-4 and moved > 1e-2     # float32 round-off, amplified a little by Adam


def test_accumulated_gradient_is_the_full_batch_gradient(tmp_path):
    """One step with plain SGD (lr 1, no clipping): the update is the gradient itself."""
    run_dir = make_run(tmp_path, "stage1.grad_clip=0.0")
    cfg = train.load_config(run_dir)
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    _, train_set, _, _, _ = train.open_data(cfg, run_dir, cfg.stage1, info)
    x = torch.stack([train_set[i][0] for i in range(4)])
    y = torch.stack([train_set[i][1] for i in range(4)])

    def update(micros):
        ctx = train.build_context(cfg, run_dir, "stage1", info, {"codec": "mel"})
        ctx.opt_g = torch.optim.SGD(ctx.g.parameters(), lr=1.0)
        ctx.sched_g = torch.optim.lr_scheduler.LambdaLR(ctx.opt_g, lambda step: 1.0)
        before = {k: v.clone() for k, v in ctx.g.state_dict().items()}
        generator_step(ctx, micros, 1, 0)
        return {k: before[k] - v for k, v in ctx.g.state_dict().items()}
    full = update([(x, y)])
    accumulated = update([(x[:2], y[:2]), (x[2:], y[2:])])
    scale = max(v.abs().max().item() for v in full.values())
    diff = max_diff(full, accumulated)
    print(f"accumulated vs full-batch gradient: max abs difference {diff:.3g} (max {scale:.3g})")
    assert scale > 1e-3 and diff < 1e-5 * scale


@pytest.mark.integration
def test_accumulation_over_two_ddp_ranks_equals_one_process(tmp_path, store):
    one = make_run(tmp_path / "one", f"mlflow.tracking_uri={store}", "stage1.epochs=1")
    two = make_run(tmp_path / "two", f"mlflow.tracking_uri={store}", "stage1.epochs=1",
                   "stage1.grad_accum_steps=2")
    assert run_stage(one, "stage1") == 0
    proc = run(torchrun_cmd(two, "stage1", 2, ("--standalone",)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_ckpt(one / "stage1" / "last.pt"), load_ckpt(two / "stage1" / "last.pt")
    assert b["world_size"] == 2 and a["step"] == b["step"] == 4
    diff = max_diff(a["generator"], b["generator"])
    print(f"2 ranks x 2 micro-batches vs 1 process: max abs weight difference {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.integration
def test_batch_that_does_not_split_into_micro_batches_is_bad_input(tmp_path, store, capsys):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.grad_accum_steps=3")
    assert run_stage(run_dir, "stage1") == train.EXIT_BAD_INPUT
    assert "does not split into grad_accum_steps 3" in capsys.readouterr().err


# --- EMA ------------------------------------------------------------------------------

def test_ema_update_is_the_moving_average():
    model = torch.nn.Linear(3, 2)
    ema = Ema(model, 0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * start["weight"] + 0.1 * model.weight
    torch.testing.assert_close(ema.state_dict()["weight"], expected)
    torch.testing.assert_close(ema.state_dict()["bias"], start["bias"])


@pytest.mark.integration
def test_ema_is_saved_and_generation_reads_it_unless_told_not_to(tmp_path, store, capsys):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.ema_decay=0.5",
                       "generate.griffin_lim_iters=2", "evaluate.n=2")
    assert run_stage(run_dir, "stage1") == 0
    for name in ("last.pt", "best.pt", "epoch_1.pt", "epoch_2.pt"):
        state = load_ckpt(run_dir / "stage1" / name)
        assert state["generator_ema"] is not None, name
    last = load_ckpt(run_dir / "stage1" / "last.pt")
    assert max_diff(last["generator"], last["generator_ema"]) > 1e-4   # it lags the weights
    manifest = read_manifest(run_dir)
    g, state = load_generator(run_dir / "stage1" / "last.pt", manifest)
    assert state["weights"] == "ema" and "generator weights ema" in capsys.readouterr().err
    assert max_diff(last["generator_ema"], g.state_dict()) == 0.0
    g, state = load_generator(run_dir / "stage1" / "last.pt", manifest, use_ema=False)
    assert state["weights"] == "raw" and max_diff(last["generator"], g.state_dict()) == 0.0
    # generate and evaluate write which weights they used
    cfg = train.load_config(run_dir)
    cfg.evaluate.checkpoint = str(run_dir / "stage1" / "last.pt")
    made = generate.run(cfg, run_dir, checkpoint=run_dir / "stage1" / "last.pt", n=1)
    assert read_json(run_dir / "generate" / "generate.json")["weights"] == made["weights"] == "ema"
    assert evaluate.run(cfg, run_dir)["weights"] == "ema"
    assert read_json(run_dir / "evaluate" / "metrics.json")["weights"] == "ema"
    cfg.evaluate.use_ema = False
    assert evaluate.run(cfg, run_dir)["weights"] == "raw"
    # a checkpoint without EMA is read as raw weights
    plain = make_run(tmp_path / "plain", f"mlflow.tracking_uri={store}", "stage1.epochs=1")
    assert run_stage(plain, "stage1") == 0
    assert load_ckpt(plain / "stage1" / "last.pt")["generator_ema"] is None
    assert load_generator(plain / "stage1" / "last.pt", read_manifest(plain))[1]["weights"] == "raw"


# --- precision and devices ------------------------------------------------------------

@pytest.mark.integration
def test_fp16_on_the_cpu_stops_with_the_reason(tmp_path, store, capsys):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.precision=fp16")
    assert run_stage(run_dir, "stage1") == train.EXIT_BAD_INPUT
    assert "precision fp16 needs CUDA" in capsys.readouterr().err
    assert read_json(run_dir / "stage1" / "exit.json")["exit_code"] == 2


@pytest.mark.integration
def test_gpus_asked_and_no_cuda_exits_2_unless_cpu_fallback_is_allowed(tmp_path, store, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=1",
                       "cluster.steps.stage1.gpus_per_node=2", "cluster.allow_cpu_fallback=false")
    assert run_stage(run_dir, "stage1") == train.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "stage1 asked for 2 GPU(s) per node" in err and "no CUDA device" in err
    assert "cluster.allow_cpu_fallback" in read_json(run_dir / "stage1" / "exit.json")["reason"]
    assert not (run_dir / "stage1" / "last.pt").exists()
    allowed = make_run(tmp_path / "ok", f"mlflow.tracking_uri={store}", "stage1.epochs=1",
                       "cluster.steps.stage1.gpus_per_node=2", "cluster.allow_cpu_fallback=true")
    assert run_stage(allowed, "stage1") == 0
    assert "found no CUDA: training on the CPU" in capsys.readouterr().err


# --- retention, audit, step logging -----------------------------------------------------

@pytest.mark.integration
def test_keep_last_prunes_epoch_files_and_the_audit_reads_stage3_discriminators(tmp_path, store):
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.keep_last=1",
                       "stage2.epochs=1", "stage3.epochs=4", "stage3.keep_last=2",
                       "stage3.log_every_steps=2", "audit.batch_size=4")
    for stage in ("stage1", "stage2", "stage3"):
        assert run_stage(run_dir, stage) == 0
    names = lambda stage: sorted(p.name for p in (run_dir / stage).glob("epoch_*.pt"))
    assert names("stage1") == ["epoch_2.pt"]
    assert names("stage3") == ["epoch_1_d.pt", "epoch_2_d.pt", "epoch_3.pt", "epoch_4.pt"]
    d_only = load_ckpt(run_dir / "stage3" / "epoch_1_d.pt")
    assert "generator" not in d_only and "opt_g" not in d_only and d_only["discriminator"]
    cfg = train.load_config(run_dir)
    result = audit.run(cfg, run_dir)
    assert result["gen_epoch"] == 4 and result["skipped"] == []
    assert [r["checkpoint"] for r in result["rows"]] == [
        "epoch_1_d.pt", "epoch_2_d.pt", "epoch_3.pt", "epoch_4.pt"]
    assert result["weights"] == "raw" and "generator weights: raw" in result["reading"]
    with pytest.raises(audit.AuditError, match="only the discriminator"):
        audit.run(cfg, run_dir, gen_epoch=1)
    # step-level losses every 2 optimizer steps (4 per epoch), with a train/ prefix
    run_id = read_json(run_dir / "stage3" / "mlflow_run.json")["run_id"]
    client = mlflow.MlflowClient(store)
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss_step"))
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/d_loss_step")) == steps
    assert client.get_metric_history(run_id, "train/lr_step")


# --- continue a finished stage with a new schedule --------------------------------------

@pytest.mark.integration
def test_continue_from_another_checkpoint_with_new_epochs_and_lr(tmp_path, store, capsys):
    old = make_run(tmp_path / "old", f"mlflow.tracking_uri={store}", "stage1.ema_decay=0.5")
    assert run_stage(old, "stage1") == 0
    source = old / "stage1" / "last.pt"
    before = load_ckpt(source)
    new = make_run(tmp_path / "new", f"mlflow.tracking_uri={store}", "stage1.epochs=4",
                   "stage1.lr=0.001", "stage1.ema_decay=0.5",
                   f"stage1.continue_from={source}")
    # the state at the start of the continuation is the old last.pt, with the new lr
    cfg = train.load_config(new)
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    _, train_set, _, _, _ = train.open_data(cfg, new, cfg.stage1, info)
    ctx = train.build_context(cfg, new, "stage1", info, {"codec": "mel"})
    progress, report, record = train_state.start(ctx, train_set)
    assert report is None and progress.epoch == 2 and progress.step == 8
    assert max_diff(before["generator"], ctx.g.state_dict()) == 0.0
    assert max_diff(before["generator_ema"], ctx.ema.state_dict()) == 0.0
    assert ctx.opt_g.state_dict()["state"][0]["step"] == before["opt_g"]["state"][0]["step"]
    assert [g["lr"] for g in ctx.opt_g.param_groups] == [0.001]
    assert record["lr"] == [0.003, 0.001] and record["epochs"] == [2, 4]
    assert progress.val_history == before["val_history"]
    # the stage itself: epochs 3 and 4 only, at the new lr, the history kept
    assert run_stage(new, "stage1") == 0
    assert "continuing" in capsys.readouterr().err
    rows = [json.loads(l) for l in (new / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr_g"] for r in rows] == [0.003, 0.003, 0.001, 0.001]
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    last = load_ckpt(new / "stage1" / "last.pt")
    assert last["epoch"] == 4 and last["step"] == 16 and len(last["val_history"]) == 4
    cont = read_json(new / "stage1" / "continued.json")
    assert cont["from"] == str(source) and cont["at_epoch"] == 2
    assert cont["lr"] == [0.003, 0.001] and cont["epochs"] == [2, 4]
    assert not (new / "stage1" / "transfer_report.json").exists()
    run_id = read_json(new / "stage1" / "mlflow_run.json")["run_id"]
    data = mlflow.MlflowClient(store).get_run(run_id).data
    assert data.params["continued_from"] == str(source)
    assert data.params["continued_at_epoch"] == "2"
    assert "lr 0.003 -> 0.001" in data.tags["continued"]
    # continuing to no more epochs than were done is refused with the reason
    short = make_run(tmp_path / "short", f"mlflow.tracking_uri={store}",
                     f"stage1.continue_from={source}")
    assert run_stage(short, "stage1") == train.EXIT_BAD_INPUT
    assert "has done 2 epochs; stage1.epochs is 2" in capsys.readouterr().err


# --- exact resume with accumulation, EMA and the GAN step ---------------------------------

@pytest.mark.integration
def test_stage3_with_accumulation_and_ema_resumes_exactly_mid_epoch(tmp_path, store):
    import shutil

    from tests.test_resume_exact import StopAfter, assert_same_weights, run_in_process

    base = make_run(tmp_path / "base", f"mlflow.tracking_uri={store}", "stage1.epochs=1",
                    "stage2.epochs=1", "stage3.epochs=3", "stage3.grad_accum_steps=2",
                    "stage3.ema_decay=0.9", "stage3.curriculum.start_epoch=1")
    assert run_in_process(base, "stage1") == 0 and run_in_process(base, "stage2") == 0
    ref, cut = tmp_path / "ref" / "t", tmp_path / "cut" / "t"
    shutil.copytree(base, ref)
    shutil.copytree(base, cut)
    assert run_in_process(ref, "stage3") == 0
    # 4 steps of epoch 1 + the epoch-end check + 2 steps of epoch 2
    assert run_in_process(cut, "stage3", StopAfter(4 + 1 + 2)) == train.EXIT_PREEMPTED
    mid = load_ckpt(cut / "stage3" / "last.pt")
    assert (mid["epoch"], mid["batch_in_epoch"], mid["step"]) == (1, 4, 6)   # micro-batches
    assert run_in_process(cut, "stage3") == 0
    a, b = load_ckpt(ref / "stage3" / "last.pt"), load_ckpt(cut / "stage3" / "last.pt")
    assert a["step"] == b["step"] == 12
    assert_same_weights(a, b)
    assert all(torch.equal(v, b["generator_ema"][k]) for k, v in a["generator_ema"].items())
    assert max_diff(a["generator"], a["generator_ema"]) > 1e-4


def test_loss_scaler_state_goes_into_the_checkpoint_and_back(tmp_path):
    """fp16 itself needs CUDA; the scaler's save and restore are checked with CPU scalers."""
    run_dir = make_run(tmp_path)
    cfg = train.load_config(run_dir)
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    ctx = train.build_context(cfg, run_dir, "stage3", info, {"codec": "mel"})
    ctx.scaler_g = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    ctx.scaler_d = torch.amp.GradScaler("cpu", init_scale=64.0)
    state = train_state.checkpoint_state(ctx, train_state.Progress(epoch=2, step=9))
    assert state["scaler"]["g"]["scale"] == 512.0 and state["scaler"]["d"]["scale"] == 64.0
    other = train.build_context(cfg, run_dir, "stage3", info, {"codec": "mel"})
    other.scaler_g = torch.amp.GradScaler("cpu")
    other.scaler_d = torch.amp.GradScaler("cpu")
    progress = train_state.resume(other, state)
    assert (progress.epoch, progress.step) == (2, 9)
    assert other.scaler_g.get_scale() == 512.0 and other.scaler_d.get_scale() == 64.0
    assert other.scaler_g.state_dict()["growth_interval"] == 7
