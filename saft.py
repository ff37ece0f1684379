"""SAFT: semantic-aware adversarial fine-tuning for CLIP (Zhang, Li, Huang, Erfani, Rubinstein, Liu; TMLR).

TGA-ZSR (tga_zsr.py) with K text heads instead of one prompt per class: head W_k holds the k-th most relevant
description of every class, the descriptions (an LLM's, --descriptions) ranked by their CLIP text similarity to
the bare class name (hallucination-aware filtering, Eq. 2-3). Attack and loss average the cross-entropy over heads:
    L = mean_k CE(s * cos(f(x_adv), W_k), y) + alpha * ||A_f(x_adv) - A_f0(x)||_2 + beta * ||A_f(x) - A_f0(x)||_2
where the attention maps A (see attention_map() below) use, for each sample, the mean over k of W_k[y]; x_adv = PGD on
mean_k CE (semantic-ensemble attack). Without --descriptions, an ensemble of hand-written templates stands in (and
the script says so).

    python saft.py --toy                                    # offline toy world (its own descriptions), a few minutes
    python saft.py --data-root /data --descriptions prompts/cupl.json   # the paper: ViT-B/32, TinyImageNet, K = 5
    torchrun --standalone --nproc_per_node 8 saft.py --data-root /data --descriptions prompts/cupl.json
"""
import copy
import json
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import attacks
import attention
import clip
import data
import evaluate
import harness
import prompts
import toy

# The paper's main setting: the default of every flag (`python saft.py --help` prints them all), with its source.
# Optimizer SGD, momentum 0.9, weight decay 0 (paper Sec. 5.1); lr: linear warm-up, then cosine decay to 0 at the
# last step (official code). No data augmentation.
PAPER = dict(
    model="ViT-B/32",          # paper Sec. 5.1
    train_set="tinyimagenet",  # paper Sec. 5.1
    prompts="saft",            # class names and prompt templates of the training and evaluation sets: official code
                               # (TeCoA's dataset files, copied)
    batch_size=128,            # paper Sec. 5.1
    lr=1e-4,                   # paper Sec. 5.1
    epochs=10,                 # paper Sec. 5.1 (Tiny-ImageNet runs)
    warmup_steps=1000,         # official code
    eps=1 / 255,               # paper Sec. 5.1
    step_size=1 / 255,         # official code (step = eps)
    attack_steps=2,            # paper Sec. 5.1
    k=5,                       # descriptions per class, top-5 by relevance: paper Sec. 5.1
    alpha=0.08,                # TGA-ZSR's refinement weight (paper Sec. 5.1 adopts TGA-ZSR's loss; official code)
    beta=0.05,                 # TGA-ZSR's constraint weight (as alpha)
)
TOY = dict(lr=4e-5, max_steps=200, alpha=0.56, beta=0.35, save_attention=8)  # --toy: these and harness.TOY_WORLD
# alpha, beta: the paper's 0.08, 0.05 times 7. The map distance is an unsquared L2 norm over the H x W upsampled
# map, so the same per-pixel disagreement weighs 224/32 = 7 times less at the toy's 32 px than at 224 px.
SCALE = 100.0  # CLIP's logit scale exp(logit_scale), fixed


# ----------------------------------------------------------------------------- the method


# Without a descriptions file: an ensemble of plain templates (written here), the first K of them.
# A class with too few descriptions: this prompt K times, as the authors' code does, whatever the set's template.
FALLBACK = "This is a photo of a {}"
TEMPLATES = ["a photo of a {}.", "an image of a {}.", "a picture of a {}.", "This is a photo of a {}.",
             "a close-up photo of a {}.", "a photo of the {}.", "a cropped photo of a {}.", "a bright photo of a {}."]


