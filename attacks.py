"""L-infinity attacks on a zero-shot classifier in [0,1] pixel space.

Every attack takes `model` (a callable mapping [0,1] images to logits), images x, labels y (class indices, or
class probabilities where stated), eps, and returns x_adv with ||x_adv - x||_inf <= eps and x_adv in [0,1].
Gradients are taken with respect to the input only: no parameter gradient is computed or accumulated, and the
model's train/eval mode is left to the caller (attack in eval mode).

    white box    pgd, cw, fgsm                         sign-gradient steps on cross-entropy or the C&W margin
    AutoAttack   apgd_ce, apgd_dlr, apgd_t, fab_t,     Auto-PGD, targeted FAB, the black-box Square attack, and
                 square, autoattack                   their ensemble
    transfer     mifgsm, difgsm, tifgsm, nifgsm,       the FGSM family of AGFT's Table 6, with the defaults of
                 pifgsm, pifgsmpp                      torchattacks 3.5.1 (the library AGFT ran them with)

Targeted attacks take the target classes as y and targeted=True; `random_target` and `least_likely_target`
pick them. Robust accuracy is always measured against the true label, whatever the attack aimed at.
"""
import math
import sys

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- shared pieces: losses, projection, targets


def cross_entropy(logits, y):
    """Cross-entropy summed over the batch; y holds class indices [B] or soft labels [B, C] (e.g. AGFT's target)."""
    return F.cross_entropy(logits.float(), y, reduction="sum")


def margin(logits, y):
    """z_y - max_{j != y} z_j per example [B]: positive while the model is right."""
    logits = logits.float()
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - others


def cw_loss(logits, y, kappa=0.0):
    """Carlini-Wagner margin loss to ascend, summed: -max(z_y - max_{j != y} z_j, -kappa)."""
    return -margin(logits, y).clamp(min=-kappa).sum()


