"""Seven exercises: fill in each body, then run `python -m lab.grade` (all) or `python -m lab.grade pgd kl` (some)
from the repository root. The grader compares each function with the project's own on a tiny random CLIP and, when
they differ, says what differs.

What the arguments are, in every exercise:
  f, f0     image encoders: [0,1] images [B, 3, H, W] -> unnormalised features [B, D]; f is the encoder being
            fine-tuned, f0 = fixed.f0 the frozen pre-trained one. f(x, all_tokens=True) gives every output token.
  fixed     what a method computes once: fixed.text, the L2-normalised text features T [C, D] of the C classes;
            fixed.f0.
  args      the hyper-parameters: args.gamma, args.inv_tau (AGFT), args.alpha, args.beta (PMG-AFT).
  y         class indices [B].
clip.cosine_logits(features, T, scale) = scale * cos(features, T) [B, C] may be used everywhere.
"""
import torch
import torch.nn.functional as F

import clip


def pgd(model, x, y, eps, alpha, steps, rand_init=True):
    """Untargeted L-inf PGD (Madry et al., 2018). model maps [0,1] images to logits [B, C].

    Start from x, or with rand_init from x plus uniform noise in [-eps, eps] (clamped to [0, 1]). Then `steps`
    times: take the gradient of the cross-entropy of model(x_adv) against y with respect to x_adv only, step
    alpha * sign(gradient) uphill, and project back onto the eps-ball around x and into [0, 1]. Return the last
    x_adv, detached, the shape of x.
    """
    raise NotImplementedError


def tecoa_loss(f, x, x_adv, targets, fixed, args):
    """TeCoA's loss: CE(s * cos(f(x_adv), T), y) with CLIP's logit scale s = 100, averaged over the batch.
    targets are the hard labels y. Returns the loss (a scalar), or (loss, terms)."""
    raise NotImplementedError


def agft_targets(x, y, fixed, args):
    """AGFT's calibrated soft target (Eq. 6 with Eq. 8's temperature tau / gamma), from the frozen f0 on the clean x:
    p = softmax(gamma * inv_tau * cos(f0(x), T)) over the classes, [B, C]."""
    raise NotImplementedError


def agft_loss(f, x, x_adv, targets, fixed, args):
    """AGFT's loss (Eq. 9): the soft-label cross-entropy of inv_tau * cos(f(x_adv), T) against targets = p (from
    agft_targets): -sum_c p_c log q_c, summed over the classes, averaged over the batch. Returns the loss."""
    raise NotImplementedError


def kl(target_logits, logits):
    """KL(softmax(target_logits) || softmax(logits)), both [B, C]: summed over the classes per sample, averaged over
    the batch. A scalar."""
    raise NotImplementedError


def pmg_aft_loss(f, x, x_adv, targets, fixed, args):
    """PMG-AFT's loss L_robust + alpha * L_general + beta * L_clean, every logit z = 100 * cos(., T):
      L_robust  = CE(z(f(x_adv)), y), y = targets
      L_general = kl(z(f0(x_adv)), z(f(x_adv)))   the frozen f0 on the same x_adv is the target (f0 gets no gradient)
      L_clean   = kl(z(f(x)), z(f(x_adv)))        f's own clean prediction is the target (not detached)
    Returns the loss, or (loss, terms)."""
    raise NotImplementedError


def text_guided(tokens, text, size):
    """TGA-ZSR's text-guided attention map A(x, t), [B, H, W] in [0, 1], from one forward's output tokens
    [B, 1+P, D] (the CLS token first, then the P patch tokens of a sqrt(P) x sqrt(P) grid) and one text feature per
    image, text [B, D]:
      1. divide each feature channel by its L2 norm over the token axis (CLS included);
      2. score each of the P patch tokens by its dot product with the image's text feature;
      3. min-max normalise the P scores of each image (add 1e-8 to the denominator);
      4. reshape them row by row to the sqrt(P) x sqrt(P) grid;
      5. upsample bilinearly (align_corners=False) to size = (H, W).
    """
    raise NotImplementedError
