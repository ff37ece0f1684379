"""AGFT: alignment-guided adversarial fine-tuning of CLIP (Cui et al., CVPR 2026).

TeCoA's hard labels are replaced by the frozen pre-trained encoder f0's zero-shot distribution on the clean image,
softened by the temperature ratio gamma <= 1 (Eq. 6, 8): p = softmax(gamma/tau * cos(f0(x), T)). The image encoder f
is trained on PGD examples with the soft-label cross-entropy at the training scale 1/tau (Eq. 9-10):
min_f E CE(cos(f(x_adv), T) / tau, p),  x_adv = PGD on the same loss. Evaluation uses CLIP's own scale s = 100.

    python agft.py --toy                                    # offline toy world on a CPU, a few minutes
    python agft.py --data-root /data                        # the paper: ViT-B/32, ImageNet-1k, eps 1/255, 10 epochs
    python agft.py --data-root /data --gamma 0.4 --inv-tau 180   # the same: the paper's gamma, 1/tau are the defaults
    torchrun --standalone --nproc_per_node 8 agft.py --data-root /data
"""
import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import attacks
import clip
import data
import evaluate

PAPER = dict(train_set="imagenet", batch_size=256, lr=4e-4, prompts="agft")  # SPEC 2 (AGFT paper, Implementation Details)
TOY = dict(lr=1e-3, max_steps=300)


# ----------------------------------------------------------------------------- the method


def add_method_args(p):
    p.add_argument("--gamma", type=float, default=0.4, help="temperature-scaling ratio in (0, 1] (Eq. 8)")
    p.add_argument("--inv-tau", type=float, default=180.0, help="training logit scale 1/tau (Eq. 8-9)")
    # the official code's argparse defaults are 1/tau 100, gamma 1; its README command passes the paper's 180, 0.4


def setup_method(model, train_set, encoder, args, run):
    """What the loss needs besides the batch: the text features T (encoded once) and a frozen copy f0 of the encoder.

    main() calls this before resuming a checkpoint, so f0 is the pre-trained encoder on a resumed run too.
    """
    f0 = copy.deepcopy(encoder).eval().requires_grad_(False)
    return SimpleNamespace(text=evaluate.text_head(model, train_set).to(run.device), f0=f0)


def targets(x, y, m, args):
    """The calibrated soft target (Eq. 6 with Eq. 8's temperature tau/gamma), from f0 on the clean x, no grad:
    p = softmax(gamma * inv_tau * cos(f0(x), T)), [B, C]. Both the attack and the loss take it as their labels."""
    return F.softmax(clip.cosine_logits(m.f0(x), m.text, args.gamma * args.inv_tau), dim=1)


def train_attack(f, x, y, m, args):
    """PGD maximising the soft-label CE at the training scale inv_tau (Eq. 10's inner max; the official code does the
    same): L-inf, random start, sign steps, input gradient only (SPEC 1.5)."""
    model = clip.ZeroShotClassifier(f, m.text, args.inv_tau)
    return attacks.pgd(model, x, y, args.eps, args.step_size, args.attack_steps)


def loss_fn(f, x, x_adv, y, m, args):
    """AGFT's loss (Eq. 9): CE(inv_tau * cos(f(x_adv), T), p), summed over classes, averaged over the batch.

    Passes besides the attack: f0 on x (in targets, no grad) and f on x_adv forward and backward: 2 forwards,
    1 backward, as the paper's Table 10.
    """
    loss = F.cross_entropy(clip.cosine_logits(f(x_adv), m.text, args.inv_tau), y)
    return loss, {"ce": loss.detach()}


# ----------------------------------------------------------------------------- the shared skeleton


def get_args(argv=None):
    p = evaluate.training_parser(__doc__)
    add_method_args(p)
    return evaluate.finish_args(p.parse_args(argv), "agft", PAPER, TOY)


def main(argv=None):
    args = get_args(argv)
    run = evaluate.setup(args)
    evaluate.check_datasets(args.eval_sets.split(","), args.data_root, args.train_set)  # fail now, not after training
    model = clip.load(args.model, device=run.device)
    encoder = clip.ImageEncoder(model.visual).to(run.device)  # f: [0,1] pixels -> features; the only trained part
    train_set = data.load_dataset(args.train_set, args.data_root, model.visual.input_resolution, train=True,
                                  prompts=args.prompts)
    m = setup_method(model, train_set, encoder, args, run)
    sampler = data.EpochSampler(len(train_set), args.batch_size, run.rank, run.world, args.seed)
    loader = data.make_loader(train_set, args.batch_size // run.world, sampler, args.workers, run.device.type == "cuda")
    total = args.max_steps or args.epochs * sampler.steps_per_epoch
    opt = torch.optim.SGD(encoder.parameters(), lr=args.lr, momentum=0.9, weight_decay=0)  # SPEC 1.6
    scaler = torch.amp.GradScaler(enabled=run.dtype == torch.float16)  # loss scaling for fp16 only
    ckpt = evaluate.Checkpoint(args, run, model, opt, scaler)
    step = ckpt.resume()  # 0 for a new run
    f = torch.compile(encoder) if args.compile else encoder
    f_train = run.ddp(f)  # the loss goes through DDP under torchrun; the attack uses f directly
    log = evaluate.TrainLog(args, run, train_set, total, step, encoder)
    while step < total:
        sampler.set_position(step)
        for x, y in loader:
            torch.manual_seed(args.seed + step * run.world + run.rank)  # per-step seed: a resumed run replays the same attacks
            lr = evaluate.set_lr(opt, step, total, args)
            x, y = data.to_device(x, run.device, train_set.resize_to), y.to(run.device)
            encoder.eval()  # the attack sees the model in eval mode and differentiates w.r.t. the input only
            with torch.no_grad(), run.autocast():
                y = targets(x, y, m, args)
            with run.attack_autocast():
                x_adv = train_attack(f, x, y, m, args)
            encoder.train()
            with run.autocast():
                loss, terms = loss_fn(f_train, x, x_adv, y, m, args)
            log.check_finite(step, loss, terms)  # NaN/inf: stop here, naming the step and the terms
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            log.step(step, loss, terms, lr)
            if step % args.save_every == 0 or step == total:
                ckpt.save(step)
            if step == total:
                break
    log.close()
    evaluate.final_evaluation(encoder, args, run)


if __name__ == "__main__":
    evaluate.cli(main)