def dlr_loss(logits, y):
    """Difference of logits ratio per example (Croce & Hein 2020): -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3)."""
    z = logits.float().sort(1, descending=True).values
    return -margin(logits, y) / (z[:, 0] - z[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """Targeted DLR per example: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    logits = logits.float()
    z = logits.sort(1, descending=True).values
    gap = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, target[:, None])[:, 0]
    return -gap / (z[:, 0] - (z[:, 2] + z[:, 3]) / 2 + 1e-12)


def project(x_adv, x, eps):
    """Back onto the eps-ball around x and into [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def random_start(x, eps):
    return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)


def input_grad(model, loss_fn, x, y):
    """d loss(model(x), y) / dx, without touching parameter gradients."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


@torch.no_grad()
def predict(model, x):
    return model(x).float()


def random_target(model, x, y):
    """A class drawn uniformly from those other than the true one, per example (torchattacks' random mode)."""
    n = predict(model, x[:1]).shape[-1]
    t = torch.randint(0, n - 1, y.shape, device=y.device)
    return t + (t >= y).long()


def least_likely_target(model, x, y):
    """The class with the lowest clean logit among those other than the true one (torchattacks' least-likely mode)."""
    return predict(model, x).scatter(1, y[:, None], float("inf")).argmin(1)


def num_classes(model, x):
    return predict(model, x[:1]).shape[-1]


_said = set()


def say_once(msg):
    if msg not in _said:
        _said.add(msg)
        print(f"attacks: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- white box: PGD, C&W, FGSM


def pgd(model, x, y, eps, alpha, steps, loss_fn=cross_entropy, targeted=False, rand_init=True, momentum=0.0):
    """Projected gradient descent (Madry et al., 2018): sign-gradient steps of size alpha, last iterate returned.

    Untargeted ascends loss_fn(model(x_adv), y); targeted (y = target classes) descends it. With momentum m, each
    step goes along v = sign(m v + sign(grad)), the velocity renormalised every step as FARE's training attack does
    (RobustVLM's train/pgd_train.py); for m < 1 that is sign(grad) wherever grad != 0, and m = 0 is plain PGD.
    """
    x = x.detach()
    x_adv = random_start(x, eps) if rand_init else x.clone()
    sign = -1.0 if targeted else 1.0
    v = torch.zeros_like(x)
    for _ in range(steps):
        grad = input_grad(model, loss_fn, x_adv, y)
        v = (momentum * v + grad.sign()).sign()
        x_adv = project(x_adv + sign * alpha * v, x, eps)
    return x_adv.detach()


def cw(model, x, y, eps, alpha, steps, kappa=0.0):
    """C&W margin loss (Carlini & Wagner, 2017) ascended by PGD, the L-inf form the seed papers evaluate with.

    With kappa = 0 a point stops moving once misclassified (its loss is flat there).
    """
    return pgd(model, x, y, eps, alpha, steps, loss_fn=lambda z, t: cw_loss(z, t, kappa))


def fgsm(model, x, y, eps, targeted=False):
    """Fast gradient sign method (Goodfellow et al., 2015): one step of size eps from x, no random start."""
    return pgd(model, x, y, eps, eps, 1, targeted=targeted, rand_init=False)


# ----------------------------------------------------------------------------- AutoAttack


def apgd(model, x, y, eps, steps=100, loss="ce", restarts=1, rho=0.75, n_targets=9):
    """Auto-PGD (Croce & Hein, ICML 2020) on loss "ce", "dlr" or "dlr-targeted" (APGD-T).

    Each run attacks only the points not yet misclassified. APGD-T makes one run (times restarts) per target
    class, the 2nd to (n_targets+1)-th highest clean logits. Returns per point an iterate the model
    misclassifies if one was found, else the highest-loss iterate (still classified correctly); points the
    model gets wrong on the clean image come back unchanged.
    """
    x = x.detach()
    clean = predict(model, x)
    loss_fn = {"ce": lambda z, t, _: F.cross_entropy(z.float(), t, reduction="none"),
               "dlr": lambda z, t, _: dlr_loss(z, t), "dlr-targeted": dlr_targeted_loss}[loss]
    if loss == "dlr-targeted":
        order = clean.argsort(1, descending=True)
        targets = [order[:, k] for k in range(1, min(n_targets, clean.shape[1] - 1) + 1) for _ in range(restarts)]
    else:
        targets = [None] * restarts
    x_adv, best = x.clone(), torch.full(y.shape, -math.inf, device=x.device)
    todo = clean.argmax(1) == y
    for target in targets:
        idx = todo.nonzero()[:, 0]
        if len(idx) == 0:
            break
        adv, fooled, loss_best = apgd_run(model, x[idx], y[idx], eps, steps, loss_fn,
                                          None if target is None else target[idx], rho)
        keep = fooled | (loss_best > best[idx])
        x_adv[idx[keep]] = adv[keep]
        best[idx] = torch.max(best[idx], loss_best)
        todo[idx[fooled]] = False
    return x_adv


def apgd_run(model, x, y, eps, steps, loss_fn, target, rho):
    """One APGD run: (x_out [B,...], fooled [B], best loss [B]); x_out is misclassified where fooled."""
    def loss_grad(x_adv):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_adv)
            loss = loss_fn(logits, y, target)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), grad, logits.detach().argmax(1) != y

    view = (-1,) + (1,) * (x.dim() - 1)
    # start: a random corner-ish point of the ball, x + eps * t / ||t||_inf with t ~ U(-1, 1)
    t = torch.rand_like(x) * 2 - 1
    x_adv = (x + eps * t / (t.flatten(1).abs().amax(1).view(view) + 1e-12)).clamp(0, 1)
    loss, grad, wrong = loss_grad(x_adv)
    x_out, fooled = x_adv.clone(), wrong.clone()
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    # checkpoints: the first after 22% of the steps, then the interval shrinks by 3% of the steps down to 6%
    interval, shrink, min_interval = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    step = torch.full((len(x),) + view[1:], 2.0 * eps, device=x.device)
    x_prev, since, increases = x_adv, 0, torch.zeros_like(loss)
    best_at_check, reduced_at_check = loss_best.clone(), torch.ones_like(fooled)
    for i in range(steps):
        a = 1.0 if i == 0 else 0.75  # momentum: the new point mixes the projected step with the last move
        z = project(x_adv + step * grad.sign(), x, eps)
        x_prev, x_adv = x_adv, project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, eps)
        last = loss
        loss, grad, wrong = loss_grad(x_adv)
        x_out = torch.where(wrong.view(view), x_adv, x_out)  # masks by torch.where: no host sync per step
        fooled |= wrong
        increases += (loss > last).float()
        better = loss > loss_best
        b = better.view(view)
        x_best, grad_best = torch.where(b, x_adv, x_best), torch.where(b, grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        since += 1
        if since == interval:
            # halve the step and restart from the best point where the loss rose in at most rho of the steps
            # since the last checkpoint, or where it was not halved last time and the best loss did not improve
            halve = (increases <= rho * interval) | (~reduced_at_check & (best_at_check >= loss_best))
            h = halve.view(view)
            step, x_adv = torch.where(h, step / 2, step), torch.where(h, x_best, x_adv)
            grad = torch.where(h, grad_best, grad)
            reduced_at_check, best_at_check = halve, loss_best.clone()
            since, increases = 0, torch.zeros_like(loss)
            interval = max(interval - shrink, min_interval)
    x_out = torch.where(fooled.view(view), x_out, x_best)
    return x_out.detach(), fooled, loss_best


def apgd_ce(model, x, y, eps, steps=100, restarts=1):
    """APGD on cross-entropy (Croce & Hein, ICML 2020)."""
    return apgd(model, x, y, eps, steps, "ce", restarts)


def apgd_dlr(model, x, y, eps, steps=100, restarts=1):
    """APGD on the DLR loss (Croce & Hein, ICML 2020); DLR needs 3 classes, with fewer this is APGD-CE."""
    if num_classes(model, x) < 3:
        say_once("APGD-DLR needs at least 3 classes: running APGD-CE instead")
        return apgd_ce(model, x, y, eps, steps, restarts)
    return apgd(model, x, y, eps, steps, "dlr", restarts)


def apgd_t(model, x, y, eps, steps=100, n_targets=9):
    """APGD on the targeted DLR loss against the top n_targets other classes (Croce & Hein, ICML 2020).

    Targeted DLR needs 4 classes; with 3 this is APGD-DLR, with 2 APGD-CE.
    """
    if num_classes(model, x) < 4:
        say_once("APGD-T needs at least 4 classes: running APGD-DLR instead")
        return apgd_dlr(model, x, y, eps, steps)
    return apgd(model, x, y, eps, steps, "dlr-targeted", n_targets=n_targets)


def square_p(i, p_init):
    """Square's schedule for the fraction of pixels changed at iteration i (AutoAttack's, for 5000 queries)."""
    for after, div in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16), (200, 8), (50, 4), (10, 2)):
        if i > after:
            return p_init / div
    return p_init


