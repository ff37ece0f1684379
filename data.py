"""Datasets: image folders, the real training and zero-shot evaluation sets with their prompts, the pre-flight checks
and the sampler; the toy world's sets come from toy.py.

Every dataset yields (image, label) with images in [0,1] (float) or as uint8 tensors (small in-memory sets,
converted on the device by `to_device`), and carries `.classnames` (list of str) and `.template` (a prompt with
one `{}`), from which the zero-shot text head is built.
"""
import os

import torch
from torch.utils.data import DataLoader, Sampler

import clip
from prompts import FLOWERS, PROMPTS, NamingError
import toy


class DataError(Exception):
    """A dataset that is missing, malformed or empty; the message is one line saying what to do."""


def to_device(x, device, size=None):
    """Move a batch to the device; uint8 images become floats in [0,1] there, resized to size x size if given
    (bicubic with PIL's kernel, as the CPU pipeline would; far cheaper on a GPU than per image in the loader)."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if size is not None and x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp_(0, 1)
    return x


def prompts(dataset):
    return [dataset.template.format(c) for c in dataset.classnames]


def image_transform(resolution):
    """Resize the shorter side (bicubic), centre-crop to the model resolution, to a uint8 tensor (to_device makes it
    float on the device: the workers send a quarter of the bytes); no augmentation."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(resolution),
                      T.Lambda(to_rgb), T.PILToTensor()])


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit grey images (PNG, TIFF); "I" as well


def to_rgb(img):
    """A PIL image as 8-bit RGB. 16-bit grey images (PNG/TIFF mode I;16, or I) are scaled from [0, 65535]: PIL's own
    convert("RGB") clips them at 255, which makes them almost white."""
    if img.mode in SIXTEEN_BIT:
        import numpy as np
        from PIL import Image
        grey = np.asarray(img).astype(np.float64).clip(0, 65535) / 257  # 65535 -> 255
        img = Image.fromarray(grey.round().astype(np.uint8), "L")
    return img.convert("RGB")


def load_image(path):
    """Read an image file as 8-bit RGB (the loader of every image-file set here; see to_rgb)."""
    from PIL import Image
    with Image.open(path) as img:
        return to_rgb(img)


def image_folder(root, resolution, template="a photo of a {}.", transform=None):
    """Any `root/<class>/<image>` tree; class names are the folder names with '_' read as spaces."""
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root} (expected {root}/<class name>/<images>)")
    try:
        ds = ImageFolder(root, transform=transform or image_transform(resolution), loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root} is not an image folder (expected {root}/<class name>/<images>): {e}") from None
    ds.classnames, ds.template, ds.resize_to = [c.replace("_", " ") for c in ds.classes], template, None
    return ds


# --- checks before any model is loaded or any step is trained: every image readable, classes that can be told apart


def image_problem(path):
    """Why the image file cannot be read (a short phrase), or None. Cheap: PIL parses the header only, and the last
    4 KiB must hold the end marker of a JPEG (FF D9) or PNG (IEND); a file without it (cut short, or with more than
    4 KiB after its end) is decoded in full to decide."""
    from PIL import Image
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with Image.open(path) as img:
            fmt = img.format
        end = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt)
        if end:
            with open(path, "rb") as f:
                f.seek(max(0, size - 4096))
                tail = f.read()
            if end not in tail:
                with Image.open(path) as img:
                    img.load()
    except Exception as e:  # not an image, truncated, unreadable, a decompression bomb
        text = " ".join(str(e).replace(repr(str(path)), "").replace(str(path), "").split()).strip(" :")
        return text[:80] or type(e).__name__
    return None


def image_files(ds):
    """The image files a dataset reads (ImageFolder, ImageList and torchvision's file-based sets), or []."""
    for attr in ("samples", "_samples", "_image_files", "_images"):
        files = getattr(ds, attr, None)
        if isinstance(files, list) and files:
            return [str(f[0] if isinstance(f, tuple) else f) for f in files]
    return []


_SCANNED = set()  # file lists found readable in this process (the scripts check up front, then load again)