def add_method_args(p):
    p.add_argument("--descriptions", metavar="PATH", help="JSON: class name -> descriptions (SAFT's prompts/*.json); "
                   "without it, hand-written templates, or under --toy the toy world's own descriptions")
    p.add_argument("--k", type=harness.POSITIVE, help="descriptions kept per class, i.e. text heads")
    p.add_argument("--alpha", type=harness.NON_NEGATIVE, help="weight of the attention refinement term (adversarial)")
    p.add_argument("--beta", type=harness.NON_NEGATIVE, help="weight of the attention constraint term (clean)")
    p.add_argument("--save-attention", type=harness.COUNT, default=0, metavar="N", help="at the end, write "
                   "attention.png: the text-guided maps of the pre-trained and fine-tuned encoders on N clean and "
                   "adversarial images (0: off)")


def read_descriptions(path):
    """The descriptions file as {class name: [description, ...]}; anything else is a one-line UsageError."""
    try:
        with open(path) as f:
            desc = json.load(f)
    except OSError as e:
        raise harness.UsageError(f"--descriptions {path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise harness.UsageError(f"--descriptions {path} is not valid JSON ({e})") from None
    if not isinstance(desc, dict) or not all(isinstance(v, list) and all(isinstance(d, str) for d in v)
                                             for v in desc.values()):
        raise harness.UsageError(f"--descriptions {path}: expected a JSON object mapping each class name to a list of "
                                 "description strings (the format of SAFT's prompts/*.json)")
    empty = [k for k, v in desc.items() if not all(d.strip() for d in v)]
    if empty:
        raise harness.UsageError(f"--descriptions {path}: {len(empty)} class(es) have an empty description string "
                                 f"({', '.join(map(repr, empty[:5]))}): an empty text describes nothing; remove it")
    return desc


def normalise(name):
    return " ".join(prompts.lower_spaces(name, slash=False).split())  # the TeCoA family's rule, spaces folded


def select_descriptions(model, classnames, desc, k):
    """Each class's top-k descriptions, most relevant first (Eq. 2-3), and the names of the classes that fell back.

    Names match after normalising both sides (lower case, '_' and '-' as spaces). Relevance is the cosine between
    a description's text feature and the bare class name's (no template). A class with no match or fewer than k
    descriptions gets FALLBACK k times."""
    # the official code matches case-sensitively with a raw substring fallback and ranks against the JSON key
    table = {}
    for key, texts in desc.items():
        table.setdefault(normalise(key), texts)
    found = [table.get(normalise(name), []) for name in classnames]
    ranked = [c for c in found if len(c) >= k]
    feats = clip.encode_text(model, [d for c in ranked for d in c]) if ranked else None
    names = clip.encode_text(model, classnames)
    chosen, fell, i = [], [], 0
    for name, name_feat, cands in zip(classnames, names, found):
        if len(cands) < k:
            chosen.append([FALLBACK.format(name)] * k)
            fell.append(name)
            continue
        score = feats[i:i + len(cands)] @ name_feat
        i += len(cands)
        chosen.append([cands[j] for j in score.sort(descending=True, stable=True).indices[:k].tolist()])
    return chosen, fell


def setup_method(model, train_set, encoder, args, run):
    """The K text heads W [K, C, D] (W_k: the k-th ranked description of every class; the CE heads), their mean per
    class for the attention maps (attention_text [C, D]), and the frozen pre-trained encoder f0."""
    harness.require_vit(args.model, args.method, model.visual)  # a file only the built model tells
    names = train_set.classnames
    source = f"--descriptions {args.descriptions}"
    if args.descriptions is None and args.train_set in toy.TASKS:  # the toy world ships its own (toy.descriptions)
        desc, source = toy.descriptions(), "the toy world's descriptions (toy.descriptions)"
    else:
        desc = read_descriptions(args.descriptions) if args.descriptions else None
    if desc is None:
        if args.k > len(TEMPLATES):
            raise harness.UsageError(f"--k {args.k}: without --descriptions SAFT has only {len(TEMPLATES)} templates")
        run.log(f"{args.method}: no --descriptions file, so no LLM descriptions: the {args.k} text heads are "
                f"{args.k} hand-written templates ({', '.join(TEMPLATES[:args.k])})")
        chosen = [[t.format(n) for t in TEMPLATES[:args.k]] for n in names]
    else:
        chosen, fell = select_descriptions(model, names, desc, args.k)
        if len(fell) == len(names):
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise harness.no_effect(source, f"none of the {len(names)} classes ({shown}) has an "
                                    f"entry with K = {args.k} descriptions or more in it, so every class would fall "
                                    f"back to \"{FALLBACK}\"; check its class names, or lower --k")
        run.log(f"{args.method}: top {args.k} descriptions per class from {source}; {len(fell)} of "
                f"{len(names)} classes had fewer than {args.k} (or no entry) and fell back to \"{FALLBACK}\" "
                f"{args.k} times" + (f": {', '.join(fell)}" if fell else ""))
    heads = [[c[k] for c in chosen] for k in range(args.k)]
    clip.check_distinct(heads, names, model.context_length, f"{args.method} text heads", fix="give them distinct "
                        "descriptions", paper=bool(getattr(train_set, "convention", None)))
    heads = torch.stack([clip.encode_text(model, head) for head in heads]).to(run.device)
    f0 = copy.deepcopy(encoder).eval().requires_grad_(False)
    return SimpleNamespace(heads=heads, attention_text=heads.mean(0), chosen=chosen, f0=f0)


def training_targets(x, y, fixed, args):
    """The hard labels y, and the target of both attention terms: A_f0(x), frozen encoder, clean image (no grad)."""
    return y, attention_map(fixed.f0(x, all_tokens=True), y, x, fixed)


def attention_map(tokens, y, x, fixed):
    """TGA-ZSR's A(x, t_y), [B, H, W] in [0, 1], with t_y the mean over k of W_k[y], upsampled to x's size
    (attention.text_guided). The official code averages the K maps' patch scores before the min-max: the same map,
    as the scores are linear in t."""
    return attention.text_guided(tokens, fixed.attention_text[y], x.shape[-2:])


def head_logits(features, fixed):
    """s * cos(f(x), W_k) for every head: [B, K, C]."""
    return clip.cosine_logits(features, fixed.heads.flatten(0, 1), SCALE).unflatten(1, fixed.heads.shape[:2])


def ensemble_ce(logits, y):
    """mean over heads k and the batch of CE(logits[:, k], y)."""
    return F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, logits.shape[1]))