@torch.no_grad()
def square(model, x, y, eps, queries=5000, p_init=0.8, compact_every=1):
    """Square Attack (Andriushchenko et al., ECCV 2020): random search over +-eps squares on the margin, no gradient.

    Starts from random vertical stripes at +-eps, then each query redraws one square per image, of side
    shrinking with the schedule, with one random sign per channel, kept if the margin z_y - max_{j!=y} z_j
    went down. Stops for a point once it is misclassified; clean-wrong points come back unchanged. Squares may
    sit anywhere in the image (the reference code never places one on the last row or column, which makes it
    weaker on tiny images).

    Every `compact_every` queries the batch is cut to the points still correct (one host sync); in between, points
    fooled since are masked with torch.where and still go through the model. Random draws are made for the points
    in the batch, so results depend on compact_every; 1 (a sync per query) gives the reference results.
    """
    if not (isinstance(compact_every, int) and compact_every >= 1):
        raise ValueError(f"square: compact_every must be an integer >= 1, got {compact_every!r}")
    x = x.detach()
    x_adv = x.clone()
    idx = (predict(model, x).argmax(1) == y).nonzero()[:, 0]
    if len(idx) == 0:
        return x_adv
    b, c, h, w = x[idx].shape
    best = project(x[idx] + eps * torch.randint(0, 2, (b, c, 1, w), device=x.device).mul(2).sub(1), x[idx], eps)
    m = margin(model(best), y[idx])
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    out, sel = best.clone(), torch.arange(b, device=x.device)  # sel: the points of idx in the batch
    for i in range(queries - 1):
        if i % compact_every == 0:
            out[sel] = best
            keep = (m > 0).nonzero()[:, 0]
            sel, best, m = sel[keep], best[keep], m[keep]
            if len(sel) == 0:
                break
            xs, ys = x[idx[sel]], y[idx[sel]]
        n = len(sel)
        s = min(max(round(math.sqrt(square_p(i, p_init) * h * w)), 1), h, w)
        top = torch.randint(0, h - s + 1, (n, 1), device=x.device)
        left = torch.randint(0, w - s + 1, (n, 1), device=x.device)
        in_rows = ((rows >= top) & (rows < top + s))[:, None, :, None]
        in_cols = ((cols >= left) & (cols < left + s))[:, None, None, :]
        signs = torch.randint(0, 2, (n, c, 1, 1), device=x.device).mul(2).sub(1)
        cand = torch.where(in_rows & in_cols, project(xs + eps * signs, xs, eps), best)
        mc = margin(model(cand), ys)
        ok = (mc < m) & (m > 0)
        best, m = torch.where(ok.view(-1, 1, 1, 1), cand, best), torch.where(ok, mc, m)
    out[sel] = best
    x_adv[idx] = out
    return x_adv


