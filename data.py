"""Datasets: the offline toy world, image folders, and the real training and zero-shot evaluation sets.

Every dataset yields (image, label) with images in [0,1] (float) or as uint8 tensors (small in-memory sets,
converted on the device by `to_device`), and carries `.classnames` (list of str) and `.template` (a prompt with
one `{}`), from which the zero-shot text head is built.
"""
import os

import torch
from torch.utils.data import DataLoader, Sampler


class DataError(Exception):
    """A dataset that is missing, malformed or empty; the message is one line saying what to do."""


def to_device(x, device):
    """Move a batch to the device; uint8 images become floats in [0,1] there (cheaper than on the CPU)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def prompts(dataset):
    return [dataset.template.format(c) for c in dataset.classnames]


def image_transform(resolution):
    """Resize the shorter side (bicubic), centre-crop to the model resolution, to a [0,1] tensor (SPEC 1.6)."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(resolution),
                      T.Lambda(lambda im: im.convert("RGB")), T.ToTensor()])


def image_folder(root, resolution, template="a photo of a {}."):
    """Any `root/<class>/<image>` tree; class names are the folder names with '_' read as spaces."""
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root} (expected {root}/<class name>/<images>)")
    try:
        ds = ImageFolder(root, transform=image_transform(resolution))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root} is not an image folder (expected {root}/<class name>/<images>): {e}") from None
    ds.classnames, ds.template = [c.replace("_", " ") for c in ds.classes], template
    return ds


# the 15 zero-shot evaluation sets, in the AGFT paper's table order
ZERO_SHOT_SETS = ["caltech101", "caltech256", "cifar10", "cifar100", "dtd", "eurosat", "fgvc_aircraft", "flowers102",
                  "food101", "imagenet", "oxford_pets", "pcam", "stanford_cars", "stl10", "sun397"]


def load_dataset(name, root, resolution, train=False):
    """The dataset called `name` (training split if train, else the evaluation split)."""
    if name == TOY_TRAIN or name in TOY_HELDOUT:
        return toy_dataset(name, TOY_TRAIN_SIZE if train else TOY_EVAL_SIZE, seed=TOY_TRAIN_SEED if train else TOY_EVAL_SEED)
    if name == "imagefolder":
        if root is None:
            raise DataError("--train-set imagefolder needs --data-root DIR (a DIR/<class name>/<images> tree)")
        return image_folder(root, resolution)
    raise DataError(f"unknown dataset '{name}' (known: imagefolder, {TOY_TRAIN}, {', '.join(TOY_HELDOUT)})")


class EpochSampler(Sampler):
    """Seeded permutation per epoch, cut into global batches that are split across ranks.

    Every step sees the same global batch whatever the number of processes, and iteration can start at any
    (epoch, batch), so a resumed run replays exactly the data order of an uninterrupted one.
    """

    def __init__(self, n, global_batch, rank=0, world=1, seed=0):
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world} processes")
        self.n, self.batch, self.rank, self.world, self.seed = n, global_batch // world, rank, world, seed
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the training set has {n} images, fewer than one batch of {global_batch}")
        self.epoch, self.start = 0, 0

    def set_position(self, step):
        self.epoch, self.start = divmod(step, self.steps_per_epoch)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        perm = perm[: self.steps_per_epoch * self.batch * self.world].view(self.steps_per_epoch, self.world, self.batch)
        return iter(perm[self.start:, self.rank].flatten().tolist())

    def __len__(self):
        return (self.steps_per_epoch - self.start) * self.batch


def make_loader(dataset, batch_size, sampler=None, workers=0, pin=False):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0, drop_last=False)


# --- the toy world ---
# A procedurally generated world of coloured shapes on textured backgrounds, with captions: the offline stand-in
# for web image-text pairs (pre-training), ImageNet (fine-tuning) and the zero-shot transfer sets (held out).
# Every image holds 1-3 copies of one shape, all of one colour and one size, grouped in one half of the image, on a
# grey background with a texture. Images are rendered in batches from signed-distance functions, all in torch, and
# are a deterministic function of the seed. Fine-tuning labels are colour x shape; the held-out zero-shot tasks ask
# about the other attributes (size, position, background, count), whose names are never fine-tuning labels.