def scan_images(ds, name, workers=16):
    """Raise DataError (one line) naming the dataset's unreadable image files and how many there are."""
    files = image_files(ds)
    key = hash(tuple(files))
    if not files or key in _SCANNED or int(os.environ.get("LOCAL_RANK", 0)):  # torchrun: local rank 0 scans alone
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(min(workers, len(files))) as pool:
        problems = [(f, p) for f, p in zip(files, pool.map(image_problem, files, chunksize=64)) if p]
    if problems:
        base = os.path.commonpath([os.path.dirname(f) for f in files]) if len(files) > 1 else ""
        shown = "; ".join(f"{os.path.relpath(f, base) if base else f} ({why})" for f, why in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(f"{name}: {len(problems)} of {len(files)} images cannot be read{f' under {base}' if base else ''}: "
                        f"{shown}{more}; remove or replace them")
    _SCANNED.add(key)


def check_classes(ds, name, folders=None, prompts=True):
    """Raise DataError (one line) unless the set has at least two classes whose prompts CLIP can tell apart (the
    token ids at CLIP's 77 tokens, clip.check_distinct; folders: the class folders, to name them instead)."""
    names = list(ds.classnames)
    if len(names) < 2:
        raise DataError(f"{name}: {len(names)} class{'es' * (len(names) != 1)} ({', '.join(map(repr, folders or names))}); "
                        "zero-shot classification needs at least two")
    try:
        if prompts:
            clip.check_distinct([[ds.template.format(c) for c in names]], folders or names, 77, name,
                                "folders" if folders else "classes")
    except clip.CLIPError as e:
        raise DataError(str(e)) from None


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


# --- the real datasets ---
# Each set lives in a fixed folder under --data-root, in the layout torchvision's class for it expects (or the layout
# of the official archive where torchvision has no class), and is read from there as it is: nothing is moved or
# rewritten. Splits follow the AGFT paper's code (TeCoA, PMG-AFT, TGA-ZSR and SAFT evaluate the same ones); prompt
# templates and class names follow the chosen convention (prompts.PROMPTS). Preprocessing: CIFAR-10/100
# and STL-10 stay at their native 32 / 96 px (the model upsamples after the attack) unless resize_small
# (evaluate.py --resize-before-attack); every other set is resized (shorter side) and centre-cropped to the model
# resolution before the attack. Small square images (CIFAR, STL, TinyImageNet's 64 px) leave the loader as uint8
# tensors at native size and are resized on the device (`ds.resize_to`, read by to_device); the others go through PIL.

ZERO_SHOT_SETS = ["caltech101", "caltech256", "cifar10", "cifar100", "dtd", "eurosat", "fgvc_aircraft", "flowers102",
                  "food101", "imagenet", "oxford_pets", "pcam", "stanford_cars", "stl10", "sun397"]  # AGFT's order
EXTRA_SETS = ["tinyimagenet", "country211", "imagenet-r", "imagenet-sketch"]
TRAIN_SETS = ["imagenet", "tinyimagenet", "cifar10", "cifar100"]
SMALL_SETS = {"cifar10", "cifar100", "stl10"}  # fed at native resolution unless resize_small
DEVICE_RESIZED = SMALL_SETS | {"tinyimagenet"}  # square uint8 images, resized on the device when resized at all

# name: (folder under --data-root, what it holds, how --download does). "" = cannot be downloaded.
TV = "--download fetches it with torchvision"
SETS = {
    "caltech101": ("caltech101", "101_ObjectCategories/<category>/image_NNNN.jpg",
                   TV + ", though releases before pytorch/vision#9205 use dead Google Drive links"),
    "caltech256": ("caltech256", "256_ObjectCategories/NNN.<category>/NNN_NNNN.jpg",
                   TV + ", though releases before pytorch/vision#9205 use dead Google Drive links"),
    "cifar10": ("cifar-10-batches-py", "the CIFAR-10 python pickles batches.meta, data_batch_1..5, test_batch", TV),
    "cifar100": ("cifar-100-python", "the CIFAR-100 python pickles meta, train, test", TV),
    "dtd": ("dtd/dtd", "images/<texture>/*.jpg and labels/test1.txt", TV),
    "eurosat": ("eurosat/2750", "the 10 class folders AnnualCrop/ .. SeaLake/ of the RGB release", TV),
    "fgvc_aircraft": ("fgvc-aircraft-2013b/data", "variants.txt, images_variant_test.txt and images/*.jpg", TV),
    "flowers102": ("flowers-102", "jpg/image_NNNNN.jpg, imagelabels.mat and setid.mat", TV),
    "food101": ("food-101", "meta/test.json and images/<dish>/*.jpg", TV),
    "imagenet": ("imagenet", "the 1000 ILSVRC-2012 wnid folders val/<wnid>/*.JPEG (train/<wnid>/ for training)", ""),
    "oxford_pets": ("oxford-iiit-pet", "images/*.jpg and annotations/test.txt", TV),
    "pcam": ("pcam", "camelyonpatch_level_2_split_test_x.h5 and _y.h5, read with h5py",
             TV + " and gdown, though Google Drive quotas often break it"),
    "stanford_cars": ("stanford_cars", "devkit/cars_meta.mat, cars_test_annos_withlabels.mat and cars_test/*.jpg, "
                      "read with scipy", ""),
    "stl10": ("stl10_binary", "test_X.bin, test_y.bin and class_names.txt", TV),
    "sun397": ("SUN397", "ClassName.txt and <letter>/<category>/sun_*.jpg",
               "--download tries torchvision's URL, reported dead in pytorch/vision#9348"),
    "tinyimagenet": ("tiny-imagenet-200", "the official zip as it is: wnids.txt, words.txt, "
                     "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt", ""),
    "country211": ("country211", "test/<ISO country code>/*.jpg", TV),
    "imagenet-r": ("imagenet-r", "<wnid>/*.jpg, 200 wnid folders", ""),
    "imagenet-sketch": ("sketch", "<wnid>/*.JPEG, the 1000 wnid folders", ""),
}
# What must exist (relative to the set's folder) before a set counts as present; training splits in REQUIRED_TRAIN.
REQUIRED = {"cifar10": ["test_batch"], "cifar100": ["test"], "dtd": ["labels", "images"],
            "fgvc_aircraft": ["variants.txt", "images"], "flowers102": ["jpg", "imagelabels.mat", "setid.mat"],
            "food101": ["meta", "images"], "imagenet": ["val"], "oxford_pets": ["images", "annotations"],
            "pcam": ["camelyonpatch_level_2_split_test_x.h5", "camelyonpatch_level_2_split_test_y.h5"],
            "stanford_cars": ["devkit/cars_meta.mat", "cars_test_annos_withlabels.mat", "cars_test"],
            "stl10": ["test_X.bin", "test_y.bin"], "sun397": ["ClassName.txt"], "country211": ["test"],
            "caltech101": ["101_ObjectCategories"], "caltech256": ["256_ObjectCategories"],
            "tinyimagenet": ["words.txt", "val/val_annotations.txt", "val/images"]}
REQUIRED_TRAIN = {"imagenet": ["train"], "tinyimagenet": ["wnids.txt", "words.txt", "train"],
                  "cifar10": ["data_batch_1"], "cifar100": ["train"]}

EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
                   "Residential", "River", "SeaLake"]