def linf_projection(p, w, c):
    """FAB's projection: per row, the smallest L-inf step d with w.(p + d) = c and p + d in [0, 1] (p, w [N, D],
    c [N]). Where the box makes the hyperplane unreachable, the step that gets closest (every coordinate to its bound).

    Each coordinate moves towards the side that closes the gap r = c - w.p, by min(delta, room_i), room_i its space
    in the box that way; the change g(delta) = sum_i |w_i| min(delta, room_i) is piecewise linear in delta with
    breaks at the sorted rooms, so the delta with g(delta) = |r| is found on the first piece that reaches |r|.
    """
    r = c - (w * p).sum(1)
    s = torch.sign(w) * torch.sign(r)[:, None]
    room = torch.where(s > 0, 1 - p, p)
    room_sorted, order = room.sort(1)
    a = w.abs().gather(1, order)
    below = (a * room_sorted).cumsum(1) - a * room_sorted  # sum of |w_i| room_i over the smaller rooms
    above = a.flip(1).cumsum(1).flip(1)  # sum of |w_i| over this room and the larger ones
    k = ((below + room_sorted * above) < r.abs()[:, None]).sum(1, keepdim=True)  # g at each break: the first >= |r|
    reachable = k[:, 0] < p.shape[1]
    k = k.clamp(max=p.shape[1] - 1)
    delta = (r.abs() - below.gather(1, k)[:, 0]) / above.gather(1, k)[:, 0].clamp(min=1e-12)
    delta = torch.where(reachable, delta, torch.full_like(delta, math.inf))
    return s * torch.min(delta[:, None], room)


