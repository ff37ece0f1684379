"""The toy world: an offline stand-in for web image-text pairs, ImageNet and the zero-shot transfer sets, and a tiny
CLIP pre-trained on it, so that every method runs end to end on a CPU in minutes with no download.

Images are 32x32 renderings of one to three copies of a coloured shape (colour, size, position, count, shape,
background texture), drawn in batches from signed-distance functions, all in torch, a deterministic function of the
seed. Captions come from a small grammar over the same attributes. The fine-tuning task "toy" (playing ImageNet) is
colour x position, 32 classes ("a photo of a red object on the left side."); the held-out tasks (playing the
transfer sets) never use those labels: size and count ask about attributes no fine-tuning label names, colour groups
the fine-tuning classes differently, as CIFAR-10's classes group ImageNet's. Shape and background texture are in
every picture and most captions, but the tiny ViT does not learn them reliably in its budget: no task asks about them.

The toy CLIP (CONFIG) is ViT-B/32's architecture at toy scale, built by the same clip/ classes, and pre-trained
contrastively on fresh caption batches (pretrain). harness.load_model("toy") keeps its weights in a cache keyed on
the recipe (cache_path), pre-training them once on first use.
"""
import hashlib
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

import clip

# ----------------------------------------------------------------------------- the world: attributes, images

