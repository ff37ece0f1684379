"""TGA-ZSR: text-guided attention for zero-shot robustness (Yu, Zhang, Xu, NeurIPS 2024).

TeCoA's cross-entropy plus two distances between text-guided attention maps A (clip.text_guided_attention: where
the ground-truth class text finds its class among the ViT's patch tokens), anchored to the frozen pre-trained f0:
    L = CE(s * cos(f(x_adv), T), y) + alpha * ||A_f(x_adv) - A_f0(x)||_2 + beta * ||A_f(x) - A_f0(x)||_2
(refinement: adversarial; constraint: clean), x_adv = PGD on the CE term only. Equation numbers are those of the
journal version that restates TGA-ZSR (Comp-TGA, papers/tga_zsr_comp_tga.txt). ViT backbones only.

    python tga_zsr.py --toy                                 # offline toy world on a CPU, a few minutes
    python tga_zsr.py --data-root /data                     # the paper: ViT-B/32, TinyImageNet, eps 1/255, 10 epochs
    torchrun --standalone --nproc_per_node 8 tga_zsr.py --data-root /data
"""
import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import attacks
import clip
import data
import evaluate

PAPER = dict(train_set="tinyimagenet", batch_size=128, lr=1e-4)  # SPEC 2, paper Sec. IV-A
TOY = dict(lr=1e-3, max_steps=300, save_attention=8)
SCALE = 100.0  # CLIP's logit scale exp(logit_scale), fixed


# ----------------------------------------------------------------------------- the method


def add_method_args(p):
    p.add_argument("--alpha", type=float, default=0.08, help="weight of the attention refinement term (adversarial)")
    p.add_argument("--beta", type=float, default=0.05, help="weight of the attention constraint term (clean)")
    p.add_argument("--save-attention", type=int, metavar="N", help="at the end, write attention.png: the text-guided "
                   "maps of the pre-trained and fine-tuned encoders on N clean and adversarial images (0: off, the "
                   "default; 8 with --toy)")


def setup_method(model, train_set, encoder, args, run):
    """The text features T of the training classes, encoded once, and the frozen pre-trained encoder f0."""
    if not isinstance(model.visual, clip.model.VisionTransformer):
        raise evaluate.UsageError(f"{args.method} needs a ViT image encoder: its attention maps are made of patch "
                                  f"tokens, which {args.model} (a ResNet) does not have; use e.g. --model ViT-B/32")
    f0 = copy.deepcopy(encoder).eval().requires_grad_(False)
    return SimpleNamespace(text=evaluate.text_head(model, train_set).to(run.device), f0=f0)


def targets(x, y, m, args):
    """The hard labels, and the target of both attention terms: A_f0(x), frozen encoder, clean image (no grad)."""
    return y, attention(m.f0(x, all_tokens=True), y, x, m)


def attention(tokens, y, x, m):
    """A(x, t_y) (Eq. 6) from one forward's tokens, with each sample's ground-truth class text only, at x's size."""
    return clip.text_guided_attention(tokens, m.text[y], x.shape[-2:])


def train_attack(f, x, y, m, args):
    """PGD on the CE term only (SPEC 1.5): L-inf, random start, sign steps, input gradient only."""
    y, _ = y
    # the official attack also leaks its CE gradients into the parameters' .grad; ours takes input gradients only
    return attacks.pgd(clip.ZeroShotClassifier(f, m.text, SCALE), x, y, args.eps, args.step_size, args.attack_steps)


def loss_fn(f, x, x_adv, y, m, args):
    """TGA-ZSR's loss (Eq. 15): CE (Eq. 1) + alpha * refinement (Eq. 9-10) + beta * constraint (Eq. 12-13).

    With targets' f0(x): 3 forward passes (f0 no grad) and 2 backward per step, as the AGFT paper's Table 10 counts."""
    y, a0 = y
    tokens = f(x_adv, all_tokens=True)  # one forward: the CLS token gives the logits, the patch tokens the map
    ce = F.cross_entropy(clip.cosine_logits(tokens[:, 0], m.text, SCALE), y)
    refine = clip.map_distance(attention(tokens, y, x, m), a0)
    constrain = clip.map_distance(attention(f(x, all_tokens=True), y, x, m), a0)
    loss = ce + args.alpha * refine + args.beta * constrain
    return loss, {"ce": ce.detach(), "refine": refine.detach(), "constrain": constrain.detach()}


# ----------------------------------------------------------------------------- the shared skeleton


def get_args(argv=None):
    p = evaluate.training_parser(__doc__)
    add_method_args(p)
    args = evaluate.finish_args(p.parse_args(argv), "tga_zsr", PAPER, TOY)
    evaluate.require_vit(args.model, args.method)  # a ResNet is refused before any download, data scan or pre-training
    return args


def main(argv=None):
    args = get_args(argv)
    run = evaluate.setup(args)
    evaluate.check_datasets(args.eval_sets.split(","), args.data_root, args.train_set)  # fail now, not after training
    model = clip.load(args.model, device=run.device)
    encoder = clip.ImageEncoder(model.visual).to(run.device)  # f: [0,1] pixels -> features; the only trained part
    train_set = data.load_dataset(args.train_set, args.data_root, model.visual.input_resolution, train=True)
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
