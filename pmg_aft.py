"""PMG-AFT: pre-trained-model-guided adversarial fine-tuning of CLIP (Wang et al., CVPR 2024).

TeCoA's loss on PGD examples plus two KL terms: to the frozen pre-trained f0's prediction on x_adv, and to f's own on x:
    L = CE(z_adv, y) + alpha * KL(softmax(z0_adv) || softmax(z_adv)) + beta * KL(softmax(z_clean) || softmax(z_adv)),
z_adv = s*cos(f(x_adv), T), z0_adv = s*cos(f0(x_adv), T) (no grad), z_clean = s*cos(f(x), T); x_adv = PGD on the CE.

    python pmg_aft.py --toy                                 # offline toy world on a CPU, a few minutes
    python pmg_aft.py --data-root /data                     # the paper: ViT-B/32, TinyImageNet, eps 1/255, 10 epochs
    torchrun --standalone --nproc_per_node 8 pmg_aft.py --data-root /data
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

# The paper's main setting: the default of every flag (`python pmg_aft.py --help` prints them all), with its source.
# Optimizer SGD, momentum 0.9, weight decay 0 (official code); lr: linear warm-up, then cosine decay to 0 at the
# last step (official code). No data augmentation.
PAPER = dict(
    model="ViT-B/32",          # official code
    train_set="tinyimagenet",  # official README command
    prompts="tga",             # class names and prompt templates of the training and evaluation sets: official code
                               # (TeCoA's dataset files)
    batch_size=256,            # official code
    lr=5e-5,                   # official code, PMG-AFT's own setting (the AGFT paper found 1e-5 better on ImageNet)
    epochs=10,                 # official code
    warmup_steps=1000,         # official code
    eps=1 / 255,               # official README command
    step_size=1 / 255,         # official README command (step = eps)
    attack_steps=2,            # official README command
    alpha=1.0,                 # weight of L_general: official code (fixed at 1 there)
    beta=1.0,                  # weight of L_clean: official code (fixed at 1 there)
)
TOY = dict(lr=5e-5, max_steps=200)  # --toy: these and harness.TOY_WORLD (the KL weights need no resolution factor)
SCALE = 100.0  # CLIP's logit scale exp(logit_scale), fixed
# Official code differs: raw cosine logits (scale 1) in the CE, both KLs and the attack, ImageNet mean/std, KL summed
# over the batch; we keep the paper's structure at CLIP's scale, KL averaged per sample, as AGFT's reproduction does.


# ----------------------------------------------------------------------------- the method


def add_method_args(p):
    p.add_argument("--alpha", type=harness.NON_NEGATIVE, help="weight of L_general, KL to the frozen model on x_adv")
    p.add_argument("--beta", type=harness.NON_NEGATIVE, help="weight of L_clean, KL to the model's own clean output")


def setup_method(model, train_set, encoder, args, run):
    """What the loss needs besides the batch: the text features T (encoded once) and a frozen copy f0 of the encoder.

    main() calls this before resuming a checkpoint, so f0 is the pre-trained encoder on a resumed run too.
    """
    f0 = copy.deepcopy(encoder).eval().requires_grad_(False)
    return SimpleNamespace(text=evaluate.text_head(model, train_set, args.train_set).to(run.device), f0=f0)


def training_targets(x, y, fixed, args):
    """What the attack and the loss aim at (computed once per batch, no grad): PMG-AFT uses the hard labels y."""
    return y


def train_attack(f, x, targets, fixed, args):
    """PGD on L_robust, the fine-tuned model's CE: L-inf, random start, sign steps, input gradient only."""
    y = targets
    return attacks.pgd(clip.ZeroShotClassifier(f, fixed.text, SCALE), x, y, args.eps, args.step_size, args.attack_steps)


def kl(target_logits, logits):
    """KL(softmax(target) || softmax(logits)) per sample, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits, 1), F.log_softmax(target_logits, 1), reduction="batchmean", log_target=True)


def loss_fn(f, x, x_adv, targets, fixed, args):
    """PMG-AFT's loss L_robust + alpha * L_general + beta * L_clean. Returns the loss and its terms.

    Passes besides the attack: f on [x_adv; x] in one forward (2 of the AGFT paper's Table 10 forwards, both
    backpropagated), f0 on x_adv without grad: 3 forwards, 2 backwards, as Table 10. The clean target is not detached
    (as in the official code and the AGFT paper's reproduction). One forward of f on both halves equals two for a
    ViT; a ResNet's BatchNorm in train mode pools their statistics.
    """
    y = targets
    z_adv, z_clean = clip.cosine_logits(f(torch.cat([x_adv, x])), fixed.text, SCALE).chunk(2)
    with torch.no_grad():
        z0_adv = clip.cosine_logits(fixed.f0(x_adv), fixed.text, SCALE)
    robust = F.cross_entropy(z_adv, y)  # L_robust: TeCoA's CE on the adversarial examples
    general = kl(z0_adv, z_adv)  # L_general: the pre-trained model's prediction on the same x_adv as target
    clean = kl(z_clean, z_adv)  # L_clean: the fine-tuned model's own clean prediction as target
    loss = robust + args.alpha * general + args.beta * clean
    return loss, {"ce": robust.detach(), "kl_general": general.detach(), "kl_clean": clean.detach()}


# ----------------------------------------------------------------------------- the shared skeleton


def get_args(argv=None):
    p = harness.training_parser(__doc__)
    add_method_args(p)
    return harness.parse_args(p, argv, "pmg_aft", PAPER, TOY)


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
