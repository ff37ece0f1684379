"""TeCoA: text-guided contrastive adversarial fine-tuning of CLIP (Mao et al., ICLR 2023).

The image encoder f is trained on PGD examples with the cross-entropy of CLIP's zero-shot logits over the
training classes' fixed text features T:  min_f E CE(s * cos(f(x_adv), T), y),  x_adv = PGD on the same loss.

    python tecoa.py --toy                                   # offline toy world on a CPU, a few minutes
    python tecoa.py --data-root /data                       # the paper: ViT-B/32, ImageNet-1k, eps 1/255, 10 epochs
    torchrun --standalone --nproc_per_node 8 tecoa.py --data-root /data
"""
import os
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import attacks
import clip
import data
import evaluate

PAPER = dict(train_set="imagenet", batch_size=256, lr=1e-5)  # SPEC 2 (the official code's lr 1e-7, eps 2/255 are not the paper's)
TOY = dict(lr=1e-4, max_steps=300)
SCALE = 100.0  # CLIP's logit scale exp(logit_scale), fixed


# ----------------------------------------------------------------------------- the method


def add_method_args(p):
    pass  # TeCoA has no hyper-parameters of its own


def setup_method(model, train_set, encoder, args, run):
    """What the loss needs besides the batch: the text features T of the training classes, encoded once."""
    return SimpleNamespace(text=evaluate.text_head(model, train_set).to(run.device))


def train_attack(f, x, y, m, args):
    """PGD on the training loss (SPEC 1.5): L-inf, random start, sign steps, input gradient only."""
    return attacks.pgd(clip.ZeroShotClassifier(f, m.text, SCALE), x, y, args.eps, args.step_size, args.attack_steps)


def loss_fn(f, x, x_adv, y, m, args):
    """TeCoA's loss (AGFT paper Eq. 4-5): CE(s * cos(f(x_adv), T), y). Returns the loss and its terms."""
    loss = F.cross_entropy(clip.cosine_logits(f(x_adv), m.text, SCALE), y)
    return loss, {"ce": loss.detach()}


# ----------------------------------------------------------------------------- the shared skeleton


def get_args(argv=None):
    p = evaluate.training_parser(__doc__)
    add_method_args(p)
    return evaluate.finish_args(p.parse_args(argv), "tecoa", PAPER, TOY)


def main(argv=None):
    args = get_args(argv)
    run = evaluate.setup(args)
    model = clip.load(args.model, device=run.device)
    encoder = clip.ImageEncoder(model.visual).to(run.device)  # f: [0,1] pixels -> features; the only trained part
    train_set = data.load_dataset(args.train_set, args.data_root, model.visual.input_resolution, train=True)
    m = setup_method(model, train_set, encoder, args, run)
    sampler = data.EpochSampler(len(train_set), args.batch_size, run.rank, run.world, args.seed)
    if sampler.steps_per_epoch == 0:
        raise evaluate.UsageError(f"{args.train_set} has {len(train_set)} images, fewer than one batch of {args.batch_size}")
    loader = data.make_loader(train_set, args.batch_size // run.world, sampler, args.workers, run.device.type == "cuda")
    total = args.max_steps or args.epochs * sampler.steps_per_epoch
    opt = torch.optim.SGD(encoder.parameters(), lr=args.lr, momentum=0.9, weight_decay=0)  # SPEC 1.6
    scaler = torch.amp.GradScaler(enabled=run.dtype == torch.float16)
    ckpt_path, step = os.path.join(args.out_dir, "ckpt.pt"), 0
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise evaluate.UsageError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        ckpt = evaluate.load_visual(model, ckpt_path, args.model)
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        run.log(f"resuming from {ckpt_path} at step {step}")
    elif os.path.isfile(ckpt_path):
        raise evaluate.UsageError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out-dir")
    f = torch.compile(encoder) if args.compile else encoder
    f_train = DDP(f, device_ids=[run.device.index] if run.device.type == "cuda" else None) if run.world > 1 else f

    def save():
        if run.main:
            evaluate.save_checkpoint(ckpt_path, {"visual": model.visual.state_dict(), "optimizer": opt.state_dict(),
                                                 "scaler": scaler.state_dict(), "step": step, "model": args.model,
                                                 "method": args.method, "args": vars(args)})

    run.log(f"{args.method}: {args.model} on {args.train_set} ({len(train_set)} images, {len(train_set.classnames)} classes), "
            f"{total} steps of {args.batch_size}, eps {evaluate.fmt_eps(args.eps)}, {run.world} process(es) on {run.device}, {run.dtype}")
    t0, seen = time.time(), 0
    while step < total:
        sampler.set_position(step)
        for x, y in loader:
            torch.manual_seed(args.seed + step * run.world + run.rank)  # per-step seed: a resumed run replays the same attacks
            lr = evaluate.lr_at(step, total, args.warmup_steps, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = data.to_device(x, run.device), y.to(run.device)
            encoder.eval()  # attack in eval mode, input gradient only
            with run.attack_autocast():
                x_adv = train_attack(f, x, y, m, args)
            encoder.train()
            with run.autocast():
                loss, terms = loss_fn(f_train, x, x_adv, y, m, args)
            if not run.all_sum([float(torch.isfinite(loss))])[0] == run.world:
                raise evaluate.UsageError(f"loss is {loss.item()} at step {step} ({evaluate.fmt_terms(terms)}); stopped, "
                                          f"the last good checkpoint is kept in {args.out_dir}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step, seen = step + 1, seen + args.batch_size
            if step % args.log_every == 0 or step == total:
                rate = seen / (time.time() - t0)
                run.log(f"step {step}/{total} | loss {loss.item():.4f} ({evaluate.fmt_terms(terms)}) | lr {lr:.2e} | "
                        f"{rate:.1f} img/s | ETA {evaluate.fmt_time((total - step) * args.batch_size / rate)}")
            if step % args.save_every == 0 or step == total:
                save()
            if step == total:
                break
    evaluate.final_evaluation(encoder, args, run)


if __name__ == "__main__":
    evaluate.cli(main)
