"""Discriminator-over-epochs audit (MusiGAN's check, with the real samples it left out).

One fixed, seeded batch of fakes from generator checkpoint N and one fixed batch of real
validation chunks are scored by every saved stage-3 discriminator checkpoint. Per
discriminator epoch: mean BCE of the fakes against the "real" label, mean D probability on
fakes, the same two on reals, the D loss (mean of the real and fake BCE terms, so ln 2 is
the confusion point), and D's accuracy over reals and fakes together.

Fakes are G_N's outputs for validation inputs mixed with noise by the pure-GAN curriculum
at epoch N (`jobs.curriculum.gan_alpha`, `mix_noise`), as jobs/train.py makes them: that is
the distribution the discriminators were trained to reject, so the audit measures what they
learned. Once the curriculum reaches alpha = 1 this is generation from noise; with the
curriculum off it is continuation of real validation chunks. Reals are the clean targets.
The batch has the per-rank size D was trained with (stage3.batch_size / world_size of the
generator checkpoint; audit.batch_size overrides it): minibatch discrimination scores a
sample against the mean of the rest of its batch, which is noisier in smaller batches.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from jobs import checkpoint as ckpt_io
from pipeline import codec_facts
from pipeline import run_folder as rf
from pipeline.atomic import atomic_path, atomic_write_text
from pipeline.schema import Config

LN2 = math.log(2.0)
EPOCH_FILE = rf.EPOCH_FILE   # _d: discriminator only (stage keep_last)
COLUMNS = ("d_epoch", "checkpoint", "fake_bce_vs_real", "fake_prob", "real_bce_vs_real",
           "real_prob", "d_loss", "accuracy")


class AuditError(RuntimeError):
    """The audit cannot give a reading (e.g. fewer than two usable discriminators)."""


# --- checkpoints ------------------------------------------------------------------------

def saved_epochs(stage_dir: Path) -> dict[int, Path]:
    """{epoch: path} of the epoch_<n>.pt files in a stage folder, and of the
    discriminator-only epoch_<n>_d.pt that keep_last leaves of older epochs."""
    found = {}
    for path in Path(stage_dir).glob(rf.EPOCH_GLOB):
        match = EPOCH_FILE.match(path.name)
        if match and not (match.group(2) and int(match.group(1)) in found):
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def wanted_epochs(found: dict[int, Path], every: int, first: int, last: int) -> list[int]:
    """Discriminator epochs to audit: every saved one in [first, last] (0 = open end), plus
    the multiples of checkpoint_every in that range, so a missing file is noticed."""
    if not found and not last:
        return []
    hi = last or max(found)
    lo = first or 1
    expected = set(range(every * math.ceil(lo / every), hi + 1, every)) if every > 0 else set()
    return sorted(e for e in expected | set(found) if lo <= e <= hi)


def load_discriminator(path: Path, cfg: Config, manifest: dict):
    """The discriminator of checkpoint `path` in eval mode, if its codec facts fit the run's
    encode manifest (pipeline.codec_facts); raises ValueError saying why not."""
    from jobs.discriminator import build_discriminator

    state = ckpt_io.load(path)
    if state.get("discriminator") is None:
        raise ValueError("holds no discriminator")
    found = codec_facts.problems(manifest, state.get("codec") or {})
    if found:
        raise ValueError(f"other latents than this run's ({'; '.join(found)})")
    disc = build_discriminator(cfg)
    try:
        disc.load_state_dict(state["discriminator"])
    except RuntimeError as exc:
        raise ValueError(f"weights do not fit model.discriminator ({str(exc).splitlines()[0]})") from None
    return disc.eval()


def trained_batch(model_cfg: Config, state: dict, path: Path) -> int:
    """Per-rank batch the checkpoint's D was trained with: stage3.batch_size // world_size."""
    world = state.get("world_size")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise AuditError(f"{path} stores no usable world_size ({world!r}), so the per-rank "
                         "training batch is unknown: set audit.batch_size")
    return max(model_cfg.stage3.batch_size // world, 1)


def batch_choice(cfg: Config, model_cfg: Config, state: dict, path: Path) -> tuple[int, str, str]:
    """(batch size, source "trained" or "audit.batch_size", the reading's account of it)."""
    asked = cfg.audit.batch_size
    if asked is None:
        batch = trained_batch(model_cfg, state, path)
        return batch, "trained", (f"per-rank training batch (stage3.batch_size "
                                  f"{model_cfg.stage3.batch_size} / world_size {state['world_size']})")
    try:
        trained = f"trained per rank: {trained_batch(model_cfg, state, path)}"
    except AuditError:
        trained = "per-rank training batch unknown: no world_size in the checkpoint"
    return asked, "audit.batch_size", f"audit.batch_size = {asked} ({trained})"


# --- fixed batches ----------------------------------------------------------------------

def fixed_batches(cfg: Config, run_dir: Path, generator: torch.nn.Module, gen_epoch: int,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(fakes, reals, info): seeded pick of validation pairs; fakes made from them as stage 3
    trained G_N (jobs.fakes.make_fakes): continuation of the curriculum's view of the
    inputs, or the creative cascade on the curriculum's views of (input, target); reals =
    the clean targets."""
    from jobs.fakes import make_fakes, pick_pairs

    pairs = rf.read_pairs(rf.pairs_file(run_dir, "val"))
    if len(pairs) < 2:
        raise AuditError(f"{rf.pairs_file(run_dir, 'val')} has {len(pairs)} pairs; the audit needs at "
                         "least 2 real validation chunks")
    picks = pick_pairs(pairs, batch_size, cfg.run.seed, distinct=True)
    made = make_fakes(generator, cfg, run_dir, "stage3", gen_epoch, len(picks), cfg.run.seed,
                      pairs=picks, from_real=True)
    info = {"batch": len(picks), "asked_batch": batch_size, "alpha": made.alpha,
            "mode": made.mode, "val_pairs": len(pairs)}
    return made.latents, made.targets, info


# --- scoring and reading ----------------------------------------------------------------

@torch.no_grad()
def score(disc: torch.nn.Module, fakes: torch.Tensor, reals: torch.Tensor) -> dict:
    """Audit numbers of one discriminator; reals and fakes go in as separate batches, as in training."""
    from jobs.gan_losses import bce_vs_real, d_probability

    fake_logits, _ = disc(fakes)
    real_logits, _ = disc(reals)
    fake_bce, real_bce = bce_vs_real(fake_logits), bce_vs_real(real_logits)
    fake_vs_fake = bce_vs_real([-l for l in fake_logits])   # BCE against label 0
    p_fake, p_real = d_probability(fake_logits), d_probability(real_logits)
    correct = torch.cat([p_real > 0.5, p_fake < 0.5]).float()
    return {"fake_bce_vs_real": fake_bce.mean().item(), "fake_prob": p_fake.mean().item(),
            "real_bce_vs_real": real_bce.mean().item(), "real_prob": p_real.mean().item(),
            "d_loss": 0.5 * (real_bce.mean() + fake_vs_fake.mean()).item(),
            "accuracy": correct.mean().item()}


def is_fooled(row: dict, chance_margin: float) -> bool:
    """Did this D take the fakes for real? The seed's test (fake BCE vs the real label below
    ln 2), or, read against the reals it scored in the same call, D(fake) within
    `chance_margin` of D(real): a D that gives reals 0.47 and fakes 0.43 cannot tell them
    apart, although both BCEs are above ln 2 (label smoothing caps what D says of reals)."""
    return (row["fake_bce_vs_real"] < LN2
            or row["fake_prob"] >= row["real_prob"] - chance_margin)


def read_rows(rows: list[dict], collapse_d_loss: float, chance_margin: float) -> tuple[str, list[str]]:
    """Verdict (healthy | trouble | unclear) and findings, in the seed's terms."""
    fooled = [is_fooled(r, chance_margin) for r in rows]   # D took G_N's fakes for real
    first, last = rows[0], rows[-1]
    findings, verdict = [], "unclear"
    if all(fooled):
        verdict = "trouble"
        findings.append("all discriminators are fooled: every one, even the newest, calls the "
                        "fakes real (fake BCE vs real < ln 2, or D(fake) within "
                        f"{chance_margin:g} of D(real)): D is not learning, or G overpowers it")
    elif not any(fooled):
        verdict = "trouble"
        findings.append("all discriminators are strict: even the oldest one catches the fakes "
                        "(fake BCE vs real > ln 2 and D(fake) more than "
                        f"{chance_margin:g} below D(real)): the generator is losing the game")
    elif fooled[0] and not fooled[-1]:
        verdict = "healthy"
        findings.append(f"healthy arms race: old discriminators are fooled (epoch {first['d_epoch']}: "
                        f"fake BCE {first['fake_bce_vs_real']:.3f}, D(fake) {first['fake_prob']:.2f} "
                        f"vs D(real) {first['real_prob']:.2f}), recent ones are strict "
                        f"(epoch {last['d_epoch']}: {last['fake_bce_vs_real']:.3f} > ln 2, D(fake) "
                        f"{last['fake_prob']:.2f} vs D(real) {last['real_prob']:.2f})")
    else:
        findings.append("mixed: fooled and strict discriminators alternate without the "
                        "old-fooled / recent-strict order of a healthy arms race")
    if all(r["d_loss"] < collapse_d_loss for r in rows):
        verdict = "trouble"
        findings.append(f"D collapse: the D loss is far below ln 2 = {LN2:.3f} at every epoch "
                        f"(max {max(r['d_loss'] for r in rows):.3f} < {collapse_d_loss}); D "
                        "dominates and G gets little useful gradient")
    at_chance = abs(last["accuracy"] - 0.5) <= chance_margin
    separated = last["real_prob"] - last["fake_prob"] > chance_margin
    probs = f"D(real) {last['real_prob']:.2f}, D(fake) {last['fake_prob']:.2f}"
    if at_chance and not separated:
        if verdict == "healthy":
            verdict = "unclear"
        findings.append(f"the newest discriminator (epoch {last['d_epoch']}) cannot tell reals from "
                        f"fakes: accuracy {last['accuracy']:.2f}, {probs}")
    elif at_chance:
        findings.append(f"the newest discriminator (epoch {last['d_epoch']}) ranks reals above fakes "
                        f"({probs}) but its 0.5 threshold puts both on one side: accuracy "
                        f"{last['accuracy']:.2f}")
    findings.append(f"newest D loss {last['d_loss']:.3f} (ln 2 = {LN2:.3f} is the confusion "
                    "point; a healthy D loss oscillates in 0.4-0.7)")
    return verdict, findings


# --- outputs ----------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k])
                         for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def write_plot(path: Path, rows: list[dict], gen_epoch: int) -> None:
    """Loss and probability against discriminator epoch, fakes and reals, with ln 2 / 0.5."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [r["d_epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(x, [r["fake_bce_vs_real"] for r in rows], "o-", label='fakes: BCE vs "real"')
    ax1.plot(x, [r["real_bce_vs_real"] for r in rows], "s-", label='reals: BCE vs "real"')
    ax1.plot(x, [r["d_loss"] for r in rows], "^--", label="D loss (mean of terms)")
    ax1.axhline(LN2, color="grey", linestyle=":", label="ln 2 = 0.693")
    ax1.set(xlabel="discriminator epoch", ylabel="BCE", title=f"generator epoch {gen_epoch}")
    ax1.legend(fontsize=8)
    ax2.plot(x, [r["fake_prob"] for r in rows], "o-", label="D(fake)")
    ax2.plot(x, [r["real_prob"] for r in rows], "s-", label="D(real)")
    ax2.plot(x, [r["accuracy"] for r in rows], "^--", label="accuracy")
    ax2.axhline(0.5, color="grey", linestyle=":", label="0.5")
    ax2.set(xlabel="discriminator epoch", ylabel="probability", ylim=(-0.02, 1.02),
            title="D probability of real")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


# --- the step ---------------------------------------------------------------------------

def run(cfg: Config, run_dir: Path, gen_epoch: Optional[int] = None) -> dict:
    """Audit generator checkpoint gen_epoch (0/None = audit.gen_epoch, 0 there = last saved)."""
    from jobs.load_generator import load_generator, model_config
    from pipeline.tracking import step_run

    run_dir = Path(run_dir)
    stage_dir, out = rf.step_dir(run_dir, "stage3"), rf.step_dir(run_dir, rf.AUDIT)
    found = saved_epochs(stage_dir)
    full = [e for e, p in found.items() if not EPOCH_FILE.match(p.name).group(2)]
    gen_epoch = gen_epoch or cfg.audit.gen_epoch or (max(full) if full else 0)
    if gen_epoch not in full:
        raise AuditError(f"generator checkpoint {rf.epoch_checkpoint(stage_dir, gen_epoch)} not found "
                         f"(saved epochs with a generator: {full or 'none'}; older ones keep "
                         "only the discriminator, stage3.keep_last)")
    manifest = rf.read_encode_manifest(run_dir)
    generator, gen_state = load_generator(found[gen_epoch], manifest, cfg.audit.use_ema)
    model_cfg = model_config(gen_state, found[gen_epoch])
    batch_size, batch_source, batch_text = batch_choice(cfg, model_cfg, gen_state, found[gen_epoch])
    fakes, reals, info = fixed_batches(cfg, run_dir, generator, gen_epoch, batch_size)
    info.update(batch_source=batch_source)

    rows, skipped = [], []
    for epoch in wanted_epochs(found, cfg.stage3.checkpoint_every, cfg.audit.first_epoch,
                               cfg.audit.last_epoch):
        name = found[epoch].name if epoch in found else rf.epoch_checkpoint(stage_dir, epoch).name
        if epoch not in found:
            skipped.append(f"{name}: missing")
            continue
        try:
            disc = load_discriminator(found[epoch], model_cfg, manifest)
        except (ValueError, FileNotFoundError) as exc:
            skipped.append(f"{name}: {exc}")
            continue
        rows.append({"d_epoch": epoch, "checkpoint": name, **score(disc, fakes, reals)})

    lines = [f"audit of generator epoch {gen_epoch} ({found[gen_epoch]}) against "
             f"{len(rows)} discriminator checkpoint(s); batch {info['batch']} fakes "
             f"(curriculum alpha {info['alpha']:g}, {info['mode']}) + {info['batch']} real "
             "validation chunks", f"batch size: {batch_text}",
             f"generator weights: {gen_state['weights']} (audit.use_ema {cfg.audit.use_ema})"]
    if info["batch"] < info["asked_batch"]:
        lines.append(f"note: only {info['val_pairs']} validation pairs, so the batch is "
                     f"{info['batch']}, not {info['asked_batch']}")
    lines += [f"skipped {s}" for s in skipped]
    if len(rows) < 2:
        lines.append(f"FAILED: {len(rows)} usable discriminator checkpoint(s); the audit needs "
                     "at least two to compare epochs")
        text = "\n".join(lines) + "\n"
        atomic_write_text(out / rf.AUDIT_READING, text)
        raise AuditError(text.strip())
    verdict, findings = read_rows(rows, cfg.audit.collapse_d_loss, cfg.audit.chance_margin)
    lines.append(f"verdict: {verdict}")
    lines += [f"- {f}" for f in findings]
    text = "\n".join(lines) + "\n"
    write_csv(out / rf.AUDIT_CSV, rows)
    write_plot(out / rf.AUDIT_PNG, rows, gen_epoch)
    atomic_write_text(out / rf.AUDIT_READING, text)
    # one MLflow child run per audited generator epoch: re-auditing another epoch must not
    # overwrite (MLflow forbids changing) the params of an earlier audit
    with step_run(cfg, run_dir, f"audit/gen_epoch_{gen_epoch}") as tracker:
        tracker.log_params({"gen_epoch": gen_epoch, "batch": info["batch"],
                            "batch_source": batch_source, "weights": gen_state["weights"],
                            "alpha": info["alpha"], "d_epochs": [r["d_epoch"] for r in rows]})
        for row in rows:
            tracker.log_metrics({f"audit_{k}": row[k] for k in COLUMNS[2:]}, step=row["d_epoch"])
        tracker.set_tags({"audit.verdict": verdict})
        for name in (rf.AUDIT_CSV, rf.AUDIT_PNG, rf.AUDIT_READING):
            tracker.log_artifact(out / name, "audit")
    print(text, end="")
    return {"gen_epoch": gen_epoch, "rows": rows, "skipped": skipped, "verdict": verdict,
            "findings": findings, "reading": text, "out_dir": str(out),
            "weights": gen_state["weights"], **info}


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.config import load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder, e.g. runs/demo")
    parser.add_argument("--gen-epoch", type=int, default=None,
                        help="generator checkpoint epoch (default audit.gen_epoch; 0 = last saved)")
    args = parser.parse_args(argv)
    cfg, run_dir = load_run(args.run)
    try:
        run(cfg, run_dir, args.gen_epoch)
    except (AuditError, FileNotFoundError, ValueError) as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
