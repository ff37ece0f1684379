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
import harness

# The paper's main setting: the default of every flag (`python agft.py --help` prints them all), with its source.
# Optimizer SGD, momentum 0.9 (paper Sec. 4.1), weight decay 0 (official code); lr: linear warm-up,
# then cosine decay to 0 at the last step (cosine: paper; warm-up: official code). No data augmentation.
PAPER = dict(
    model="ViT-B/32",       # paper Sec. 4.1
    train_set="imagenet",   # ImageNet-1k: paper Sec. 4.1
    prompts="agft",         # class names and prompt templates of the training and evaluation sets: official code
    batch_size=256,         # paper Sec. 4.1
    lr=4e-4,                # paper Sec. 4.1
    epochs=10,              # paper Sec. 4.1
    warmup_steps=1000,      # official code
    eps=1 / 255,            # paper Sec. 4.1
    step_size=1 / 255,      # paper Sec. 4.1 (step = eps)
    attack_steps=2,         # paper Sec. 4.1
    gamma=0.4,              # temperature-scaling ratio: paper Sec. 4.1 (official code's default: 1)
    inv_tau=180.0,          # training logit scale 1/tau: paper Sec. 4.1 (official code's default: 100)
)
TOY = dict(lr=2e-4, max_steps=200)  # --toy: these and the toy world's preset (harness.TOY_WORLD)


# ----------------------------------------------------------------------------- the method


def add_method_args(p):
    p.add_argument("--gamma", type=harness.UNIT_INTERVAL, help="temperature-scaling ratio (Eq. 8)")
    p.add_argument("--inv-tau", type=harness.POSITIVE_REAL, help="training logit scale 1/tau (Eq. 8-9)")


def setup_method(model, train_set, encoder, args, run):
    """What the loss needs besides the batch: the text features T (encoded once) and a frozen copy f0 of the encoder.

    main() calls this before resuming a checkpoint, so f0 is the pre-trained encoder on a resumed run too.
    """
    f0 = copy.deepcopy(encoder).eval().requires_grad_(False)
    return SimpleNamespace(text=evaluate.text_head(model, train_set, args.train_set).to(run.device), f0=f0)


def training_targets(x, y, fixed, args):
    """The calibrated soft target (Eq. 6 with Eq. 8's temperature tau/gamma), from f0 on the clean x, no grad:
    p = softmax(gamma * inv_tau * cos(f0(x), T)), [B, C]. Both the attack and the loss take it as their labels."""
    return F.softmax(clip.cosine_logits(fixed.f0(x), fixed.text, args.gamma * args.inv_tau), dim=1)


def train_attack(f, x, targets, fixed, args):
    """PGD maximising the soft-label CE at the training scale inv_tau (Eq. 10's inner max; the official code does the
    same): L-inf, random start, sign steps, input gradient only."""
    p = targets
    return attacks.pgd(clip.ZeroShotClassifier(f, fixed.text, args.inv_tau), x, p, args.eps, args.step_size,
                       args.attack_steps)


def loss_fn(f, x, x_adv, targets, fixed, args):
    """AGFT's loss (Eq. 9): CE(inv_tau * cos(f(x_adv), T), p), summed over classes, averaged over the batch. Eq. 9
    writes an expectation E_{i,j} over images and classes, a mean over the C classes too; the official code sums over
    them, as here: C times the paper's value and gradient (1000 on ImageNet), the same under SGD as C times its lr.

    Passes besides the attack: f0 on x (in training_targets, no grad) and f on x_adv forward and backward:
    2 forwards, 1 backward, as the paper's Table 10.
    """
    p = targets
    loss = F.cross_entropy(clip.cosine_logits(f(x_adv), fixed.text, args.inv_tau), p)
    return loss, {"ce": loss.detach()}


# ----------------------------------------------------------------------------- the shared skeleton


def get_args(argv=None):
    p = harness.training_parser(__doc__)
    add_method_args(p)
    return harness.parse_args(p, argv, "agft", PAPER, TOY)


def main(argv=None):
    args = get_args(argv)
    data.check_datasets(args.eval_sets.split(","), args.data_root, args.train_set)  # fail now, not after training
    run = harness.setup(args)  # processes, device, precision; the output folder, accepted and locked
    model = harness.load_model(args.model, run)
    encoder = clip.ImageEncoder(model.visual).to(run.device)  # f: [0,1] pixels -> features; the only trained part
    train_set = data.load_dataset(args.train_set, args.data_root, model.visual.input_resolution, train=True,
                                  prompts=args.prompts)
    fixed = setup_method(model, train_set, encoder, args, run)
    sampler = data.EpochSampler(len(train_set), args.batch_size, run.rank, run.world, args.seed)
    loader = data.make_loader(train_set, args.batch_size // run.world, sampler, args.workers, run.device.type == "cuda")
    total = args.max_steps or args.epochs * sampler.steps_per_epoch
    opt = harness.make_optimizer(encoder.parameters(), args)  # the paper's: PAPER's optimizer, lr, weight decay
    scaler = torch.amp.GradScaler(enabled=run.dtype == torch.float16)  # loss scaling for fp16 only
    ckpt = harness.Checkpoint(args, run, model, opt, scaler)
    step = ckpt.resume(total)  # 0 for a new run, else the checkpoint's step, its weights restored
    f = torch.compile(encoder) if args.compile else encoder
    f_train = harness.ddp(f, run)  # the loss goes through DDP (wrapping the compiled f) under torchrun; the attack f
    log = harness.TrainLog(args, run, model, train_set, total, step, encoder, ckpt.curves, evaluate.held_out_probe)
    while step < total:
        sampler.set_position(step)  # the data order is a function of the seed and the step: a resumed run replays it
        for x, y in loader:
            torch.manual_seed(args.seed + step * run.world + run.rank)  # per-step seed: the same attacks on resume
            lr = harness.set_lr(opt, step, total, args)
            x, y = data.to_device(x, run.device, train_set.resize_to), y.to(run.device, non_blocking=True)

            # the method's step: 1 targets, 2 attack, 3 loss, 4 backward, 5 SGD step
            encoder.eval()  # the attack sees the model in eval mode and differentiates w.r.t. the input only
            with torch.no_grad(), run.autocast():
                targets = training_targets(x, y, fixed, args)  # 1
            with run.attack_autocast(), harness.input_grad_only(encoder):  # no parameter gradient, compiled or not
                x_adv = train_attack(f, x, targets, fixed, args)  # 2
            encoder.train()
            with run.autocast():
                loss, terms = loss_fn(f_train, x, x_adv, targets, fixed, args)  # 3
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # 4 (the scaler scales the loss for fp16 only)
            scaler.step(opt)  # 5
            scaler.update()

            step += 1
            log.step(step, loss, terms, lr)  # the loss stays on the device; a NaN/inf stops the run at the next log
            if step % args.save_every == 0 or step == total:
                ckpt.save(step, log)  # refuses a NaN/inf loss since the last log step, and weights giving NaN/inf features
            if step == total:
                break
    log.close()
    evaluate.final_evaluation(encoder, model, args, run)  # PGD-20 on --eval-sets, before (--eval-baseline) and after


if __name__ == "__main__":
    harness.cli(main)
