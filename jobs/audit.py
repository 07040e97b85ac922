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
Clips are scored in batches of the per-rank size D was trained with (stage3.batch_size /
world_size of the generator checkpoint; audit.batch_size overrides it): minibatch
discrimination scores a sample against the mean of the rest of its batch. Each pick holds
up to audit.clips validation chunks, and the figures are means over audit.picks seeded
picks (the spread of the fakes' BCE beside them).

The verdict follows MusiGAN's rule: a discriminator is fooled when the fakes' BCE against
the "real" label is below ln 2. It counts only a discriminator that can tell real clips from
the generator's trivial twins (jobs.twins: its input noise, white noise, real frames
shuffled in time; the lowest AUC of real over twin at least audit.min_twin_auc): a D that
cannot reject its own generator's noise says nothing about the generator, so with no such D
the verdict is "trouble". The reals-relative reading (D(fake) within chance_margin of D(real))
is reported beside it.
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
           "real_prob", "d_loss", "accuracy", "fake_bce_std", "twin_auc", "twin_auc_prior",
           "twin_auc_white", "twin_auc_shuffled", "twin_bce", "counted", "fooled", "fooled_vs_reals")
METRICS = ("fake_bce_vs_real", "fake_prob", "real_bce_vs_real", "real_prob", "d_loss",
           "accuracy", "fake_bce_std", "twin_auc", "twin_bce")


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
                  n: int, seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(fakes, reals, info): a seeded pick of up to n validation pairs; fakes made from them
    as stage 3 trained G_N (jobs.fakes.make_fakes): continuation of the curriculum's view of
    the inputs, or the creative cascade on the curriculum's views of (input, target);
    reals = the clean targets."""
    from jobs.fakes import make_fakes, pick_pairs

    seed = cfg.run.seed if seed is None else seed
    pairs = rf.read_pairs(rf.pairs_file(run_dir, "val"))
    if len(pairs) < 2:
        raise AuditError(f"{rf.pairs_file(run_dir, 'val')} has {len(pairs)} pairs; the audit needs at "
                         "least 2 real validation chunks")
    picks = pick_pairs(pairs, n, seed, distinct=True)
    made = make_fakes(generator, cfg, run_dir, "stage3", gen_epoch, len(picks), seed,
                      pairs=picks, from_real=True)
    info = {"clips": len(picks), "asked_clips": n, "alpha": made.alpha,
            "mode": made.mode, "val_pairs": len(pairs), "pairs": picks}
    return made.latents, made.targets, info


def twin_batches(cfg: Config, run_dir: Path, generator: torch.nn.Module, reals: torch.Tensor,
                 pairs: list[dict], seed: int) -> dict[str, torch.Tensor]:
    """The trivial twins of the fakes (jobs.twins): the generator's input noise at alpha 1
    for the picked pairs' inputs, white noise at the training clips' level, and the reals
    with their frames shuffled."""
    from jobs.curriculum import mix_noise
    from jobs.evaluate import real_latents
    from jobs.fakes import pair_latents
    from jobs.twins import shuffled_twin, white_twin

    model = getattr(generator, "module", generator)
    inputs, = pair_latents(run_dir, pairs, ("input",))
    stats = model.noise_stats(cfg.stage3.curriculum.noise)
    prior = mix_noise(inputs, 1.0, torch.Generator().manual_seed(seed), stats)
    reference = real_latents(run_dir, "train", len(reals), seed)
    return {"prior": prior, "white": white_twin(reference, len(reals), reals.shape[2], seed),
            "shuffled": shuffled_twin(reals, seed)}


# --- scoring and reading ----------------------------------------------------------------

@torch.no_grad()
def logits(disc: torch.nn.Module, x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """D's per-scale logits [N] for clips x, scored in batches of `batch` as D was trained
    (a last batch of one joins the batch before it: minibatch features need two)."""
    starts = list(range(0, len(x), batch))
    if len(starts) > 1 and len(x) - starts[-1] < 2:
        starts.pop()
    ends = starts[1:] + [len(x)]
    parts = [disc(x[a:b])[0] for a, b in zip(starts, ends)]
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def auc(high: torch.Tensor, low: torch.Tensor) -> float:
    """P(a sample of `high` scores above one of `low`), ties half: 1 = always told apart."""
    diff = high.view(-1, 1) - low.view(1, -1)
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


@torch.no_grad()
def score(disc: torch.nn.Module, fakes: torch.Tensor, reals: torch.Tensor, batch: int,
          twins: Optional[dict[str, torch.Tensor]] = None) -> dict:
    """Audit numbers of one discriminator on one pick; reals, fakes and each twin go in as
    separate batches, as in training."""
    from jobs.gan_losses import bce_vs_real, d_probability

    fake_logits, real_logits = logits(disc, fakes, batch), logits(disc, reals, batch)
    fake_bce, real_bce = bce_vs_real(fake_logits), bce_vs_real(real_logits)
    fake_vs_fake = bce_vs_real([-l for l in fake_logits])   # BCE against label 0
    p_fake, p_real = d_probability(fake_logits), d_probability(real_logits)
    correct = torch.cat([p_real > 0.5, p_fake < 0.5]).float()
    out = {"fake_bce_vs_real": fake_bce.mean().item(), "fake_prob": p_fake.mean().item(),
           "real_bce_vs_real": real_bce.mean().item(), "real_prob": p_real.mean().item(),
           "d_loss": 0.5 * (real_bce.mean() + fake_vs_fake.mean()).item(),
           "accuracy": correct.mean().item()}
    for name, clips in (twins or {}).items():
        twin_logits = logits(disc, clips, batch)
        out[f"twin_auc_{name}"] = auc(p_real, d_probability(twin_logits))
        out[f"twin_bce_{name}"] = bce_vs_real(twin_logits).mean().item()
    if twins:
        out["twin_auc"] = min(out[f"twin_auc_{name}"] for name in twins)
        out["twin_bce"] = min(out[f"twin_bce_{name}"] for name in twins)
    return out


def mean_over_picks(scores: list[dict]) -> dict:
    """The picks' scores of one discriminator averaged, with the fakes' BCE spread."""
    out = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
    for key in ("twin_auc", "twin_bce"):   # the worst twin of the means, not a mean of minima
        twins = [v for k, v in out.items() if k.startswith(f"{key}_")]
        if twins:
            out[key] = min(twins)
    bce = torch.tensor([s["fake_bce_vs_real"] for s in scores], dtype=torch.float64)
    out["fake_bce_std"] = float(bce.std(correction=0))
    return out


def is_fooled(row: dict) -> bool:
    """MusiGAN's rule: D took the fakes for real when their BCE vs the real label < ln 2."""
    return row["fake_bce_vs_real"] < LN2