RES = 32
SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {"red": (0.90, 0.12, 0.10), "green": (0.15, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
               "yellow": (0.95, 0.90, 0.15), "purple": (0.60, 0.20, 0.80), "orange": (1.00, 0.55, 0.05),
               "cyan": (0.10, 0.85, 0.90), "white": (0.97, 0.97, 0.97)}
SIZES = ["small", "large"]
POSITIONS = ["left", "right", "top", "bottom"]
BACKGROUNDS = ["plain", "striped", "checkered", "noisy"]
COUNTS = ["one", "two", "three"]
ATTRS = {"shape": SHAPES, "colour": list(COLOURS), "size": SIZES, "position": POSITIONS,
             "background": BACKGROUNDS, "count": COUNTS}

TRAIN = "toy"  # fine-tuning task: "a photo of a {colour} object on the {position} side." (32 classes)
TRAIN_NAMES = [f"{c} object on the {p} side" for c in COLOURS for p in POSITIONS]
TASKS = {  # task -> (attribute, class names, template); class i of a held-out task is value i of its attribute
    TRAIN: (None, TRAIN_NAMES, "a photo of a {}."),
    "toy_size": ("size", SIZES, "a photo of {} objects."),  # the best of 8 templates on images of another seed
    "toy_count": ("count", [f"{c} object{'s' * (i > 0)}" for i, c in enumerate(COUNTS)], "a photo of {}."),
    "toy_colour": ("colour", list(COLOURS), "a photo of a {} object."),
}
HELDOUT = [t for t in TASKS if t != TRAIN]
TRAIN_SIZE, EVAL_SIZE = 50_000, 300
TRAIN_SEED, EVAL_SEED = 0, 1
EPS = 16 / 255  # at 32 px an L-inf eps buys ~7x less L2 norm than at 224 px: 16/255 here ~ 2.3/255 on ViT-B/32


def train_label(colour, position):
    """The fine-tuning class (index into TRAIN_NAMES) of a colour and a position index, scalars or tensors."""
    return colour * len(POSITIONS) + position


def attributes(n, g):
    """n independent uniform draws of every attribute: {name: LongTensor [n]}."""
    return {k: torch.randint(len(v), (n,), generator=g) for k, v in ATTRS.items()}


def _u(g, *shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def render(a, g, res=RES):
    """Attributes {name: [n]} -> float images [n, 3, res, res] in [0, 1]."""
    n, s = a["shape"].numel(), res / 32  # geometry is specified at 32 px and scales with res
    yy, xx = torch.meshgrid(torch.arange(res) + 0.5, torch.arange(res) + 0.5, indexing="ij")  # pixel centres
    # background: a tinted grey level plus one of four textures (same texture in every channel)
    img = (_u(g, n, 1, lo=0.15, hi=0.45) + _u(g, n, 3, lo=-0.03, hi=0.03))[:, :, None, None].expand(n, 3, res, res)
    period, orient = torch.randint(4, 7, (n, 1, 1), generator=g) * s, torch.randint(3, (n, 1, 1), generator=g)
    coord = torch.where(orient == 0, yy, torch.where(orient == 1, xx, (xx + yy) / 1.4142)) / period
    stripes = ((coord + _u(g, n, 1, 1)) % 1 < 0.5).float() * 2 - 1
    cell = torch.randint(2, 5, (n, 1, 1), generator=g) * s
    checker = ((torch.div(xx + _u(g, n, 1, 1) * cell, cell, rounding_mode="floor")
                + torch.div(yy + _u(g, n, 1, 1) * cell, cell, rounding_mode="floor")) % 2) * 2 - 1
    noise = torch.randn(n, res, res, generator=g).clamp(-2, 2) * 0.7
    tex = torch.stack([torch.zeros_like(noise), stripes, checker, noise], 1)[torch.arange(n), a["background"]]
    img = img + _u(g, n, 1, 1, 1, lo=0.12, hi=0.20) * tex[:, None]
    # objects: k-th of m = count+1 copies sits in slot k along the long axis of its half of the image
    m, large = a["count"] + 1, a["size"].float()
    r = s * (_u(g, n, 1, lo=2.8, hi=3.4) * (1 - large[:, None]) + _u(g, n, 1, lo=5.6, hi=6.4) * large[:, None])
    spacing = res / m[:, None]
    jitter = ((spacing / 2 - r).clamp(min=0.5 * s) * 0.8).clamp(max=4 * s)  # a lone object stays mid-side
    along = spacing * (torch.arange(3) + 0.5) + _u(g, n, 3, lo=-1, hi=1) * jitter
    across = res / 4 + _u(g, n, 1, lo=-2, hi=2) * s  # centre of the left/top half
    pos = a["position"][:, None]
    across = torch.where(pos % 2 == 1, res - across, across)  # right, bottom: the other half
    cx, cy = torch.where(pos < 2, across, along), torch.where(pos < 2, along, across)  # left/right: stacked in y
    u = (xx - cx[:, :, None, None]) / r[:, :, None, None]  # [n, 3 slots, res, res], in units of the radius
    v = (yy - cy[:, :, None, None]) / r[:, :, None, None]
    au, av = u.abs(), v.abs()
    sdf = torch.stack([
        (u * u + v * v).sqrt() - 1,  # circle
        torch.maximum(au, av) - 0.85,  # square (about the circle's area)
        torch.maximum((1.7 * au - v - 1) / 1.972, v - 0.7),  # triangle, apex up
        torch.minimum(torch.maximum(au - 0.36, av - 1.05), torch.maximum(au - 1.05, av - 0.36)),  # cross
    ])[a["shape"], torch.arange(n)]
    alpha = (0.5 - sdf * r[:, :, None, None]).clamp(0, 1) * (torch.arange(3) < m[:, None])[:, :, None, None]
    colour = torch.tensor(list(COLOURS.values()))[a["colour"]] * _u(g, n, 1, lo=0.85, hi=1.05)
    colour = (colour + _u(g, n, 3, lo=-0.05, hi=0.05)).clamp(0, 1)[:, :, None, None]
    for k in range(3):
        img = img + alpha[:, k:k + 1] * (colour - img)
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)


CAPTION_P = {"size": 0.75, "colour": 0.75, "object": 0.15, "position": 0.8, "background": 0.8, "negation": 0.3}
GROUPED = 0.5  # share of a pre-training batch drawn as minimal sets (images that differ in one attribute only)
VARIED = {"size": 3, "position": 2, "count": 2, "colour": 1, "shape": 1, "background": 1}  # weights of the varied one
PREFIXES = ["a photo of", "an image of", "a picture of", "this is a photo of"]


def minimal_sets(n, g, grouped=GROUPED, varied=VARIED):
    """n attribute draws of which a share `grouped` comes in minimal sets: up to 4 images that agree in every
    attribute but one, each with a different value of it. In random batches most captions can be matched from
    colour alone; a minimal set can only be told apart by its varied attribute, which is how the tiny ViT learns
    size, count and position within minutes. Returns (attributes, must), where must[i] names the attribute image
    i's caption has to mention (None outside the sets)."""
    a = attributes(n, g)
    must, names, w = [None] * n, list(varied), torch.tensor([float(v) for v in varied.values()])
    i, end = 0, int(grouped * n)
    while i < end:
        attr = names[int(torch.multinomial(w, 1, generator=g))]
        k = min(4, len(ATTRS[attr]), end - i)
        if k < 2:
            break
        values = torch.randperm(len(ATTRS[attr]), generator=g)[:k]
        for key in a:
            a[key][i:i + k] = a[key][i]
        a[attr][i:i + k] = values
        must[i:i + k] = [attr] * k
        i += k
    return a, must


def _plural(noun):
    return noun + ("es" if noun == "cross" else "s")


def caption(a, i, rng, must=None, p=CAPTION_P):
    """One caption for image i from a small grammar; each attribute is mentioned with probability p[attribute]
    (the noun is replaced by "object" with p["object"]), and always if it is `must`, so the text tower also learns
    partial descriptions. With p["negation"] a negated sentence follows ("this is not a photo of a blue object on
    the left side"), naming a fine-tuning class the image is not: Comp-TGA's non-class prompts are in the language
    it learns."""
    q = {k: (1.0 if k == must else v) for k, v in p.items()}
    if must == "shape":
        q["object"] = 0.0
    colours = list(COLOURS)
    m, shape, colour = int(a["count"][i]) + 1, SHAPES[a["shape"][i]], colours[a["colour"][i]]
    words = [rng.choice(PREFIXES)]
    adj = [w for w, k in ((SIZES[a["size"][i]], "size"), (colour, "colour")) if rng.random() < q[k]]
    noun = "object" if rng.random() < q["object"] else shape
    if m == 1:
        words.append("one" if rng.random() < 0.3 else ("an" if (adj[0] if adj else noun)[0] in "aeiou" else "a"))
        words += adj + [noun]
    else:
        words += [COUNTS[m - 1]] + adj + [_plural(noun)]
    phrases = [w for w, k in ((f"on the {POSITIONS[a['position'][i]]} side", "position"),
                              (f"on a {BACKGROUNDS[a['background'][i]]} background", "background"))
               if rng.random() < q[k]]
    rng.shuffle(phrases)
    text = " ".join(words + phrases)
    if rng.random() < q["negation"]:  # a fine-tuning class the image is not
        own = int(train_label(a["colour"][i], a["position"][i]))
        wrong = rng.choice([n for k, n in enumerate(TRAIN_NAMES) if k != own])
        return f"{text}. this is not a photo of a {wrong}" + ("." if rng.random() < 0.5 else "")
    return text + ("." if rng.random() < 0.5 else "")


def caption_batch(n, g):
    """n fresh images [n, 3, 32, 32] (float, [0,1]) and their captions, drawn with the torch generator g."""
    a, must = minimal_sets(n, g)
    rng = random.Random(int(torch.randint(2 ** 62, (), generator=g)))
    return render(a, g), [caption(a, i, rng, must[i]) for i in range(n)]


class ToyDataset(torch.utils.data.TensorDataset):
    resize_to = None  # fed at native resolution; the model upsamples

    def __init__(self, images, labels, classnames, template):
        super().__init__(images, labels)
        self.classnames, self.template = classnames, template


def dataset(task, n, seed, chunk=1024):
    """n labelled images of a toy task (uint8 [3,32,32], int label), from the full world distribution."""
    if task not in TASKS:
        raise ValueError(f"unknown toy task '{task}' (known: {', '.join(TASKS)})")
    attr, classnames, template = TASKS[task]
    g = torch.Generator().manual_seed(seed * 1000 + list(TASKS).index(task))
    images, labels = [], []
    for start in range(0, n, chunk):
        a = attributes(min(chunk, n - start), g)
        images.append((render(a, g) * 255).round().to(torch.uint8))
        labels.append(train_label(a["colour"], a["position"]) if attr is None else a[attr])
    return ToyDataset(torch.cat(images), torch.cat(labels), classnames, template)


def descriptions():
    """SAFT-style descriptions (class name -> list of descriptions) for every class of every toy task.

    Six per class describe it in the captions' own language (counts, sizes, the class named), so each is
    informative; two are in words the tiny CLIP never saw, the way an LLM's descriptions mix useful and
    hallucinated ones. SAFT's filtering ranks them by their similarity to the bare class name and keeps the top K.
    """
    side = {"left": "the left half", "right": "the right half", "top": "the upper half", "bottom": "the lower half"}
    desc = {}
    for name in TRAIN_NAMES:
        colour, where = name.split()[0], name.split()[-2]
        desc[name] = [f"a photo of one {name}.", f"an image of two {colour} objects on the {where} side.",
                      f"a picture of a small {name}.", f"a photo of a large {name}.",
                      f"this is a photo of three {colour} objects on the {where} side.",
                      f"a {colour} shape on the {where} side on a plain background.",
                      f"something painted {colour}, gathered in {side[where]} of the frame.",
                      f"a glossy {colour} sticker toward the {where} edge."]
    extra = {
        "small": ["a photo of one small object.", "a picture of three small objects.", "a tiny speck of a thing."],
        "large": ["a photo of one large object.", "a picture of three large objects.", "a huge bulky thing."],
        **{c: [f"a photo of one {c} object.", f"a picture of three {c} objects.", f"something painted {c}."]
           for c in COLOURS},
        "one object": ["a picture of one large object.", "this is a photo of one small object.", "a lonely single item."],
        "two objects": ["a picture of two large objects.", "this is a photo of two small objects.", "a matching pair."],
        "three objects": ["a picture of three large objects.", "this is a photo of three small objects.",
                          "a trio in a row."],
    }
    for task in HELDOUT:
        attr, classnames, template = TASKS[task]
        for name in classnames:
            tail = template.format(name)[len("a photo of "):]
            desc[name] = [template.format(name), f"an image of {tail}", f"a picture of {tail}"] + extra[name]
    return desc


# ----------------------------------------------------------------------------- the toy CLIP and its pre-training

# ViT-B/32's architecture at toy scale: 32 px images cut into 4x4 patches (an 8x8 grid, so attention maps carry
# position), a 64-wide 2-layer text tower over the real BPE vocabulary (ids go up to 49407, so the embedding keeps
# all 49408 rows; unused rows never move).
CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=4,
              context_length=32, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
STEPS, BATCH, LR, SEED = 1000, 128, 1e-3, 0
VERSION = 3  # of the world and the recipe: bump it when the world or the pre-training changes


def cache_key():
    """A hash of the architecture, the recipe and the world's version: a changed recipe never loads stale weights."""
    recipe = [VERSION, CONFIG, STEPS, BATCH, LR, SEED]
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def cache_dir():
    """$NANOZSAR_CACHE, by default ~/.cache/nanozsar: the toy CLIP and the pre-trained encoders' results."""
    return os.environ.get("NANOZSAR_CACHE", os.path.expanduser("~/.cache/nanozsar"))


def cache_path():
    return os.path.join(cache_dir(), f"toy_clip-{cache_key()}.pt")


def read_cache(path, log):
    """The toy CLIP cached at path, or None (said by log) for a file that is unreadable or whose image encoder computes
    no finite features (clip.encoder_fault): it is pre-trained again rather than trusted."""
    try:
        model = clip.build_model(torch.load(path, map_location="cpu", weights_only=True))
        fault = clip.encoder_fault(model.visual)
    except Exception as e:  # a truncated or foreign file
        fault = f"are unreadable ({type(e).__name__})"
    if fault:
        log(f"toy CLIP: the cached weights {path} {fault}; pre-training them again")
        return None
    return model


def threads():
    """One CPU thread for the toy world unless OMP_NUM_THREADS is set: on a small machine a second thread helps only
    while nothing else runs, and costs far more than it gives as soon as anything else does."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def sincos_2d(grid, channels, temperature=16.0):
    """2D sin-cos table [grid*grid, channels]: a quarter of the channels each for sin y, cos y, sin x, cos x."""
    q = channels // 4
    omega = temperature ** (-torch.arange(q) / q)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float), torch.arange(grid, dtype=torch.float), indexing="ij")
    ay, ax = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)


def build(seed=SEED):
    """A freshly initialised toy CLIP. The patch tokens' positional embedding starts as a 2D sin-cos table over all
    channels (CLIP's random init otherwise): with CLIP's init, or sin-cos in a few channels only, whether the tiny
    ViT learns position within minutes depends on the seed and even on the float summation order; with the full
    table it learns position every time (background texture, which no task asks about, is what it gives up)."""
    torch.manual_seed(seed)
    model = clip.CLIP(**CONFIG)
    grid = model.visual.input_resolution // model.visual.conv1.kernel_size[0]
    with torch.no_grad():
        model.visual.positional_embedding[1:] = sincos_2d(grid, model.visual.conv1.out_channels)
    return model


def _normalise(images):
    return (images - torch.tensor(clip.model.MEAN).view(1, 3, 1, 1)) / torch.tensor(clip.model.STD).view(1, 3, 1, 1)


class _Tokens:
    """clip.tokenize with a cache: the caption grammar repeats itself, BPE is the slow part of a step."""

    def __init__(self, context_length):
        self.context_length, self.cache = context_length, {}

    def __call__(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            self.cache.update(zip(new, clip.tokenize(new, context_length=self.context_length, truncate=True)))
        return torch.stack([self.cache[t] for t in texts])


def pretrain(steps=STEPS, batch_size=BATCH, lr=LR, seed=SEED, warmup=0.05, weight_decay=0.1, log=print):
    """The pre-trained toy CLIP (eval mode): symmetric InfoNCE on fresh caption batches every step; AdamW, linear
    warm-up then cosine to 0. A progress line every 5 seconds."""
    model = build(seed)
    tokens = _Tokens(model.context_length)
    no_decay = ("token_embedding", "positional_embedding", "class_embedding")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not any(k in n for k in no_decay)]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not any(k in n for k in no_decay))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size)
    t0 = last = time.time()
    model.train()
    for step in range(1, steps + 1):
        images, captions = caption_batch(batch_size, g)
        logits, _ = model(_normalise(images), tokens(captions))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if time.time() - last >= 5 or step == steps:
            last, el = time.time(), time.time() - t0
            log(f"toy pre-training: step {step}/{steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f}"
                f" lr {sched.get_last_lr()[0]:.2e} {el:.0f}s elapsed, ETA {el / step * (steps - step):.0f}s")
    return model.eval()
