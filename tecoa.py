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
import harness

# The paper's main setting: the default of every flag (`python tecoa.py --help` prints them all), with its source.
# Optimizer SGD, momentum 0.9, weight decay 0 (official code); lr: linear warm-up, then cosine decay to 0 at the
# last step (official code). No data augmentation.
PAPER = dict(
    model="ViT-B/32",       # official code
    train_set="imagenet",   # ImageNet-1k: official README command
    prompts="tga",          # class names and prompt templates of the training and evaluation sets: official code
    batch_size=256,         # official README command (2 GPUs x 128)
    lr=1e-5,                # the follow-up papers' TeCoA runs; the official code's default 1e-7 is not the paper's
    epochs=10,              # official code
    warmup_steps=1000,      # official code
    eps=1 / 255,            # paper; official README command (the code's default 2/255 is not the paper's)
    step_size=1 / 255,      # official README command (step = eps)
    attack_steps=2,         # official README command (the code's default 5 is not the paper's)
    loss="ce",              # paper (--loss clip: the TGA-ZSR tables' FT-Clean and FT-Adv. rows)
)
TOY = dict(lr=5e-5, max_steps=200)  # --toy: these and the toy world's preset (harness.TOY_WORLD)
SCALE = 100.0  # CLIP's logit scale exp(logit_scale), fixed


# ----------------------------------------------------------------------------- the method


def add_method_args(p):
    p.add_argument("--loss", choices=["ce", "clip"], help="ce: TeCoA's; clip: CLIP's own contrastive loss over the "
                   "batch's class texts, the loss of the TGA-ZSR tables' FT-Clean (with --eps 0) and FT-Adv. rows")


def setup_method(model, train_set, encoder, args, run):
    """What the loss needs besides the batch: the text features T of the training classes, encoded once."""
    return SimpleNamespace(text=evaluate.text_head(model, train_set, args.train_set).to(run.device))


def training_targets(x, y, fixed, args):
    """What the attack and the loss aim at (computed once per batch, no grad): TeCoA uses the hard labels y."""
    return y


def train_attack(f, x, targets, fixed, args):
    """PGD on the training loss: L-inf, random start, sign steps, input gradient only."""
    y = targets
    return attacks.pgd(clip.ZeroShotClassifier(f, fixed.text, SCALE), x, y, args.eps, args.step_size, args.attack_steps)


def loss_fn(f, x, x_adv, targets, fixed, args):
    """TeCoA's loss (AGFT paper Eq. 4-5): CE(s * cos(f(x_adv), T), y). Returns the loss and its terms.

    --loss clip: CLIP's symmetric contrastive loss instead, over the B x B logits s * cos(f(x_adv)_i, T[y_j]) (image
    i against the class text of image j; as the TGA-ZSR authors' FT.py, a class twice in the batch is its own
    negative; under torchrun, over each process's share of the batch): (CE over texts + CE over images) / 2.
    """
    y = targets
    if args.loss == "clip":
        z, i = clip.cosine_logits(f(x_adv), fixed.text[y], SCALE), torch.arange(len(y), device=y.device)
        loss = (F.cross_entropy(z, i) + F.cross_entropy(z.t(), i)) / 2
        return loss, {"clip": loss.detach()}
    loss = F.cross_entropy(clip.cosine_logits(f(x_adv), fixed.text, SCALE), y)
    return loss, {"ce": loss.detach()}


# ----------------------------------------------------------------------------- the shared skeleton


def get_args(argv=None):
    p = harness.training_parser(__doc__)
    add_method_args(p)
    return harness.parse_args(p, argv, "tecoa", PAPER, TOY)


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