def fooled_vs_reals(row: dict, chance_margin: float) -> bool:
    """The reals-relative reading: D(fake) within `chance_margin` of D(real) (label smoothing
    caps what D says of reals, so a D can score both below 0.5 and still not tell them apart)."""
    return row["fake_prob"] >= row["real_prob"] - chance_margin


def is_counted(row: dict, min_twin_auc: float) -> bool:
    """Can this D tell real clips from every trivial twin? It ranks reals above each twin
    (lowest AUC >= min_twin_auc) and, by MusiGAN's rule, is fooled by none (each twin's
    BCE vs the real label >= ln 2). So a generator that outputs its own noise meets only
    strict counted discriminators, and never reads "healthy"."""
    return (row.get("twin_auc", float("nan")) >= min_twin_auc
            and row.get("twin_bce", float("nan")) >= LN2)


def read_rows(rows: list[dict], collapse_d_loss: float, chance_margin: float,
              min_twin_auc: float) -> tuple[str, list[str]]:
    """Verdict (healthy | trouble | unclear) and findings, in the seed's terms, over the
    discriminators that can tell real music from the trivial twins."""
    findings, verdict = [], "unclear"
    judged = [r for r in rows if is_counted(r, min_twin_auc)]
    shown = ", ".join(f"{r['d_epoch']}: AUC {r.get('twin_auc', float('nan')):.2f} / BCE "
                      f"{r.get('twin_bce', float('nan')):.2f}" for r in rows)
    if not judged:
        findings.append(f"no discriminator can tell real clips from the generator's trivial twins "
                        f"(lowest AUC of real over twin / lowest twin BCE vs real, per D epoch: "
                        f"{shown}; needed AUC >= {min_twin_auc:g} and BCE >= ln 2): a D that "
                        "cannot reject its own generator's noise says nothing about the generator")
        verdict = "trouble"
    else:
        if len(judged) < len(rows):
            findings.append(f"{len(rows) - len(judged)} of {len(rows)} discriminators are not "
                            f"counted: they cannot tell real clips from the trivial twins "
                            f"(AUC below {min_twin_auc:g} or a twin's BCE below ln 2; per epoch "
                            f"{shown})")
        verdict = arms_race(judged, findings)
        last = judged[-1]
        at_chance = abs(last["accuracy"] - 0.5) <= chance_margin
        separated = last["real_prob"] - last["fake_prob"] > chance_margin
        probs = f"D(real) {last['real_prob']:.2f}, D(fake) {last['fake_prob']:.2f}"
        if at_chance and not separated:
            if verdict == "healthy":
                verdict = "unclear"
            findings.append(f"the newest counted discriminator (epoch {last['d_epoch']}) cannot "
                            f"tell reals from fakes: accuracy {last['accuracy']:.2f}, {probs}")
    relative = [r["d_epoch"] for r in rows if fooled_vs_reals(r, chance_margin)]
    findings.append(f"beside it, read against the reals (D(fake) within {chance_margin:g} of "
                    f"D(real)): fooled at D epochs {relative or 'none'} of "
                    f"{[r['d_epoch'] for r in rows]}")
    if all(r["d_loss"] < collapse_d_loss for r in rows):
        verdict = "trouble"
        findings.append(f"D collapse: the D loss is far below ln 2 = {LN2:.3f} at every epoch "
                        f"(max {max(r['d_loss'] for r in rows):.3f} < {collapse_d_loss}); D "
                        "dominates and G gets little useful gradient")
    findings.append(f"newest D loss {rows[-1]['d_loss']:.3f} (ln 2 = {LN2:.3f} is the confusion "
                    "point; a healthy D loss oscillates in 0.4-0.7)")
    return verdict, findings