def imagenet_classnames():
    """The 1000 ImageNet names in sorted-wnid order as AGFT writes them: torchvision's short Keras-style names with
    '-' read as a space, case kept. torchvision tells the two homonym pairs apart ("crane bird", "maillot tank suit");
    AGFT's names file does not, so neither do we. The TeCoA family lower-cases the same names (prompts.py); FARE uses
    OpenAI's curated names with 80 templates."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES
    names = [n.replace("-", " ") for n in _IMAGENET_CATEGORIES]
    names[134], names[639] = "crane", "maillot"
    return names


def _subfolders(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir()) if os.path.isdir(path) else []


def wordnet_first_lemmas(words_txt, wnids):
    """wnid -> first lemma of its synset from a words.txt ("n01443537<TAB>goldfish, Carassius auratus"), '-' read as
    a space: for ILSVRC synsets this is the Keras-style name AGFT uses."""
    wanted, names = set(wnids), {}
    with open(words_txt, encoding="utf-8") as f:
        for line in f:
            wnid, _, lemmas = line.rstrip("\n").partition("\t")
            if wnid in wanted:
                names[wnid] = lemmas.split(",")[0].strip().replace("-", " ")
    return names


def imagenet_names_for(wnids, root, name):
    """ImageNet class names of some wnids: by index among the 1000 wnid folders of an ImageNet copy under root, else
    from TinyImageNet's words.txt (which covers every WordNet noun)."""
    for sub in ("imagenet/val", "imagenet/train", SETS["imagenet-sketch"][0]):
        all_wnids = _subfolders(os.path.join(root, sub))
        if len(all_wnids) == 1000:
            by_wnid = dict(zip(all_wnids, imagenet_classnames()))
            if all(w in by_wnid for w in wnids):
                return [by_wnid[w] for w in wnids]
    words = os.path.join(root, SETS["tinyimagenet"][0], "words.txt")
    by_wnid = wordnet_first_lemmas(words, wnids) if os.path.isfile(words) else {}
    if not all(w in by_wnid for w in wnids):
        raise DataError(f"{name}: class names come from the ImageNet wnids, but neither "
                        f"{os.path.join(root, 'imagenet')}/val (or train) with the 1000 wnid folders nor {words} "
                        "is there to name them; put either there")
    return [by_wnid[w] for w in wnids]