def train_attack(f, x, targets, fixed, args):
    """Semantic-ensemble PGD on mean_k CE: L-inf, random start, sign steps, input gradient only."""
    y, _ = targets
    # paper Eq. 4 descends the mean cosine to the true class's descriptions; the official code ascends the K-head CE
    return attacks.pgd(lambda x: head_logits(f(x), fixed), x, y, args.eps, args.step_size, args.attack_steps,
                       loss_fn=ensemble_ce)


def loss_fn(f, x, x_adv, targets, fixed, args):
    """SAFT's loss as run (Sec. 5.1: TGA-ZSR's loss): mean_k CE + alpha * refinement + beta * constraint.

    Paper Eq. 5 minimises the mean cosine dissimilarity instead; the official code trains this one."""
    y, a0 = targets
    tokens = f(x_adv, all_tokens=True)  # one forward: the CLS token gives the logits, the patch tokens the map
    ce = ensemble_ce(head_logits(tokens[:, 0], fixed), y)
    refine = attention.map_distance(attention_map(tokens, y, x, fixed), a0)
    constrain = attention.map_distance(attention_map(f(x, all_tokens=True), y, x, fixed), a0)
    loss = ce + args.alpha * refine + args.beta * constrain
    return loss, {"ce": ce.detach(), "refine": refine.detach(), "constrain": constrain.detach()}


# ----------------------------------------------------------------------------- the shared skeleton


def get_args(argv=None):
    p = harness.training_parser(__doc__)
    add_method_args(p)
    args = harness.parse_args(p, argv, "saft", PAPER, TOY)
    harness.require_vit(args.model, args.method)  # a ResNet is refused before any download, data scan or pre-training
    if args.descriptions:
        read_descriptions(args.descriptions)  # a file that is unreadable, or holds an empty description, too
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