def arms_race(rows: list[dict], findings: list[str]) -> str:
    """MusiGAN's reading of the counted discriminators, oldest first: old ones fooled and
    recent ones strict is healthy; all fooled or all strict is trouble."""
    fooled = [is_fooled(r) for r in rows]
    first, last = rows[0], rows[-1]
    if all(fooled):
        findings.append("all counted discriminators are fooled: every one, even the newest, "
                        "calls the fakes real (fake BCE vs real < ln 2): D is not learning, or "
                        "G overpowers it")
        return "trouble"
    if not any(fooled):
        findings.append("all counted discriminators are strict: even the oldest one catches "
                        "the fakes (fake BCE vs real > ln 2): the generator is losing the game, "
                        "or makes what a D can tell from music at any epoch")
        return "trouble"
    if fooled[0] and not fooled[-1]:
        findings.append(f"healthy arms race: old discriminators are fooled (epoch "
                        f"{first['d_epoch']}: fake BCE {first['fake_bce_vs_real']:.3f} < ln 2), "
                        f"recent ones are strict (epoch {last['d_epoch']}: "
                        f"{last['fake_bce_vs_real']:.3f} > ln 2)")
        return "healthy"
    findings.append("mixed: fooled and strict discriminators alternate without the "
                    "old-fooled / recent-strict order of a healthy arms race")
    return "unclear"


# --- outputs ----------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if isinstance(row[k], float) else row.get(k, ""))
                         for k in COLUMNS if k in row})
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
    if all("twin_auc" in r for r in rows):
        ax2.plot(x, [r["twin_auc"] for r in rows], "d:", label="AUC real vs twins (min)")
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