def read_mat(path):
    """The numeric arrays in a MATLAB v5 .mat file, flat in MATLAB's column-major order: {name: numpy array}.

    Enough for Flowers102's imagelabels.mat and setid.mat, so that set loads without scipy."""
    import struct
    import zlib
    import numpy as np
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 128 or raw[126:128] not in (b"IM", b"MI"):
        raise ValueError(f"{path} is not a MATLAB 5 .mat file")
    end = "<" if raw[126:128] == b"IM" else ">"
    dtypes = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}

    def elements(buf):  # (type, bytes) of each data element; small ones pack type and size into one word
        pos = 0
        while pos + 8 <= len(buf):
            kind, size = struct.unpack_from(end + "II", buf, pos)
            if kind >> 16:
                kind, size, start, pos = kind & 0xFFFF, kind >> 16, pos + 4, pos + 8
            else:
                start, pos = pos + 8, pos + 8 + size + (0 if kind == 15 else -size % 8)
            yield kind, buf[start:start + size]

    arrays = {}
    for kind, payload in elements(raw[128:]):
        if kind == 15:  # compressed: one zlib stream holding one element
            kind, payload = next(elements(zlib.decompress(payload)))
        parts = list(elements(payload)) if kind == 14 else []  # a matrix: flags, dimensions, name, real part, ...
        if len(parts) >= 4 and parts[3][0] in dtypes:
            arrays[parts[2][1].decode()] = np.frombuffer(parts[3][1], end + dtypes[parts[3][0]])
    return arrays


class ImageList(torch.utils.data.Dataset):
    """Images listed as (path, label) pairs, read with PIL, converted to RGB and transformed; source_names: the class
    names as read, in label order (load_dataset adds classnames and template)."""

    def __init__(self, samples, source_names, transform):
        self.samples, self.source_names, self.transform = samples, source_names, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(load_image(path)), label


def _files(folder, ext=".jpg"):
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(ext))


def _caltech(which, folder):
    # One class per category folder (Caltech-101's background class left out; AGFT's convention then merges two
    # classes, _caltech101_person). Read here rather than with torchvision's classes (Caltech101 imports scipy for
    # every image); --download goes through them.
    def load(path, root, tf, train, download):
        if download and not os.path.isdir(os.path.join(path, folder)):
            import torchvision
            getattr(torchvision.datasets, which)(root, download=True)
        cats = [c for c in _subfolders(os.path.join(path, folder)) if c != "BACKGROUND_Google"]
        samples = [(os.path.join(path, folder, c, f), i) for i, c in enumerate(cats)
                   for f in _files(os.path.join(path, folder, c))]
        return ImageList(samples, cats, tf)
    return load


def _torchvision(cls_name, has_train=False, **kw):
    """A loader that builds torchvision's class (with train=... where it has a training split); its `classes` are the
    source names."""
    def load(path, root, tf, train, download):
        import torchvision
        split = {"train": train} if has_train else {}
        ds = getattr(torchvision.datasets, cls_name)(root, transform=tf, download=download, **split, **kw)
        ds.source_names = list(getattr(ds, "classes", []))
        return ds
    return load