def fab_t(model, x, y, eps, steps=100, n_targets=9, alpha_max=0.1, eta=1.05, beta=0.9):
    """Targeted FAB (Croce & Hein, ICML 2020), L-inf, as standard AutoAttack runs it: one run per target class (the
    2nd to (n_targets+1)-th highest clean logits) on the points still correct. A run steps onto the linearised
    boundary between the true class and the target, mixed with the projection of x itself onto it (weight at most
    alpha_max, both steps extrapolated by eta), and after each success moves back towards x by beta. It keeps the
    smallest misclassifying perturbation, returned where it is within eps; other points come back unchanged."""
    x = x.detach()
    clean = predict(model, x)
    x_adv, todo = x.clone(), clean.argmax(1) == y
    order = clean.argsort(1, descending=True)
    for k in range(1, min(n_targets, clean.shape[1] - 1) + 1):
        idx = todo.nonzero()[:, 0]
        if len(idx) == 0:
            break
        adv, dist = fab_run(model, x[idx], y[idx], order[idx, k], steps, alpha_max, eta, beta)
        ok = dist <= eps
        x_adv[idx[ok]] = project(adv[ok], x[idx[ok]], eps)
        todo[idx[ok]] = False
    return x_adv


def fab_run(model, x, y, target, steps, alpha_max, eta, beta):
    """One targeted FAB run: (the closest misclassified point found [B,...], its L-inf distance [B], inf if none)."""
    def boundary(z):  # the linearised boundary f_y - f_t = 0 at z, as w.x = c
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(z).float()
            f = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, target[:, None])[:, 0]
            (g,) = torch.autograd.grad(f.sum(), z)
        w = g.flatten(1)
        return w, (w * z.detach().flatten(1)).sum(1) - f.detach()

    n, view = len(x), (-1,) + (1,) * (x.dim() - 1)
    best, best_dist, x_k = x.clone(), torch.full((n,), math.inf, device=x.device), x.clone()
    for _ in range(steps):
        w, c = boundary(x_k)
        d = linf_projection(torch.cat([x_k.flatten(1), x.flatten(1)]), torch.cat([w, w]), torch.cat([c, c]))
        d_k, d_0 = d[:n].view_as(x), d[n:].view_as(x)
        a_k, a_0 = (t.flatten(1).abs().amax(1).clamp(min=1e-8) for t in (d_k, d_0))
        alpha = (a_k / (a_k + a_0)).clamp(max=alpha_max).view(view)
        x_k = ((1 - alpha) * (x_k + eta * d_k) + alpha * (x + eta * d_0)).clamp(0, 1)
        wrong = predict(model, x_k).argmax(1) != y
        dist = (x_k - x).flatten(1).abs().amax(1)
        better = wrong & (dist < best_dist)
        best, best_dist = torch.where(better.view(view), x_k, best), torch.where(better, dist, best_dist)
        x_k = torch.where(wrong.view(view), x + beta * (x_k - x), x_k)  # no host sync per step
    return best, best_dist


def sequential(model, x, y, attack_list):
    """Run attacks in turn, each on the points every earlier one failed on (AutoAttack's bookkeeping).

    A point stays classified correctly only if every attack failed on it; clean-wrong points come back unchanged.
    """
    x_adv = x.detach().clone()
    robust = predict(model, x).argmax(1) == y
    for attack in attack_list:
        idx = robust.nonzero()[:, 0]
        if len(idx) == 0:
            break
        adv = attack(model, x[idx], y[idx])
        fooled = predict(model, adv).argmax(1) != y[idx]
        x_adv[idx] = adv
        robust[idx[fooled]] = False
    return x_adv