def run(cfg: Config, run_dir: Path, gen_epoch: Optional[int] = None,
        generator: Optional[torch.nn.Module] = None) -> dict:
    """Audit generator checkpoint gen_epoch (0/None = audit.gen_epoch, 0 there = last saved);
    `generator` replaces that checkpoint's generator (a trivial one, to test the audit)."""
    from jobs.load_generator import load_generator, model_config

    run_dir = Path(run_dir)
    stage_dir = rf.step_dir(run_dir, "stage3")
    found = saved_epochs(stage_dir)
    full = [e for e, p in found.items() if not EPOCH_FILE.match(p.name).group(2)]
    gen_epoch = gen_epoch or cfg.audit.gen_epoch or (max(full) if full else 0)
    if gen_epoch not in full:
        raise AuditError(f"generator checkpoint {rf.epoch_checkpoint(stage_dir, gen_epoch)} not found "
                         f"(saved epochs with a generator: {full or 'none'}; older ones keep "
                         "only the discriminator, stage3.keep_last)")
    manifest = rf.read_encode_manifest(run_dir)
    loaded, gen_state = load_generator(found[gen_epoch], manifest, cfg.audit.use_ema)
    generator = loaded if generator is None else generator
    model_cfg = model_config(gen_state, found[gen_epoch])
    batch_size, batch_source, batch_text = batch_choice(cfg, model_cfg, gen_state, found[gen_epoch])
    seeds = [cfg.run.seed + k for k in range(max(cfg.audit.picks, 1))]
    picks = []
    for seed in seeds:
        fakes, reals, info = fixed_batches(model_cfg, run_dir, generator, gen_epoch,
                                           max(cfg.audit.clips, batch_size), seed)
        picks.append((fakes, reals, twin_batches(model_cfg, run_dir, generator, reals,
                                                 info["pairs"], seed)))
    info.update(batch=batch_size, batch_source=batch_source, picks=len(seeds))
    info.pop("pairs")

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
        row = mean_over_picks([score(disc, f, r, batch_size, t) for f, r, t in picks])
        row.update(d_epoch=epoch, checkpoint=name, counted=is_counted(row, cfg.audit.min_twin_auc),
                   fooled=is_fooled(row), fooled_vs_reals=fooled_vs_reals(row, cfg.audit.chance_margin))
        rows.append(row)
    return write_reading(cfg, run_dir, gen_epoch, found[gen_epoch], gen_state, rows, skipped,
                         info, batch_text)


def write_reading(cfg: Config, run_dir: Path, gen_epoch: int, gen_path: Path, gen_state: dict,
                  rows: list[dict], skipped: list[str], info: dict, batch_text: str) -> dict:
    """Write the table, plot and reading of the audit, log them to MLflow, return the record."""
    from pipeline.tracking import step_run

    out = rf.step_dir(run_dir, rf.AUDIT)
    lines = [f"audit of generator epoch {gen_epoch} ({gen_path}) against "
             f"{len(rows)} discriminator checkpoint(s); {info['clips']} fakes "
             f"(curriculum alpha {info['alpha']:g}, {info['mode']}) + {info['clips']} real "
             f"validation chunks + the trivial twins, in batches of {info['batch']}, mean "
             f"over {info['picks']} pick(s)", f"batch size: {batch_text}",
             f"generator weights: {gen_state['weights']} (audit.use_ema {cfg.audit.use_ema})"]
    if info["clips"] < info["asked_clips"]:
        lines.append(f"note: only {info['val_pairs']} validation pairs, so {info['clips']} "
                     f"clips a pick, not {info['asked_clips']}")
    lines += [f"skipped {s}" for s in skipped]
    if len(rows) < 2:
        lines.append(f"FAILED: {len(rows)} usable discriminator checkpoint(s); the audit needs "
                     "at least two to compare epochs")
        text = "\n".join(lines) + "\n"
        atomic_write_text(out / rf.AUDIT_READING, text)
        raise AuditError(text.strip())
    verdict, findings = read_rows(rows, cfg.audit.collapse_d_loss, cfg.audit.chance_margin,
                                  cfg.audit.min_twin_auc)
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
                            "batch_source": info["batch_source"], "clips": info["clips"],
                            "picks": info["picks"], "weights": gen_state["weights"],
                            "alpha": info["alpha"], "d_epochs": [r["d_epoch"] for r in rows]})
        for row in rows:
            tracker.log_metrics({f"audit_{k}": row[k] for k in METRICS if k in row},
                                step=row["d_epoch"])
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
