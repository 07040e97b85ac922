"""One optimizer step of a stage over `grad_accum_steps` micro-batches: the generator step
(stages 1-2) and the GAN step (stage 3: D step(s), then G with D frozen).

Each micro-batch's loss is divided by the number of micro-batches, so the accumulated
gradient is that of the mean loss over the whole batch; under DDP the gradients are only
all-reduced on the last micro-batch (no_sync before it)."""
from __future__ import annotations

import math

import torch
from torch import nn

from jobs import distributed
from jobs.curriculum import mix_noise
from jobs.gan_losses import d_loss, feature_matching, g_adv_loss, moment_matching, r1_penalty
from jobs.losses import generator_losses, paired_total
from jobs.next_frame import train_mode
from jobs.train_context import Context, no_sync
from jobs.train_errors import NonFiniteLoss

Micro = tuple[torch.Tensor, torch.Tensor]   # (input, target) of one micro-batch


def check_finite(terms: dict[str, float], what: str, ctx: Context, epoch: int,
                 batch: int) -> None:
    """Stop every rank together if any rank saw a non-finite term; name it."""
    bad = next((f"{what} term '{k}' = {v}" for k, v in terms.items() if not math.isfinite(v)),
               "")
    if distributed.any_rank(bool(bad), ctx.info):
        found = [f"rank {r}: {b}" for r, b in enumerate(distributed.gather(bad, ctx.info)) if b]
        raise NonFiniteLoss(f"non-finite loss in {ctx.stage} at epoch {epoch}, batch {batch + 1}"
                            f" (generator step {ctx.sched_g.last_epoch + 1}): " + "; ".join(found))


def clip(model: nn.Module, max_norm: float) -> tuple[float, float]:
    """Clip gradients (grad_clip 0 = off); the norms before and after. The caller stops on
    a non-finite norm: clipping would turn it into a zero (or NaN) update in silence."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0, 0.0
    before = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    after = torch.nn.utils.get_total_norm([p.grad for p in params])
    return float(before), float(after)


def floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar loss terms as Python floats, with one device sync for all of them."""
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()
    return dict(zip(terms, values))


