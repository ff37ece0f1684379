"""FARE: unsupervised adversarial fine-tuning of CLIP's image embedding (Schlarmann et al., ICML 2024).

No labels and no text: the image encoder f is trained so that its embedding of a PGD image stays at the frozen
pre-trained encoder f0's embedding of the clean image, min_f E ||f(x_adv) - f0(x)||_2^2 (unnormalised output
embeddings), x_adv = PGD maximising the same distance. The zero-shot heads of any text tower keep working because
f0's embedding space is kept; the training set's labels are read but never used.

    python fare.py --toy                                    # offline toy world on a CPU, a few minutes
    python fare.py --data-root /data                        # the authors' command, ViT-B/32, ImageNet-1k, eps 1/255
    python fare.py --data-root /data --eps 4/255            # FARE^4 (the authors' other ViT-B/32 release)
    python fare.py --data-root /data --model ViT-L/14 --eps 2/255   # the paper's main model, FARE^2
    torchrun --standalone --nproc_per_node 8 fare.py --data-root /data
"""
import copy
from types import SimpleNamespace

import torch

import attacks
import clip
import data
import evaluate
import harness

# The paper's main setting: the default of every flag (`python fare.py --help` prints them all), with its source.
# Optimizer AdamW with torch's default betas; lr: linear warm-up, then cosine decay to 0 at the last step (official
# README command: --opt adamw, 20,000 steps, warm-up 1400). No data augmentation. The paper's main models are
# ViT-L/14 at eps 2/255 and 4/255; the default here is its ViT-B/32 release at the seed papers' eps 1/255.
PAPER = dict(
    model="ViT-B/32",       # the authors' ViT-B/32 FARE^1 release (official README, "Additional Models")
    train_set="imagenet",   # ImageNet-1k: official README command
    prompts="tga",          # the evaluation's names and templates: those of the TGA-ZSR and SAFT tables (FARE a row)
    batch_size=128,         # official README command
    optimizer="adamw",      # official README command
    lr=1e-5,                # official README command
    weight_decay=1e-4,      # official README command
    epochs=2,               # two ImageNet epochs: what the official README command's 20,000 steps of 128 images are
    max_steps=20000,        # official README command
    warmup_steps=1400,      # official README command (the code's default 14000 is not the command's)
    eps=1 / 255,            # the FARE^1 release; the seed papers' threat model (the README command's 4 is FARE^4)
    step_size=1 / 255,      # official README command
    attack_steps=10,        # official README command
    attack_momentum=0.9,    # official code (train/pgd_train.py)
    clean_weight=0.0,       # official code's default, and the README command's
)
TOY = dict(lr=1e-4, max_steps=200)  # --toy: these and the toy world's preset (harness.TOY_WORLD)


# ----------------------------------------------------------------------------- the method


def add_method_args(p):
    p.add_argument("--attack-momentum", type=harness.Range(float, 0, 1), help="momentum of the training attack's "
                   "sign steps (attacks.pgd)")
    p.add_argument("--clean-weight", type=harness.Range(float, 0, 1), help="w in (1 - w) ||f(x_adv) - f0(x)||^2 + "
                   "w ||f(x) - f0(x)||^2 (the official code's clean_weight; FARE's loss is w = 0)")


def setup_method(model, train_set, encoder, args, run):
    """What the loss needs besides the batch: a frozen copy f0 of the encoder; no text.

    main() calls this before resuming a checkpoint, so f0 is the pre-trained encoder on a resumed run too.
    """
    return SimpleNamespace(f0=copy.deepcopy(encoder).eval().requires_grad_(False))


def training_targets(x, y, fixed, args):
    """What the attack and the loss aim at (computed once per batch, no grad): f0's embedding of the clean x, [B, D]
    (unnormalised, as the official FARE command's --output_normalize False). The labels y are not used."""
    return fixed.f0(x).float()


def squared_error(embedding, target):
    """||embedding - target||_2^2 per sample [B]: summed over the embedding dimension, not divided by it."""
    return (embedding.float() - target).pow(2).sum(1)


def train_attack(f, x, targets, fixed, args):
    """PGD maximising the loss itself, ||f(x + delta) - f0(x)||^2 (summed over the batch: each sample's gradient is
    its own): L-inf, random start, sign steps with momentum, input gradient only."""
    return attacks.pgd(f, x, targets, args.eps, args.step_size, args.attack_steps,
                       loss_fn=lambda out, target: squared_error(out, target).sum(), momentum=args.attack_momentum)


def loss_fn(f, x, x_adv, targets, fixed, args):
    """FARE's loss: mean over the batch of ||f(x_adv) - f0(x)||_2^2; with --clean-weight w > 0 it is
    (1 - w) times that plus w * ||f(x) - f0(x)||^2 (one more forward of f). Returns the loss and its terms."""
    adv = squared_error(f(x_adv), targets).mean()
    if not args.clean_weight:
        return adv, {"l2_adv": adv.detach()}
    w, clean = args.clean_weight, squared_error(f(x), targets).mean()
    return (1 - w) * adv + w * clean, {"l2_adv": adv.detach(), "l2_clean": clean.detach()}


# ----------------------------------------------------------------------------- the shared skeleton


def get_args(argv=None):
    p = harness.training_parser(__doc__)
    add_method_args(p)
    return harness.parse_args(p, argv, "fare", PAPER, TOY)


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