def _eurosat(path, root, tf, train, download):
    import torchvision
    ds = torchvision.datasets.EuroSAT(root, transform=tf, download=download)
    if ds.classes != EUROSAT_FOLDERS:
        raise DataError(f"eurosat: {path} holds the class folders {ds.classes}, expected {EUROSAT_FOLDERS}")
    ds.source_names = list(ds.classes)
    return ds


def _flowers102(path, root, tf, train, download):
    # torchvision's Flowers102 reads its two .mat files with scipy; read_mat does it here without.
    if download and not all(os.path.exists(os.path.join(path, p)) for p in REQUIRED["flowers102"]):
        import torchvision
        from torchvision.datasets.utils import download_and_extract_archive, download_url
        url, files = torchvision.datasets.Flowers102._download_url_prefix, torchvision.datasets.Flowers102._file_dict
        download_and_extract_archive(url + files["image"][0], path, md5=files["image"][1])
        for key in ("label", "setid"):
            download_url(url + files[key][0], path, md5=files[key][1])
    labels = read_mat(os.path.join(path, "imagelabels.mat"))["labels"]
    ids = read_mat(os.path.join(path, "setid.mat"))["tstid"]  # the test split, 6,149 images
    samples = [(os.path.join(path, "jpg", f"image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1) for i in ids]
    return ImageList(samples, list(FLOWERS), tf)


def _imagenet(path, root, tf, train, download):
    split = os.path.join(path, "train" if train else "val")
    ds = image_folder(split, None, None, tf)
    if len(ds.classes) != 1000:
        raise DataError(f"imagenet: {split} has {len(ds.classes)} class folders, expected the 1000 ILSVRC-2012 wnid "
                        "folders (torchvision.datasets.ImageNet or ILSVRC's valprep.sh sort the val images into them)")
    ds.source_names = imagenet_classnames()
    return ds


def _tinyimagenet(path, root, tf, train, download):
    # The official zip as it is: train/<wnid>/images/*.JPEG, and val/ read through val_annotations.txt (AGFT moves the
    # val images into class folders on first use; nothing is moved here). Names: the synset's first lemma in the zip's
    # words.txt, which is AGFT's ImageNet name for the same wnid.
    with open(os.path.join(path, "wnids.txt")) as f:
        wnids = sorted(w.strip() for w in f if w.strip())
    index = {w: i for i, w in enumerate(wnids)}
    if train:
        samples = [(os.path.join(path, "train", w, "images", f), index[w]) for w in wnids
                   for f in _files(os.path.join(path, "train", w, "images"), ".jpeg")]
    else:
        with open(os.path.join(path, "val", "val_annotations.txt")) as f:
            rows = [line.split("\t")[:2] for line in f if line.strip()]
        samples = [(os.path.join(path, "val", "images", file), index[wnid]) for file, wnid in rows]
    names = wordnet_first_lemmas(os.path.join(path, "words.txt"), wnids)
    return ImageList(samples, [names[w] for w in wnids], tf)


def _imagenet_variant(name):
    def load(path, root, tf, train, download):  # ImageNet-R (200 wnids) and ImageNet-Sketch (1000), whole sets
        ds = image_folder(path, None, None, tf)
        ds.source_names = imagenet_names_for(ds.classes, root, name)
        return ds
    return load


# Each loader returns the set with `source_names`, the class names as it read them (folder names, torchvision's
# classes; ImageNet's and TinyImageNet's names as AGFT writes them), in label order; PROMPTS turns them into prompts.
LOADERS = {
    "caltech101": _caltech("Caltech101", "101_ObjectCategories"),
    "caltech256": _caltech("Caltech256", "256_ObjectCategories"),
    "cifar10": _torchvision("CIFAR10", has_train=True),
    "cifar100": _torchvision("CIFAR100", has_train=True),
    "dtd": _torchvision("DTD", split="test", partition=1),
    "eurosat": _eurosat,
    "fgvc_aircraft": _torchvision("FGVCAircraft", split="test", annotation_level="variant"),
    "flowers102": _flowers102,
    "food101": _torchvision("Food101", split="test"),
    "imagenet": _imagenet,
    "oxford_pets": _torchvision("OxfordIIITPet", split="test"),
    "pcam": _torchvision("PCAM", split="test"),
    "stanford_cars": _torchvision("StanfordCars", split="test"),
    "stl10": _torchvision("STL10", split="test"),
    "sun397": _torchvision("SUN397"),  # whole set, no split
    "tinyimagenet": _tinyimagenet,
    "country211": _torchvision("Country211", split="test"),
    "imagenet-r": _imagenet_variant("imagenet-r"),
    "imagenet-sketch": _imagenet_variant("imagenet-sketch"),
}


NEEDS = {"pcam": "h5py", "stanford_cars": "scipy"}  # optional packages torchvision needs for these


def canonical_name(name):
    """The set's name in SETS or toy.TASKS, or 'imagefolder', else None: case, '-' and '_' do not matter
    ('ImageNet_R' is 'imagenet-r', 'Toy_Size' is 'toy_size'), and torchvision's class names are understood too
    ('OxfordIIITPet', 'StanfordCars')."""
    def key(n):
        return n.lower().replace("-", "").replace("_", "")
    names = {key(n): n for n in [*SETS, *toy.TASKS, "imagefolder"]}
    return names.get({"oxfordiiitpet": "oxfordpets"}.get(key(name), key(name)))


OWN_NAMES = {*toy.TASKS, "imagefolder"}  # sets with their own class names and template, whatever --prompts says


def unprompted(names):
    """The sets among `names` whose class names and template no prompt convention changes (OWN_NAMES), if that is
    all of them (a --prompts for them alone would change nothing), else []."""
    own = [n for n in names if canonical_name(n) in OWN_NAMES]
    return own if len(own) == len(names) else []


def where(name):
    """What a set's folder should hold and whether --download can fetch it, for one-line errors."""
    folder, layout, download = SETS[name]
    download = download or "no automatic download (the README's dataset list says where to get it)"
    return f"expected <data-root>/{folder}/ to hold {layout}; {download}"


def check_dataset(name, root, train=False, download=False):
    """Raise DataError (one line) unless the set's files are where load_dataset will look (or --download can fetch
    them). Cheap: reads no images, so evaluate.py runs it before loading the model."""
    known = canonical_name(name)
    if known in OWN_NAMES:
        return
    if known is None:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(ZERO_SHOT_SETS + EXTRA_SETS)}, imagefolder, "
                        f"{', '.join(toy.TASKS)})")
    if train and known not in TRAIN_SETS:
        raise DataError(f"{known} is an evaluation set; training sets: {', '.join(TRAIN_SETS)}, imagefolder, "
                        f"{toy.TRAIN}")
    if root is None:
        raise DataError(f"{known}: no --data-root given; {where(known)}")
    path = os.path.join(root, SETS[known][0])
    required = (REQUIRED_TRAIN if train else REQUIRED).get(known, ["."])
    missing = [p for p in required if not os.path.exists(os.path.join(path, p))]
    if missing and not (download and SETS[known][2]):
        what = "not found" if not os.path.isdir(path) else f"incomplete (no {', '.join(missing)})"
        raise DataError(f"{known}: {path} {what}; {where(known)}")
    if known in NEEDS:
        try:
            __import__(NEEDS[known])
        except ImportError:
            raise DataError(f"{known}: reading {path} needs {NEEDS[known]}, which is not installed "
                            f"(pip install {NEEDS[known]})") from None


def check_datasets(names, data_root, train_set=None, scan=True):
    """One DataError line for the first of the sets (and the training set) that is missing, naming the others; then,
    with scan, each set is listed and checked as load_dataset does (two classes or more, an image folder's prompts
    distinct, every image file's header readable: scan_images). Reads no pixels of intact images and no model,
    so scripts call it before loading the model or training for hours. Under torchrun local rank 0 alone reads the
    headers; the others wait for it at harness.load_model's barrier."""
    checks = [(train_set, True)] * bool(train_set) + [(n, False) for n in names if n]
    missing = []
    for name, train in checks:
        try:
            check_dataset(name, data_root, train)
        except DataError as e:
            missing.append((name, str(e)))
    if missing:
        more = f" [also missing: {', '.join(n for n, _ in missing[1:])}]" if len(missing) > 1 else ""
        raise DataError(missing[0][1] + more)
    for name, train in checks if scan else []:
        if canonical_name(name) not in toy.TASKS:  # the toy sets are generated, not read
            load_dataset(name, data_root, 32, train)  # the resolution is unused: no image is transformed


def load_dataset(name, root, resolution, train=False, download=False, resize_small=False, prompts="agft", scan=True):
    """The dataset called `name`: its training split if train, else the split the papers evaluate.

    download: let torchvision fetch a missing set where it can. resize_small: resize CIFAR-10/100 and STL-10 to the
    model resolution in the pipeline (the TGA-ZSR/SAFT convention) instead of feeding them at native resolution.
    prompts: the convention of PROMPTS that gives the real sets their class names and template (None: agft); the
    toy world and image folders have their own.
    Checked before it is returned (DataError, one line): at least two classes, distinct prompts for an image folder,
    and with scan every image file readable (scan_images)."""
    if (prompts or "agft") not in PROMPTS:
        raise DataError(f"unknown prompt convention '{prompts}' (known: {', '.join(PROMPTS)})")
    name = canonical_name(name) or name
    if name in toy.TASKS:
        return toy.dataset(name, toy.TRAIN_SIZE if train else toy.EVAL_SIZE, toy.TRAIN_SEED if train else toy.EVAL_SEED)
    if name == "imagefolder":
        if root is None:
            raise DataError("--train-set imagefolder needs --data-root DIR (a DIR/<class name>/<images> tree)")
        ds = image_folder(root, resolution)
        check_classes(ds, f"imagefolder {root}", folders=ds.classes)
        if scan:
            scan_images(ds, "imagefolder")
        return ds
    check_dataset(name, root, train, download)
    known = canonical_name(name)
    from torchvision import transforms as T
    tf = T.PILToTensor() if known in DEVICE_RESIZED else image_transform(resolution)
    path = os.path.join(root, SETS[known][0])
    try:
        ds = LOADERS[known](path, root, tf, train, download)
    except DataError:
        raise
    except ImportError as e:
        raise DataError(f"{known}: reading {path} needs {e.name}, which is not installed "
                        f"(pip install {e.name})") from None
    except Exception as e:  # torchvision's own checks (e.g. the CIFAR/STL checksums), a missing or garbled file
        msg = (str(e).strip().splitlines() or [""])[0][:160]
        raise DataError(f"{known}: could not read {path} ({type(e).__name__}: {msg}); {where(known)}") from None
    if len(ds) == 0:
        raise DataError(f"{known}: {path} holds no images; {where(known)}")
    ds.convention, (ds.template, names) = prompts or "agft", PROMPTS[prompts or "agft"][known]
    try:
        ds.classnames = names(ds)
    except NamingError as e:
        raise DataError(str(e)) from None
    ds.resize_to = resolution if known == "tinyimagenet" or (known in SMALL_SETS and resize_small) else None
    check_classes(ds, known, prompts=False)  # the papers' own names (ds.convention): text heads warn of repeats
    if scan:
        scan_images(ds, known)
    return ds


def eval_subset(dataset, max_n, seed=0):
    """A fixed, seeded subset of at most max_n samples, so quick runs are comparable."""
    if not max_n or max_n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_n].sort().values
    sub = torch.utils.data.Subset(dataset, idx.tolist())
    sub.classnames, sub.template, sub.resize_to = dataset.classnames, dataset.template, dataset.resize_to
    sub.convention = getattr(dataset, "convention", None)
    return sub


def eval_datasets(names, data_root, resolution, max_n=None, download=False, resize_small=False, prompts=None):
    """{name: dataset} of the evaluation sets `names` (a fixed seeded subset of max_n images each if given); see
    load_dataset."""
    return {canonical_name(n) or n: eval_subset(load_dataset(n, data_root, resolution, download=download,
                                                             resize_small=resize_small, prompts=prompts), max_n)
            for n in names}