def autoattack(model, x, y, eps, version="seed", steps=100, queries=5000):
    """AutoAttack (Croce & Hein, ICML 2020), L-inf.

    version "seed": APGD-CE then APGD-DLR, `steps` iterations each, one restart, as TeCoA, TGA-ZSR and SAFT run
    it (APGD-CE alone with fewer than 3 classes). "standard": APGD-CE, APGD-T and FAB-T (9 targets each), Square
    (5000 queries), Croce & Hein's standard version. "robustvlm": APGD-CE with 5 restarts, then APGD-T (9 targets),
    as RobustVLM's zero-shot evaluation runs AutoAttack's custom version.
    """
    n = num_classes(model, x)
    ce = lambda m, xx, yy: apgd_ce(m, xx, yy, eps, steps)  # noqa: E731
    if version == "seed":
        parts = [ce, lambda m, xx, yy: apgd_dlr(m, xx, yy, eps, steps)]
    elif version == "standard":
        parts = [ce, lambda m, xx, yy: apgd_t(m, xx, yy, eps, steps), lambda m, xx, yy: fab_t(m, xx, yy, eps, steps),
                 lambda m, xx, yy: square(m, xx, yy, eps, queries)]
    elif version == "robustvlm":
        parts = [lambda m, xx, yy: apgd_ce(m, xx, yy, eps, steps, restarts=5),
                 lambda m, xx, yy: apgd_t(m, xx, yy, eps, steps)]
    else:
        raise ValueError(f"unknown AutoAttack version '{version}' (known: seed, standard, robustvlm)")
    if n < 3:
        say_once(f"AutoAttack with {n} classes: no DLR attack (it needs 3 classes), APGD-CE" +
                 (", FAB-T and Square" if version == "standard" else " only"))
        parts = [parts[0]] + parts[2:]
    return sequential(model, x, y, parts)


# ----------------------------------------------------------------------------- transfer family (torchattacks 3.5.1)


def l1_mean_normalise(g):
    """g / mean(|g|) per example, as MI-FGSM does (a zero gradient stays zero rather than becoming NaN)."""
    return g / g.abs().mean(dim=tuple(range(1, g.dim())), keepdim=True).clamp(min=1e-12)


def input_diversity(x, resize_rate=0.9, prob=0.5):
    """DI's transform (Xie et al., CVPR 2019): with probability prob, resize the batch to r x r, r drawn from
    [resize_rate * W, W), and zero-pad back to W x W at a random offset; else x as is. Square images."""
    if torch.rand(()) >= prob:
        return x
    w = x.shape[-1]
    r = int(torch.randint(int(w * resize_rate), w, ()))
    top, left = int(torch.randint(0, w - r, ())), int(torch.randint(0, w - r, ()))
    small = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
    return F.pad(small, (left, w - r - left, top, w - r - top))


def gaussian_kernel(length=15, nsig=3.0):
    """[length, length] Gaussian sampled on [-nsig, nsig] along each axis, summing to 1 (TI-FGSM's kernel)."""
    g = torch.exp(-0.5 * torch.linspace(-nsig, nsig, length) ** 2)
    k = torch.outer(g, g)
    return k / k.sum()


