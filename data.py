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
