"""L-infinity attacks on a zero-shot classifier in [0,1] pixel space.

Every attack takes `model` (a callable mapping [0,1] images to logits), images x, labels y (class indices, or
class probabilities where stated), eps, and returns x_adv with ||x_adv - x||_inf <= eps and x_adv in [0,1].
Gradients are taken with respect to the input only: no parameter gradient is computed or accumulated, and the
model's train/eval mode is left to the caller (attack in eval mode).
"""
import torch
import torch.nn.functional as F


def cross_entropy(logits, y):
    """Cross-entropy summed over the batch; y holds class indices [B] or soft labels [B, C] (e.g. AGFT's target)."""
    return F.cross_entropy(logits.float(), y, reduction="sum")


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


def pgd(model, x, y, eps, alpha, steps, loss_fn=cross_entropy, targeted=False, rand_init=True):
    """Projected gradient descent (Madry et al., 2018): sign-gradient steps of size alpha, last iterate returned.

    Untargeted ascends loss_fn(model(x_adv), y); targeted (y = target classes) descends it.
    """
    x = x.detach()
    x_adv = random_start(x, eps) if rand_init else x.clone()
    sign = -1.0 if targeted else 1.0
    for _ in range(steps):
        grad = input_grad(model, loss_fn, x_adv, y)
        x_adv = project(x_adv + sign * alpha * grad.sign(), x, eps)
    return x_adv.detach()
