"""TGA-ZSR: text-guided attention for zero-shot robustness (Yu, Zhang, Xu, NeurIPS 2024).

TeCoA's cross-entropy plus two distances between text-guided attention maps A (see attention_map() below: where the
ground-truth class text finds its class among the ViT's patch tokens), anchored to the frozen pre-trained f0:
    L = CE(s * cos(f(x_adv), T), y) + alpha * ||A_f(x_adv) - A_f0(x)||_2 + beta * ||A_f(x) - A_f0(x)||_2
(refinement: adversarial; constraint: clean), x_adv = PGD on the CE term only. Equation numbers are those of the
journal version that restates TGA-ZSR (the Comp-TGA paper). ViT backbones only.

    python tga_zsr.py --toy                                 # offline toy world on a CPU, a few minutes
    python tga_zsr.py --data-root /data                     # the paper: ViT-B/32, TinyImageNet, eps 1/255, 10 epochs
    torchrun --standalone --nproc_per_node 8 tga_zsr.py --data-root /data
"""
import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import attacks
import attention
import clip
import data
import evaluate
import harness

# The paper's main setting: the default of every flag (`python tga_zsr.py --help` prints them all), with its source.
# Optimizer SGD, momentum 0.9, weight decay 0 (paper Sec. IV-A); lr: linear warm-up, then cosine decay to 0 at the
# last step (official code). No data augmentation.
PAPER = dict(
    model="ViT-B/32",          # paper Sec. IV-A
    train_set="tinyimagenet",  # paper Sec. IV-A
    prompts="tga",             # class names and prompt templates of the training and evaluation sets: official code
                               # (TeCoA's dataset files)
    batch_size=128,            # paper Sec. IV-A
    lr=1e-4,                   # paper Sec. IV-A
    epochs=10,                 # official code
    warmup_steps=1000,         # official code
    eps=1 / 255,               # paper Sec. IV-A
    step_size=1 / 255,         # paper Sec. IV-A (step = eps)
    attack_steps=2,            # paper Sec. IV-A
    alpha=0.08,                # attention refinement weight: paper Sec. IV-A (0.08 for AutoAttack too)
    beta=0.05,                 # attention constraint weight: paper Sec. IV-A (0.009 in its AutoAttack runs)
)
TOY = dict(lr=1e-4, max_steps=200, alpha=0.56, beta=0.35, save_attention=8)  # --toy: these and harness.TOY_WORLD
# alpha, beta: the paper's 0.08, 0.05 times 7. The map distance is an unsquared L2 norm over the H x W upsampled
# map, so the same per-pixel disagreement weighs 224/32 = 7 times less at the toy's 32 px than at 224 px.
SCALE = 100.0  # CLIP's logit scale exp(logit_scale), fixed


# ----------------------------------------------------------------------------- the method


def add_method_args(p):
    p.add_argument("--alpha", type=harness.NON_NEGATIVE, help="weight of the attention refinement term (adversarial)")
    p.add_argument("--beta", type=harness.NON_NEGATIVE, help="weight of the attention constraint term (clean)")
    p.add_argument("--save-attention", type=harness.COUNT, default=0, metavar="N", help="at the end, write "
                   "attention.png: the text-guided maps of the pre-trained and fine-tuned encoders on N clean and "
                   "adversarial images (0: off)")


def setup_method(model, train_set, encoder, args, run):
    """The text features T of the training classes, encoded once, and the frozen pre-trained encoder f0."""
    harness.require_vit(args.model, args.method, model.visual)  # a file only the built model tells
    f0 = copy.deepcopy(encoder).eval().requires_grad_(False)
    return SimpleNamespace(text=evaluate.text_head(model, train_set, args.train_set).to(run.device), f0=f0)


def training_targets(x, y, fixed, args):
    """The hard labels y, and the target of both attention terms: A_f0(x), frozen encoder, clean image (no grad)."""
    return y, attention_map(fixed.f0(x, all_tokens=True), y, x, fixed)


def attention_map(tokens, y, x, fixed):
    """A(x, t_y) (Eq. 6), [B, H, W] in [0, 1]: the map of each sample's ground-truth class text t_y (a row of T) over
    one forward's tokens, upsampled to x's size (attention.text_guided says how it is computed)."""
    return attention.text_guided(tokens, fixed.text[y], x.shape[-2:])


def train_attack(f, x, targets, fixed, args):
    """PGD on the CE term only: L-inf, random start, sign steps, input gradient only."""
    y, _ = targets
    # the official attack also leaks its CE gradients into the parameters' .grad; ours takes input gradients only
    return attacks.pgd(clip.ZeroShotClassifier(f, fixed.text, SCALE), x, y, args.eps, args.step_size, args.attack_steps)


def loss_fn(f, x, x_adv, targets, fixed, args):
    """TGA-ZSR's loss (Eq. 15): CE (Eq. 1) + alpha * refinement (Eq. 9-10) + beta * constraint (Eq. 12-13).

    With training_targets' f0(x): 3 forward passes (f0 no grad) and 2 backward per step, as the AGFT paper's
    Table 10 counts."""
    y, a0 = targets
    tokens = f(x_adv, all_tokens=True)  # one forward: the CLS token gives the logits, the patch tokens the map
    ce = F.cross_entropy(clip.cosine_logits(tokens[:, 0], fixed.text, SCALE), y)
    refine = attention.map_distance(attention_map(tokens, y, x, fixed), a0)
    constrain = attention.map_distance(attention_map(f(x, all_tokens=True), y, x, fixed), a0)
    loss = ce + args.alpha * refine + args.beta * constrain
    return loss, {"ce": ce.detach(), "refine": refine.detach(), "constrain": constrain.detach()}


# ----------------------------------------------------------------------------- the shared skeleton


def get_args(argv=None):
    p = harness.training_parser(__doc__)
    add_method_args(p)
    args = harness.parse_args(p, argv, "tga_zsr", PAPER, TOY)
    harness.require_vit(args.model, args.method)  # a ResNet is refused before any download, data scan or pre-training
    return args


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
