"""TeCoA: text-guided contrastive adversarial fine-tuning of CLIP (Mao et al., ICLR 2023).

The image encoder f is trained on PGD examples with the cross-entropy of CLIP's zero-shot logits over the
training classes' fixed text features T:  min_f E CE(s * cos(f(x_adv), T), y),  x_adv = PGD on the same loss.

    python tecoa.py --toy                                   # offline toy world on a CPU, a few minutes
    python tecoa.py --data-root /data                       # the paper: ViT-B/32, ImageNet-1k, eps 1/255, 10 epochs
    torchrun --standalone --nproc_per_node 8 tecoa.py --data-root /data
"""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import attacks
import clip
import data
import evaluate

PAPER = dict(train_set="imagenet", batch_size=256, lr=1e-5, prompts="tga")  # SPEC 2 (the official code's lr 1e-7, eps 2/255 are not the paper's)
TOY = dict(lr=1e-3, max_steps=300)
SCALE = 100.0  # CLIP's logit scale exp(logit_scale), fixed


# ----------------------------------------------------------------------------- the method


def add_method_args(p):
    pass  # TeCoA has no hyper-parameters of its own


def setup_method(model, train_set, encoder, args, run):
    """What the loss needs besides the batch: the text features T of the training classes, encoded once."""
    return SimpleNamespace(text=evaluate.text_head(model, train_set).to(run.device))


def targets(x, y, m, args):
    """What the attack and the loss aim at (computed once per batch, no grad): TeCoA uses the hard labels."""
    return y


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