TOY_RES = 32
TOY_SHAPES = ["circle", "square", "triangle", "cross"]
TOY_COLOURS = {"red": (0.90, 0.12, 0.10), "green": (0.15, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
               "yellow": (0.95, 0.90, 0.15), "purple": (0.60, 0.20, 0.80), "orange": (1.00, 0.55, 0.05),
               "cyan": (0.10, 0.85, 0.90), "white": (0.97, 0.97, 0.97)}
TOY_SIZES = ["small", "large"]
TOY_POSITIONS = ["left", "right", "top", "bottom"]
TOY_BACKGROUNDS = ["plain", "striped", "checkered", "noisy"]
TOY_COUNTS = ["one", "two", "three"]
TOY_ATTRS = {"shape": TOY_SHAPES, "colour": list(TOY_COLOURS), "size": TOY_SIZES, "position": TOY_POSITIONS,
             "background": TOY_BACKGROUNDS, "count": TOY_COUNTS}

TOY_TRAIN = "toy"  # fine-tuning task: "a photo of a {colour} {shape}." (32 classes)
TOY_TASKS = {  # task -> (attribute, class names, template); class i of a held-out task is value i of its attribute
    TOY_TRAIN: (None, [f"{c} {s}" for c in TOY_COLOURS for s in TOY_SHAPES], "a photo of a {}."),
    "toy_size": ("size", TOY_SIZES, "a photo of a {} object."),
    "toy_position": ("position", TOY_POSITIONS, "a photo of an object on the {} side."),
    "toy_background": ("background", TOY_BACKGROUNDS, "a photo of an object on a {} background."),
    "toy_count": ("count", [f"{c} object{'s' * (i > 0)}" for i, c in enumerate(TOY_COUNTS)], "a photo of {}."),
}
TOY_HELDOUT = [t for t in TOY_TASKS if t != TOY_TRAIN]
TOY_TRAIN_SIZE, TOY_EVAL_SIZE = 50_000, 500
TOY_TRAIN_SEED, TOY_EVAL_SEED = 0, 1
TOY_EPS = 8 / 255  # at 32 px an L-inf eps buys ~7x less L2 budget than at 224 px: 8/255 here ~ 1/255 on ViT-B/32


def toy_attributes(n, g):
    """n independent uniform draws of every attribute: {name: LongTensor [n]}."""
    return {k: torch.randint(len(v), (n,), generator=g) for k, v in TOY_ATTRS.items()}


def _u(g, *shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def toy_render(a, g, res=TOY_RES):
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
    img = img + _u(g, n, 1, 1, 1, lo=0.08, hi=0.14) * tex[:, None]
    # objects: k-th of m = count+1 copies sits in slot k along the long axis of its half of the image
    m, large = a["count"] + 1, a["size"].float()
    r = s * (_u(g, n, 1, lo=3.2, hi=3.9) * (1 - large[:, None]) + _u(g, n, 1, lo=5.2, hi=6.0) * large[:, None])
    spacing = res / m[:, None]
    jitter = (spacing / 2 - r).clamp(min=0.5 * s) * 0.8
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
    colour = torch.tensor(list(TOY_COLOURS.values()))[a["colour"]] * _u(g, n, 1, lo=0.85, hi=1.05)
    colour = (colour + _u(g, n, 3, lo=-0.05, hi=0.05)).clamp(0, 1)[:, :, None, None]
    for k in range(3):
        img = img + alpha[:, k:k + 1] * (colour - img)
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def _toy_caption(a, i, rng):
    """One caption for image i from a small grammar with random attribute dropout."""
    m, shape = int(a["count"][i]) + 1, TOY_SHAPES[a["shape"][i]]
    words = [rng.choice(["a photo of", "an image of", "a picture of"])]
    adj = [w for w, p in ((TOY_SIZES[a["size"][i]], 0.6), (list(TOY_COLOURS)[a["colour"][i]], 0.6)) if rng.random() < p]
    noun = "object" if rng.random() < 0.2 else shape
    if m == 1:
        words.append("one" if rng.random() < 0.3 else ("an" if (adj[0] if adj else noun)[0] in "aeiou" else "a"))
        words += adj + [noun]
    else:
        words += [TOY_COUNTS[m - 1]] + adj + [noun + ("es" if noun == "cross" else "s")]
    phrases = [p for p, q in ((f"on the {TOY_POSITIONS[a['position'][i]]} side", 0.5),
                              (f"on a {TOY_BACKGROUNDS[a['background'][i]]} background", 0.5)) if rng.random() < q]
    rng.shuffle(phrases)
    return " ".join(words + phrases) + ("." if rng.random() < 0.5 else "")


def toy_caption_batch(n, g):
    """n fresh images [n, 3, 32, 32] (float, [0,1]) and their captions, drawn with the torch generator g."""
    import random
    a = toy_attributes(n, g)
    rng = random.Random(int(torch.randint(2 ** 62, (), generator=g)))
    return toy_render(a, g), [_toy_caption(a, i, rng) for i in range(n)]


class ToyDataset(torch.utils.data.TensorDataset):
    def __init__(self, images, labels, classnames, template):
        super().__init__(images, labels)
        self.classnames, self.template = classnames, template


def toy_dataset(task, n, seed, chunk=4096):
    """n labelled images of a toy task (uint8 [3,32,32], int label), from the full world distribution."""
    if task not in TOY_TASKS:
        raise DataError(f"unknown toy task '{task}' (known: {', '.join(TOY_TASKS)})")
    attr, classnames, template = TOY_TASKS[task]
    g = torch.Generator().manual_seed(seed * 1000 + list(TOY_TASKS).index(task))
    images, labels = [], []
    for start in range(0, n, chunk):
        a = toy_attributes(min(chunk, n - start), g)
        images.append((toy_render(a, g) * 255).round().to(torch.uint8))
        labels.append(a["colour"] * len(TOY_SHAPES) + a["shape"] if attr is None else a[attr])
    return ToyDataset(torch.cat(images), torch.cat(labels), classnames, template)


def toy_descriptions():
    """SAFT-style descriptions (class name -> list of short descriptions) for every class of every toy task.

    Some are phrased in the captions' own grammar, the rest in words the tiny CLIP never saw, the way an LLM's
    descriptions mix useful and hallucinated ones (SAFT's filtering ranks them against the class name).
    """
    looks = {"circle": ["round", "a disc with a smooth curved edge"], "square": ["square", "a block with four equal sides"],
             "triangle": ["triangular", "a shape with three corners pointing up"],
             "cross": ["cross-shaped", "a plus sign with four arms"]}
    desc = {}
    for name in TOY_TASKS[TOY_TRAIN][1]:
        colour, shape = name.split()
        desc[name] = [f"a photo of one {name}.", f"an image of two {name}{'es' if shape == 'cross' else 's'}.",
                      f"a picture of a small {name}.", f"a photo of a large {name}.",
                      f"a {colour} {looks[shape][0]} object.", f"{looks[shape][1]}, coloured {colour}."]
    extra = {
        "small": ["a tiny object.", "a little shape that covers a small part of the picture.", "small objects."],
        "large": ["a big object.", "a large shape that fills much of its half of the picture.", "large objects."],
        "left": ["objects stacked in the left half.", "shapes placed on the left.", "left-hand objects."],
        "right": ["objects stacked in the right half.", "shapes placed on the right.", "right-hand objects."],
        "top": ["objects in a row along the top.", "shapes placed at the top.", "objects in the upper half."],
        "bottom": ["objects in a row along the bottom.", "shapes placed at the bottom.", "objects in the lower half."],
        "plain": ["an object on an empty grey background.", "a shape on a flat backdrop.", "a plain grey scene."],
        "striped": ["an object on a background of stripes.", "a shape on parallel lines.", "a striped scene."],
        "checkered": ["an object on a chessboard pattern.", "a shape on a checkered grid.", "a checkerboard scene."],
        "noisy": ["an object on a grainy background.", "a shape on static noise.", "a noisy scene."],
        "one object": ["a single object.", "one shape alone.", "only one thing in the picture."],
        "two objects": ["a pair of objects.", "two copies of the same shape.", "two identical things."],
        "three objects": ["three objects in a line.", "three copies of the same shape.", "a group of three things."],
    }
    for task in TOY_HELDOUT:
        attr, classnames, template = TOY_TASKS[task]
        for name in classnames:
            desc[name] = [template.format(name), f"an image of {template.format(name)[len('a photo of '):]}",
                          f"a picture of {template.format(name)[len('a photo of '):]}"] + extra[name]
    return desc