def depthwise(g, kernel):
    """Convolve each channel of g with kernel [k, k] (or one kernel per channel [C, k, k]), 'same' size."""
    c, k = g.shape[1], kernel.shape[-1]
    weight = kernel.to(g).expand(c, k, k)[:, None].contiguous()
    return F.conv2d(g, weight, padding=k // 2, groups=c)


def momentum_fgsm(model, x, y, eps, alpha, steps, decay=0.0, diversity=0.0, kernel=None, nesterov=False,
                  targeted=False):
    """The iterative FGSM loop behind MI, DI, TI and NI, as torchattacks 3.5.1 writes it: no random start; the
    gradient (of the input-diversified image with diversity > 0, smoothed by `kernel` if given) is divided by its
    mean absolute value, added to decay * momentum, and its sign stepped by alpha. NI takes the gradient at the
    look-ahead x + decay * alpha * momentum, which (as there) is not clipped to the ball or to [0, 1]."""
    x = x.detach()
    x_adv, m = x.clone(), torch.zeros_like(x)
    f = model if diversity == 0 else (lambda z: model(input_diversity(z, prob=diversity)))
    sign = -1.0 if targeted else 1.0
    for _ in range(steps):
        g = input_grad(f, cross_entropy, x_adv + sign * decay * alpha * m if nesterov else x_adv, y)
        if kernel is not None:
            g = depthwise(g, kernel)
        m = l1_mean_normalise(g) + decay * m
        x_adv = project(x_adv + sign * alpha * m.sign(), x, eps)
    return x_adv.detach()


def mifgsm(model, x, y, eps, alpha, steps, decay=1.0, targeted=False):
    """MI-FGSM (Dong et al., CVPR 2018): momentum on the L1-mean-normalised gradient."""
    return momentum_fgsm(model, x, y, eps, alpha, steps, decay=decay, targeted=targeted)


def difgsm(model, x, y, eps, alpha, steps, decay=0.0, diversity=0.5, targeted=False):
    """DI2-FGSM (Xie et al., CVPR 2019): gradients through a random resize-and-pad (no momentum by default)."""
    return momentum_fgsm(model, x, y, eps, alpha, steps, decay=decay, diversity=diversity, targeted=targeted)


def tifgsm(model, x, y, eps, alpha, steps, decay=0.0, length=15, diversity=0.5, targeted=False):
    """TI-FGSM (Dong et al., CVPR 2019): the gradient smoothed by a 15x15 Gaussian; with DI, as torchattacks does."""
    return momentum_fgsm(model, x, y, eps, alpha, steps, decay=decay, diversity=diversity,
                         kernel=gaussian_kernel(length, 3.0), targeted=targeted)


def nifgsm(model, x, y, eps, alpha, steps, decay=1.0, targeted=False):
    """NI-FGSM (Lin et al., ICLR 2020): MI-FGSM with the gradient taken at the Nesterov look-ahead point."""
    return momentum_fgsm(model, x, y, eps, alpha, steps, decay=decay, nesterov=True, targeted=targeted)


def pifgsmpp_kernel():
    """PI-FGSM++'s smoothing kernel [3, 3, 3] exactly as torchattacks 3.5.1 builds it: its 3x3 Gaussian stack has
    the channel and width axes swapped, so channel c's filter is g[row] * g[c], flat along the width
    (g: the normalised N(0,1) density at -3, 0, 3). Needs 3 channels."""
    g = torch.exp(-0.5 * torch.tensor([-3.0, 0.0, 3.0]) ** 2)
    g = g / g.sum()
    return (g[:, None, None] * g[None, :, None]).expand(3, 3, 3)


def pifgsm(model, x, y, eps, steps=20, amplification=10.0, project_factor=1.0, smooth=None, accumulate_projection=True):
    """PI-FGSM (Gao et al., ECCV 2020): amplified steps beta = amplification * eps / steps, and the part of the
    accumulated noise that overflows the ball spread to the neighbouring pixels (3x3 projection kernel, step
    gamma = project_factor * beta). Untargeted; torchattacks' momentum and probability arguments are unused there."""
    beta = eps / steps * amplification  # in torchattacks' order: PI hits the ball's edge exactly, rounding matters
    gamma = project_factor * beta
    x = x.detach()
    spread = torch.full((3, 3), 1 / 8)
    spread[1, 1] = 0.0
    x_adv, acc = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        g = input_grad(model, cross_entropy, x_adv, y)
        if smooth is not None:
            g = depthwise(g, smooth)
        acc = acc + beta * g.sign()
        overflow = (acc.abs() - eps).clamp(min=0) * acc.sign()
        p = gamma * depthwise(overflow, spread).sign()
        if accumulate_projection:
            acc = acc + p
        x_adv = project(x_adv + beta * g.sign() + p, x, eps)
    return x_adv.detach()


def pifgsmpp(model, x, y, eps, steps=20):
    """PI-FGSM++ (Gao et al., 2020) as torchattacks 3.5.1's PIFGSMPP: PI-FGSM on a smoothed gradient, gamma = 0.8
    beta, and the projection term left out of the accumulated noise."""
    return pifgsm(model, x, y, eps, steps, project_factor=0.8, smooth=pifgsmpp_kernel(), accumulate_projection=False)