def mean_of(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean of the micro-batches' values."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def share(loss: torch.Tensor, parts: int) -> torch.Tensor:
    """One micro-batch's share of the batch's mean loss."""
    return loss if parts == 1 else loss / parts


def set_requires_grad(model: nn.Module, flag: bool) -> None:
    """Freeze or unfreeze a model's parameters."""
    for p in model.parameters():
        p.requires_grad_(flag)


def apply_gradients(ctx: Context, model: nn.Module, opt: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, what: str, epoch: int,
                    batch: int) -> tuple[float, float]:
    """Unscale (fp16), clip, check the norm, step; the norms before and after clipping. With
    fp16 an inf norm is the scaler's cue to skip the step and lower the scale, not an error."""
    scaler.unscale_(opt)
    before, after = clip(model, ctx.scfg.grad_clip)
    if not scaler.is_enabled():
        check_finite({f"grad_norm_{what[0]}": before}, f"{what} gradient", ctx, epoch, batch)
    scaler.step(opt)
    scaler.update()
    return before, after


def finish_generator_step(ctx: Context, epoch: int, batch: int) -> tuple[float, float]:
    """The generator's optimizer step, its schedule and its moving average."""
    norms = apply_gradients(ctx, ctx.g, ctx.opt_g, ctx.scaler_g, "generator", epoch, batch)
    ctx.sched_g.step()
    if ctx.ema is not None:
        ctx.ema.update(ctx.g)
    return norms


def generator_step(ctx: Context, micros: list[Micro], epoch: int,
                   batch: int) -> dict[str, float]:
    """Stages 1-2 (and stage 3's non-adversarial part): noisy views in, clean data in the loss.
    Objective next_frame: teacher-forced (jobs/next_frame.py)."""
    s = ctx.schedules(epoch)
    mode = train_mode(ctx.scfg)
    stats = ctx.g.noise_stats(ctx.scfg.curriculum.noise)
    ctx.opt_g.zero_grad(set_to_none=True)
    rows = []
    for i, (inp, tgt) in enumerate(micros):
        in_view = mix_noise(inp, s["alpha"], stats=stats)
        tgt_view = mix_noise(tgt, s["alpha"], stats=stats)
        with no_sync(ctx.g_train, i < len(micros) - 1):
            with ctx.autocast():
                out = ctx.g_train(in_view, tgt_view, mode, ctx.scfg.anti_cheat_noise)
                terms = generator_losses(out, inp, tgt, ctx.scfg, ctx.codec["codec"],
                                         s["kl_weight"])
            rows.append(floats(terms))
            check_finite(rows[-1], "generator", ctx, epoch, batch)
            ctx.scaler_g.scale(share(terms["total"], len(micros))).backward()
    before, after = finish_generator_step(ctx, epoch, batch)
    return {f"train_{k}": v for k, v in mean_of(rows).items()} | {
        "grad_norm_g_before": before, "grad_norm_g_after": after}


def discriminator_update(ctx: Context, micros: list[Micro], fakes: list[torch.Tensor],
                         epoch: int, batch: int) -> dict[str, float]:
    """One D step on real targets and detached fakes, accumulated over the micro-batches."""
    gan = ctx.scfg.gan
    ctx.opt_d.zero_grad(set_to_none=True)
    rows = []
    for i, ((_, tgt), fake) in enumerate(zip(micros, fakes)):
        real = tgt.detach().requires_grad_(gan.r1_gamma > 0)
        with no_sync(ctx.d_train, i < len(micros) - 1):
            with ctx.autocast():
                (real_logits, _), (fake_logits, _) = ctx.d_train(real, fake.detach())
                loss_d, stats = d_loss(real_logits, fake_logits, gan)
                if gan.r1_gamma > 0:
                    r1 = r1_penalty(real_logits, real)
                    loss_d = loss_d + 0.5 * gan.r1_gamma * r1
                    stats["r1"] = float(r1.detach())
            check_finite({"d_loss": float(loss_d.detach())}, "discriminator", ctx, epoch, batch)
            ctx.scaler_d.scale(share(loss_d, len(micros))).backward()
        rows.append({"d_loss": float(loss_d.detach()), **stats})
    before, after = apply_gradients(ctx, ctx.d, ctx.opt_d, ctx.scaler_d, "discriminator",
                                    epoch, batch)
    return {f"train_{k}": v for k, v in mean_of(rows).items()} | {
        "grad_norm_d_before": before, "grad_norm_d_after": after}


def gan_step(ctx: Context, micros: list[Micro], epoch: int, batch: int) -> dict[str, float]:
    """Stage 3: D step(s) on detached fakes, then (after D pre-training) the G step with D
    frozen: reconstruction terms + adv_weight * adversarial + feature matching. With one
    micro-batch G's forward serves both; with several, G runs again for its own step."""
    gan, s = ctx.scfg.gan, ctx.schedules(epoch)
    pretrain = epoch <= gan.d_pretrain_epochs
    reuse = len(micros) == 1 and not pretrain
    stats = ctx.g.noise_stats(ctx.scfg.curriculum.noise)
    views = [(mix_noise(inp, s["alpha"], stats=stats), mix_noise(tgt, s["alpha"], stats=stats))
             for inp, tgt in micros]
    mode, cheat = ctx.scfg.mode, ctx.scfg.anti_cheat_noise
    outs = []
    for in_view, tgt_view in views:
        with ctx.autocast():
            if reuse:
                outs.append(ctx.g_train(in_view, tgt_view, mode, cheat))
            else:   # G is not trained yet, or runs again below: no graph here
                with torch.no_grad():
                    outs.append(ctx.g(in_view, tgt_view, mode, cheat))
    for _ in range(max(1, gan.d_steps)):
        metrics = discriminator_update(ctx, micros, [o["output"] for o in outs], epoch, batch)
    if pretrain:   # G's optimizer is never touched
        return metrics
    set_requires_grad(ctx.d, False)
    try:
        ctx.opt_g.zero_grad(set_to_none=True)
        rows = []
        for i, ((inp, tgt), (in_view, tgt_view), out) in enumerate(zip(micros, views, outs)):
            with no_sync(ctx.g_train, i < len(micros) - 1):
                with ctx.autocast():
                    if not reuse:
                        out = ctx.g_train(in_view, tgt_view, mode, cheat)
                    terms = generator_gan_losses(ctx, out, inp, tgt, s)
                rows.append(floats(terms))
                check_finite(rows[-1], "generator", ctx, epoch, batch)
                ctx.scaler_g.scale(share(terms["g_loss"], len(micros))).backward()
        before, after = finish_generator_step(ctx, epoch, batch)
    finally:
        set_requires_grad(ctx.d, True)
    return metrics | {f"train_{k}": v for k, v in mean_of(rows).items()} | {
        "grad_norm_g_before": before, "grad_norm_g_after": after}


def generator_gan_losses(ctx: Context, out: dict, inp: torch.Tensor, tgt: torch.Tensor,
                         s: dict[str, float]) -> dict[str, torch.Tensor]:
    """G's stage-3 terms with D frozen; "g_loss" is what G's step descends."""
    gan, fake = ctx.scfg.gan, out["output"]
    terms = generator_losses(out, inp, tgt, ctx.scfg, ctx.codec["codec"], s["kl_weight"])
    fake_logits, fake_feats = ctx.d(fake)
    with torch.no_grad():
        _, real_feats = ctx.d(tgt)
    terms["adv"] = g_adv_loss(fake_logits, gan)
    terms["feature_matching"] = feature_matching(real_feats, fake_feats,
                                                 gan.feature_matching_mode)
    moments = moment_matching(fake, tgt)
    terms["moment_matching"] = moments.pop("total")
    terms |= {f"moment_{k}": v.detach() for k, v in moments.items()}
    # recon_fade: at alpha 1 the input says nothing about the target, and a paired loss is
    # won by one average output; its weight follows 1 - alpha instead
    fade = s["alpha"] if gan.recon_fade else 0.0
    terms["g_loss"] = (terms["total"] - fade * paired_total(terms, ctx.scfg)
                       + s["adv_weight"] * terms["adv"]
                       + gan.feature_matching * terms["feature_matching"]
                       + gan.moment_matching * terms["moment_matching"])
    return terms
