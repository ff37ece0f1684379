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
    """Resize the shorter side (bicubic), centre-crop to the model resolution, to a [0,1] tensor; no augmentation."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(resolution),
                      T.Lambda(_rgb), T.ToTensor()])


def _rgb(img):
    return to_rgb(img)


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
    if not files or key in _SCANNED:
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


def fingerprint(ds):
    """A digest of what a dataset holds, for keying caches on content rather than on a folder's path: its classes,
    template and resizing, which samples (a Subset's indices), and its images: in-memory arrays and labels by their
    bytes, image files by path relative to their common folder, size and modification time (a file that changes
    changes the digest; the same files elsewhere do not)."""
    import hashlib
    import numpy as np
    h = hashlib.sha1()

    def add(*parts):
        for part in parts:
            if isinstance(part, torch.Tensor):
                part = part.detach().cpu().contiguous().numpy()
            if isinstance(part, np.ndarray):
                h.update(f"{part.dtype} {part.shape}".encode())
                h.update(np.ascontiguousarray(part).tobytes())
            else:
                h.update(repr(part).encode())
            h.update(b"\0")
    add(list(ds.classnames), ds.template, getattr(ds, "resize_to", None), len(ds))
    while isinstance(ds, torch.utils.data.Subset):
        add("subset", list(ds.indices))
        ds = ds.dataset
    for attr in ("tensors", "data", "targets", "labels", "_labels"):  # in-memory images, and labels
        value = getattr(ds, attr, None)
        if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            add(attr, *value)
        elif isinstance(value, (np.ndarray, torch.Tensor, list)):
            add(attr, value)
    samples = getattr(ds, "samples", None) or getattr(ds, "_samples", None)
    if isinstance(samples, list):
        add("labels", [t[1] for t in samples if isinstance(t, tuple) and len(t) > 1])
    files = image_files(ds)
    folder = getattr(ds, "_base_folder", None)
    if not files and folder is not None and os.path.isdir(folder):  # e.g. PCAM's .h5 files, read lazily
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    if files:
        base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        for f in files:
            st = os.stat(f)
            add(os.path.relpath(os.path.abspath(f), base), st.st_size, st.st_mtime_ns)
    return h.hexdigest()


def check_classes(ds, name, folders=None, prompts=True):
    """Raise DataError (one line) unless the set has at least two classes whose prompts CLIP can tell apart: two
    class names that give the same tokens (after '_' -> space, case, spacing, or the cut at 77 tokens) name both
    (folders: the class folders, to name them instead)."""
    names = list(ds.classnames)
    if len(names) < 2:
        raise DataError(f"{name}: {len(names)} class{'es' * (len(names) != 1)} ({', '.join(map(repr, folders or names))}); "
                        "zero-shot classification needs at least two")
    if not prompts:
        return
    from clip.tokenizer import tokenize
    tokens = tokenize([ds.template.format(c) for c in names], 77, truncate=True)
    seen = {}
    for i, row in enumerate(map(tuple, tokens.tolist())):
        if row in seen:
            j = seen[row]
            what = "folders" if folders else "classes"
            label = folders or names
            raise DataError(f"{name}: the {what} {label[j]!r} and {label[i]!r} give the same prompt "
                            f"{ds.template.format(names[i])!r} for CLIP; rename one of them")
        seen[row] = i


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
# templates and class names follow the chosen convention (PROMPTS, below the loaders). Preprocessing: CIFAR-10/100
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

# name: (folder under --data-root, what it holds, AGFT's template, how --download does). "" = cannot be downloaded.
TV = "--download fetches it with torchvision"
SETS = {
    "caltech101": ("caltech101", "101_ObjectCategories/<category>/image_NNNN.jpg", "A photo of a {}.",
                   TV + ", though releases before pytorch/vision#9205 use dead Google Drive links"),
    "caltech256": ("caltech256", "256_ObjectCategories/NNN.<category>/NNN_NNNN.jpg", "A photo of a {}.",
                   TV + ", though releases before pytorch/vision#9205 use dead Google Drive links"),
    "cifar10": ("cifar-10-batches-py", "the CIFAR-10 python pickles batches.meta, data_batch_1..5, test_batch",
                "This is a photo of a {}.", TV),
    "cifar100": ("cifar-100-python", "the CIFAR-100 python pickles meta, train, test", "This is a photo of a {}.", TV),
    "dtd": ("dtd/dtd", "images/<texture>/*.jpg and labels/test1.txt", "A surface with a {} texture.", TV),
    "eurosat": ("eurosat/2750", "the 10 class folders AnnualCrop/ .. SeaLake/ of the RGB release",
                "A centered satellite photo of {}.", TV),
    "fgvc_aircraft": ("fgvc-aircraft-2013b/data", "variants.txt, images_variant_test.txt and images/*.jpg",
                      "A photo of a {}, a type of aircraft.", TV),
    "flowers102": ("flowers-102", "jpg/image_NNNNN.jpg, imagelabels.mat and setid.mat",
                   "A photo of a {}, a type of flower.", TV),
    "food101": ("food-101", "meta/test.json and images/<dish>/*.jpg", "A photo of {}, a type of food.", TV),
    "imagenet": ("imagenet", "the 1000 ILSVRC-2012 wnid folders val/<wnid>/*.JPEG (train/<wnid>/ for training)",
                 "This is a photo of a {}.", ""),
    "oxford_pets": ("oxford-iiit-pet", "images/*.jpg and annotations/test.txt", "A photo of a {}, a type of pet.", TV),
    "pcam": ("pcam", "camelyonpatch_level_2_split_test_x.h5 and _y.h5, read with h5py", "{}",
             TV + " and gdown, though Google Drive quotas often break it"),
    "stanford_cars": ("stanford_cars", "devkit/cars_meta.mat, cars_test_annos_withlabels.mat and cars_test/*.jpg, "
                      "read with scipy", "A photo of a {}.", ""),
    "stl10": ("stl10_binary", "test_X.bin, test_y.bin and class_names.txt", "This is a photo of a {}.", TV),
    "sun397": ("SUN397", "ClassName.txt and <letter>/<category>/sun_*.jpg", "This is a photo of a {}.",
               "--download tries torchvision's URL, reported dead in pytorch/vision#9348"),
    "tinyimagenet": ("tiny-imagenet-200", "the official zip as it is: wnids.txt, words.txt, "
                     "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt",
                     "This is a photo of a {}.", ""),
    "country211": ("country211", "test/<ISO country code>/*.jpg", "A photo I took in {}.", TV),
    "imagenet-r": ("imagenet-r", "<wnid>/*.jpg, 200 wnid folders", "This is a photo of a {}.", ""),
    "imagenet-sketch": ("sketch", "<wnid>/*.JPEG, the 1000 wnid folders", "This is a photo of a {}.", ""),
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
EUROSAT_NAMES = ["annual crop land", "a forest", "brushland or shrubland", "a highway or a road",
                 "industrial buildings", "pasture land", "permanent crop land", "residential buildings", "a river",
                 "a sea or a lake"]  # every convention
# The 102 Oxford flowers in label order (label 1 first), as usually written. AGFT reads "-" as a space and drops "?"
# and "'" (flowers_agft); the TeCoA family's list has no "'" either ("colts foot"), and it reads "-" as a space but
# keeps the "?". Both lists write "cyclamen " and "hippeastrum " with a trailing space, which is kept, so the prompts
# are the papers' to the character (CLIP's tokenizer drops the space).
FLOWERS = (
    "pink primrose|hard-leaved pocket orchid|canterbury bells|sweet pea|english marigold|tiger lily|moon orchid|"
    "bird of paradise|monkshood|globe thistle|snapdragon|colt's foot|king protea|spear thistle|yellow iris|"
    "globe-flower|purple coneflower|peruvian lily|balloon flower|giant white arum lily|fire lily|pincushion flower|"
    "fritillary|red ginger|grape hyacinth|corn poppy|prince of wales feathers|stemless gentian|artichoke|"
    "sweet william|carnation|garden phlox|love in the mist|mexican aster|alpine sea holly|ruby-lipped cattleya|"
    "cape flower|great masterwort|siam tulip|lenten rose|barbeton daisy|daffodil|sword lily|poinsettia|"
    "bolero deep blue|wallflower|marigold|buttercup|oxeye daisy|common dandelion|petunia|wild pansy|primula|"
    "sunflower|pelargonium|bishop of llandaff|gaura|geranium|orange dahlia|pink-yellow dahlia?|cautleya spicata|"
    "japanese anemone|black-eyed susan|silverbush|californian poppy|osteospermum|spring crocus|bearded iris|"
    "windflower|tree poppy|gazania|azalea|water lily|rose|thorn apple|morning glory|passion flower|lotus|toad lily|"
    "anthurium|frangipani|clematis|hibiscus|columbine|desert-rose|tree mallow|magnolia|cyclamen |watercress|"
    "canna lily|hippeastrum |bee balm|ball moss|foxglove|bougainvillea|camellia|mallow|mexican petunia|bromelia|"
    "blanket flower|trumpet creeper|blackberry lily").split("|")


def flowers_agft():
    """The Flowers102 class names as AGFT writes them."""
    return [n.replace("-", " ").replace("?", "").replace("'", "") for n in FLOWERS]


def refine(name):
    """AGFT's class-name rule: lower case, '_', '-' and '/' read as spaces, surrounding spaces stripped."""
    return name.lower().replace("_", " ").replace("-", " ").replace("/", " ").strip()


def lower_spaces(name, slash=True):
    """The TeCoA family's class-name rule (TeCoA, PMG-AFT, TGA-ZSR, SAFT): refine without the strip; its dataset files
    with prompts of their own leave '/' alone (slash=False)."""
    name = name.lower().replace("_", " ").replace("-", " ")
    return name.replace("/", " ") if slash else name


def imagenet_classnames():
    """The 1000 ImageNet names in sorted-wnid order as AGFT writes them: torchvision's short Keras-style names with
    '-' read as a space, case kept. torchvision tells the two homonym pairs apart ("crane bird", "maillot tank suit");
    AGFT's names file does not, so neither do we. The TeCoA family lower-cases the same names (PROMPTS); FARE uses
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


def _caltech101(path, root, tf, train, download):
    # The 101 category folders (the background class left out), one class each; AGFT's convention then merges two
    # (_caltech101_person). Read here rather than with torchvision's Caltech101, which imports scipy for every image.
    if download and not os.path.isdir(os.path.join(path, "101_ObjectCategories")):
        import torchvision
        torchvision.datasets.Caltech101(root, download=True)
    cats = _subfolders(os.path.join(path, "101_ObjectCategories"))
    cats = [c for c in cats if c != "BACKGROUND_Google"]
    samples = [(os.path.join(path, "101_ObjectCategories", c, f), i) for i, c in enumerate(cats)
               for f in _files(os.path.join(path, "101_ObjectCategories", c))]
    return ImageList(samples, cats, tf)


def _caltech101_person(ds):
    """AGFT's Caltech-101: Faces and Faces_easy are one class, "person", first (100 classes); relabels ds."""
    faces = {"Faces", "Faces_easy"}
    rest = [c for c in ds.source_names if c not in faces]
    label = [0 if c in faces else 1 + rest.index(c) for c in ds.source_names]
    ds.samples = [(path, label[y]) for path, y in ds.samples]
    return ["person"] + [refine(c) for c in rest]


def _caltech256(path, root, tf, train, download):
    # "NNN.name" folders (class names: _caltech256_name)
    if download and not os.path.isdir(os.path.join(path, "256_ObjectCategories")):
        import torchvision
        torchvision.datasets.Caltech256(root, download=True)
    cats = _subfolders(os.path.join(path, "256_ObjectCategories"))
    samples = [(os.path.join(path, "256_ObjectCategories", c, f), i) for i, c in enumerate(cats)
               for f in _files(os.path.join(path, "256_ObjectCategories", c))]
    return ImageList(samples, cats, tf)


def _caltech256_name(c):
    # "NNN." dropped, and the "-101" suffix of the classes shared with Caltech-101 (every convention)
    return refine(c[4:].replace("-101", ""))


def _torchvision(cls_name, **kw):
    """A loader that builds torchvision's class; its `classes` are the source names."""
    def load(path, root, tf, train, download):
        import torchvision
        ds = getattr(torchvision.datasets, cls_name)(root, transform=tf, download=download, **kw)
        ds.source_names = list(getattr(ds, "classes", []))
        return ds
    return load


def _cifar(cls_name):
    def load(path, root, tf, train, download):
        import torchvision
        ds = getattr(torchvision.datasets, cls_name)(root, train=train, transform=tf, download=download)
        ds.source_names = list(ds.classes)
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


def _boeing(variant):
    # Variants starting with a digit 7 are Boeing 7x7s, written "Boeing 707-320" (every convention)
    return f"Boeing {variant}" if variant.startswith("7") else variant


def _pcam_names(ds):
    # AGFT's fixed prompts, so the template is "{}"; FARE uses "a histopathology slide showing {}".
    return ["This is a photo of healthy lymph node tissue.", "This is a photo of lymph node tumor tissue."]


def _pcam_names_tecoa(ds):
    # The TeCoA family's, misspelt "Tthis" in its code
    return ["Tthis is a photo of healthy lymph node tissue.", "This is a photo of lymph node tumor tissue."]


def _country_names(ds, full=False):
    # The ISO code's pycountry name, XK = Kosovo; AGFT cuts it at the first comma and reads '-' as a space (AGFT pins
    # pycountry 24.6.1; names differ between versions), the TeCoA family keeps it whole and reads '_' and '-' as
    # spaces, case kept in both.
    try:
        import pycountry
    except ImportError:
        raise DataError("country211: its class names come from the ISO codes through pycountry, which is not installed "
                        "(pip install pycountry==24.6.1, the version AGFT pins)") from None
    names = {c.alpha_2: c.name for c in pycountry.countries}
    names["XK"] = "Kosovo"
    unknown = [c for c in ds.classes if c not in names]
    if unknown:
        raise DataError(f"country211: folders {unknown[:5]} are not ISO 3166 country codes known to pycountry")
    if full:
        return [names[c].replace("_", " ").replace("-", " ") for c in ds.source_names]
    return [names[c].split(",")[0].replace("-", " ") for c in ds.source_names]


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
    "caltech101": _caltech101,
    "caltech256": _caltech256,
    "cifar10": _cifar("CIFAR10"),
    "cifar100": _cifar("CIFAR100"),
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


def _each(rule):
    """A class-name rule applied to every source name."""
    return lambda ds: [rule(c) for c in ds.source_names]


def _no_slash(name):
    return lower_spaces(name, slash=False)


# --- prompt conventions ---
# One prompt per class, template.format(name): {convention: {set: (template, names)}}, where names(ds) maps the
# loader's source names to the names in the prompts (relabelling the set where classes merge).
# agft: the AGFT paper's code. tga: the code of TGA-ZSR and Comp-TGA, whose dataset files come from TeCoA (PMG-AFT's
# too): the template "This is a photo of a {}" without a full stop wherever a set has no template of its own, names
# lower-cased (except Country211's), 101 Caltech-101 classes. saft: SAFT's code, which copies those dataset files, so
# the same strings as tga.
GENERIC = "This is a photo of a {}"
PROMPTS = {
    "agft": {
        "caltech101": (SETS["caltech101"][2], _caltech101_person),
        "caltech256": (SETS["caltech256"][2], _each(_caltech256_name)),
        "cifar10": (SETS["cifar10"][2], _each(refine)),
        "cifar100": (SETS["cifar100"][2], _each(refine)),
        "dtd": (SETS["dtd"][2], _each(refine)),
        "eurosat": (SETS["eurosat"][2], lambda ds: list(EUROSAT_NAMES)),
        "fgvc_aircraft": (SETS["fgvc_aircraft"][2], _each(_boeing)),  # case kept
        "flowers102": (SETS["flowers102"][2], lambda ds: flowers_agft()),
        "food101": (SETS["food101"][2], _each(refine)),
        "imagenet": (SETS["imagenet"][2], _each(str)),  # Keras-style names, case kept
        "oxford_pets": (SETS["oxford_pets"][2], _each(refine)),
        "pcam": (SETS["pcam"][2], _pcam_names),
        # the year (last 5 characters) dropped, '-' read as a space, case kept
        "stanford_cars": (SETS["stanford_cars"][2], _each(lambda c: c[:-5].replace("-", " "))),
        "stl10": (SETS["stl10"][2], _each(str)),  # torchvision's names as they are
        "sun397": (SETS["sun397"][2], _each(refine)),
        "tinyimagenet": (SETS["tinyimagenet"][2], _each(str)),
        "country211": (SETS["country211"][2], _country_names),
        "imagenet-r": (SETS["imagenet-r"][2], _each(str)),
        "imagenet-sketch": (SETS["imagenet-sketch"][2], _each(str)),
    },
    "tga": {
        "caltech101": (GENERIC, _each(lower_spaces)),  # "faces", "faces easy", "leopards", ...
        "caltech256": ("A photo of a {}.", _each(_caltech256_name)),
        "cifar10": (GENERIC, _each(lower_spaces)),
        "cifar100": (GENERIC, _each(lower_spaces)),
        "dtd": ("A surface with a {} texture.", _each(_no_slash)),
        "eurosat": ("A centered satellite photo of {}.", lambda ds: list(EUROSAT_NAMES)),
        "fgvc_aircraft": ("A photo of a {}, a type of aircraft.",
                          _each(lambda c: _boeing(c).lower().replace("_", " "))),  # hyphens kept: "boeing 707-320"
        "flowers102": ("A photo of a {}, a type of flower.",
                       _each(lambda c: _no_slash(c.replace("'", "")))),  # "pink yellow dahlia?"
        "food101": ("A photo of {}, a type of food.", _each(_no_slash)),
        "imagenet": (GENERIC, _each(lower_spaces)),
        "oxford_pets": ("A photo of a {}, a type of pet.", _each(_no_slash)),
        "pcam": ("{}", _pcam_names_tecoa),
        "stanford_cars": ("A photo of a {}.", _each(lambda c: _no_slash(c[:-5]))),  # "ram c/v cargo van minivan"
        "stl10": (GENERIC, _each(lower_spaces)),
        "sun397": (GENERIC, _each(lower_spaces)),
        "tinyimagenet": (GENERIC, _each(lower_spaces)),
        "country211": ("A photo I took in {}.", lambda ds: _country_names(ds, full=True)),
        "imagenet-r": (GENERIC, _each(lower_spaces)),
        "imagenet-sketch": (GENERIC, _each(lower_spaces)),  # not in their code: its generic rule
    },
}
PROMPTS["saft"] = PROMPTS["tga"]
NEEDS = {"pcam": "h5py", "stanford_cars": "scipy"}  # optional packages torchvision needs for these


def canonical_name(name):
    """The set's name in SETS, or None: case, '-' and '_' do not matter ('ImageNet_R' is 'imagenet-r'), and
    torchvision's class names are understood too ('OxfordIIITPet', 'StanfordCars')."""
    def key(n):
        return n.lower().replace("-", "").replace("_", "")
    return {key(n): n for n in SETS}.get({"oxfordiiitpet": "oxfordpets"}.get(key(name), key(name)))


def where(name):
    """What a set's folder should hold and whether --download can fetch it, for one-line errors."""
    folder, layout, _, download = SETS[name]
    download = download or "no automatic download (the README's dataset list says where to get it)"
    return f"expected <data-root>/{folder}/ to hold {layout}; {download}"


def check_dataset(name, root, train=False, download=False):
    """Raise DataError (one line) unless the set's files are where load_dataset will look (or --download can fetch
    them). Cheap: reads no images, so evaluate.py runs it before loading the model."""
    if name == TOY_TRAIN or name in TOY_HELDOUT or name == "imagefolder":
        return
    known = canonical_name(name)
    if known is None:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(ZERO_SHOT_SETS + EXTRA_SETS)}, imagefolder, "
                        f"{TOY_TRAIN}, {', '.join(TOY_HELDOUT)})")
    if train and known not in TRAIN_SETS:
        raise DataError(f"{known} is an evaluation set; training sets: {', '.join(TRAIN_SETS)}, imagefolder, "
                        f"{TOY_TRAIN}")
    if root is None:
        raise DataError(f"{known}: no --data-root given; {where(known)}")
    path = os.path.join(root, SETS[known][0])
    required = (REQUIRED_TRAIN if train else REQUIRED).get(known, ["."])
    missing = [p for p in required if not os.path.exists(os.path.join(path, p))]
    if missing and not (download and SETS[known][3]):
        what = "not found" if not os.path.isdir(path) else f"incomplete (no {', '.join(missing)})"
        raise DataError(f"{known}: {path} {what}; {where(known)}")
    if known in NEEDS:
        try:
            __import__(NEEDS[known])
        except ImportError:
            raise DataError(f"{known}: reading {path} needs {NEEDS[known]}, which is not installed "
                            f"(pip install {NEEDS[known]})") from None


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
    if name == TOY_TRAIN or name in TOY_HELDOUT:
        return toy_dataset(name, TOY_TRAIN_SIZE if train else TOY_EVAL_SIZE, seed=TOY_TRAIN_SEED if train else TOY_EVAL_SEED)
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
    ds.template, names = PROMPTS[prompts or "agft"][known]
    ds.classnames = names(ds)
    ds.resize_to = resolution if known == "tinyimagenet" or (known in SMALL_SETS and resize_small) else None
    check_classes(ds, known, prompts=False)  # the papers' own names: ImageNet's "crane" and "maillot" come twice
    if scan:
        scan_images(ds, known)
    return ds


# --- the toy world ---
# A procedurally generated world of coloured shapes on textured backgrounds, with captions: the offline stand-in
# for web image-text pairs (pre-training), ImageNet (fine-tuning) and the zero-shot transfer sets (held out).
# Every image holds 1-3 copies of one shape, all of one colour and one size, grouped in one half of the image, on a
# grey background with a texture. Images are rendered in batches from signed-distance functions, all in torch, and
# are a deterministic function of the seed. Fine-tuning labels ("toy", playing ImageNet) are colour x position
# ("a photo of a red object on the left side.") over images of the whole world; the held-out zero-shot tasks
# (playing the transfer sets) never use those labels: two ask about attributes no fine-tuning label names (size,
# count), one groups the fine-tuning classes differently (colour alone, as CIFAR-10's classes group ImageNet's).
# Shape and background texture are nuisance attributes: in the pictures and the captions, but the tiny ViT does
# not learn them reliably within its pre-training budget, so no task asks about them.

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

TOY_TRAIN = "toy"  # fine-tuning task: "a photo of a {colour} object on the {position} side." (32 classes)
TOY_TRAIN_NAMES = [f"{c} object on the {p} side" for c in TOY_COLOURS for p in TOY_POSITIONS]
TOY_TASKS = {  # task -> (attribute, class names, template); class i of a held-out task is value i of its attribute
    TOY_TRAIN: (None, TOY_TRAIN_NAMES, "a photo of a {}."),
    "toy_size": ("size", TOY_SIZES, "a photo of {} objects."),  # the best of 8 templates on images of another seed
    "toy_count": ("count", [f"{c} object{'s' * (i > 0)}" for i, c in enumerate(TOY_COUNTS)], "a photo of {}."),
    "toy_colour": ("colour", list(TOY_COLOURS), "a photo of a {} object."),
}
TOY_HELDOUT = [t for t in TOY_TASKS if t != TOY_TRAIN]
TOY_TRAIN_SIZE, TOY_EVAL_SIZE = 50_000, 300
TOY_TRAIN_SEED, TOY_EVAL_SEED = 0, 1
TOY_EPS = 16 / 255  # at 32 px an L-inf eps buys ~7x less L2 norm than at 224 px: 16/255 here ~ 2.3/255 on ViT-B/32


def toy_train_label(colour, position):
    """The fine-tuning class (index into TOY_TRAIN_NAMES) of a colour and a position index, scalars or tensors."""
    return colour * len(TOY_POSITIONS) + position


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
    colour = torch.tensor(list(TOY_COLOURS.values()))[a["colour"]] * _u(g, n, 1, lo=0.85, hi=1.05)
    colour = (colour + _u(g, n, 3, lo=-0.05, hi=0.05)).clamp(0, 1)[:, :, None, None]
    for k in range(3):
        img = img + alpha[:, k:k + 1] * (colour - img)
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)


TOY_CAPTION_P = {"size": 0.75, "colour": 0.75, "object": 0.15, "position": 0.8, "background": 0.8, "negation": 0.3}
TOY_GROUPED = 0.5  # share of a pre-training batch drawn as minimal sets (images that differ in one attribute only)
TOY_VARIED = {"size": 3, "position": 2, "count": 2, "colour": 1, "shape": 1, "background": 1}  # weights of the varied one
TOY_PREFIXES = ["a photo of", "an image of", "a picture of", "this is a photo of"]


def toy_minimal_sets(n, g, grouped=TOY_GROUPED, varied=TOY_VARIED):
    """n attribute draws of which a share `grouped` comes in minimal sets: up to 4 images that agree in every
    attribute but one, each with a different value of it. In random batches most captions can be matched from
    colour alone; a minimal set can only be told apart by its varied attribute, which is how the tiny ViT learns
    size, count and position within minutes. Returns (attributes, must), where must[i] names the attribute image
    i's caption has to mention (None outside the sets)."""
    a = toy_attributes(n, g)
    must, names, w = [None] * n, list(varied), torch.tensor([float(v) for v in varied.values()])
    i, end = 0, int(grouped * n)
    while i < end:
        attr = names[int(torch.multinomial(w, 1, generator=g))]
        k = min(4, len(TOY_ATTRS[attr]), end - i)
        if k < 2:
            break
        values = torch.randperm(len(TOY_ATTRS[attr]), generator=g)[:k]
        for key in a:
            a[key][i:i + k] = a[key][i]
        a[attr][i:i + k] = values
        must[i:i + k] = [attr] * k
        i += k
    return a, must


def _plural(noun):
    return noun + ("es" if noun == "cross" else "s")


def _toy_caption(a, i, rng, must=None, p=TOY_CAPTION_P):
    """One caption for image i from a small grammar; each attribute is mentioned with probability p[attribute]
    (the noun is replaced by "object" with p["object"]), and always if it is `must`, so the text tower also learns
    partial descriptions. With p["negation"] a negated sentence follows ("this is not a photo of a blue object on
    the left side"), naming a fine-tuning class the image is not: Comp-TGA's non-class prompts are in the language
    it learns."""
    q = {k: (1.0 if k == must else v) for k, v in p.items()}
    if must == "shape":
        q["object"] = 0.0
    colours = list(TOY_COLOURS)
    m, shape, colour = int(a["count"][i]) + 1, TOY_SHAPES[a["shape"][i]], colours[a["colour"][i]]
    words = [rng.choice(TOY_PREFIXES)]
    adj = [w for w, k in ((TOY_SIZES[a["size"][i]], "size"), (colour, "colour")) if rng.random() < q[k]]
    noun = "object" if rng.random() < q["object"] else shape
    if m == 1:
        words.append("one" if rng.random() < 0.3 else ("an" if (adj[0] if adj else noun)[0] in "aeiou" else "a"))
        words += adj + [noun]
    else:
        words += [TOY_COUNTS[m - 1]] + adj + [_plural(noun)]
    phrases = [w for w, k in ((f"on the {TOY_POSITIONS[a['position'][i]]} side", "position"),
                              (f"on a {TOY_BACKGROUNDS[a['background'][i]]} background", "background"))
               if rng.random() < q[k]]
    rng.shuffle(phrases)
    text = " ".join(words + phrases)
    if rng.random() < q["negation"]:  # a fine-tuning class the image is not
        own = int(toy_train_label(a["colour"][i], a["position"][i]))
        wrong = rng.choice([n for k, n in enumerate(TOY_TRAIN_NAMES) if k != own])
        return f"{text}. this is not a photo of a {wrong}" + ("." if rng.random() < 0.5 else "")
    return text + ("." if rng.random() < 0.5 else "")


def toy_caption_batch(n, g):
    """n fresh images [n, 3, 32, 32] (float, [0,1]) and their captions, drawn with the torch generator g."""
    import random
    a, must = toy_minimal_sets(n, g)
    rng = random.Random(int(torch.randint(2 ** 62, (), generator=g)))
    return toy_render(a, g), [_toy_caption(a, i, rng, must[i]) for i in range(n)]


class ToyDataset(torch.utils.data.TensorDataset):
    resize_to = None  # fed at native resolution; the model upsamples

    def __init__(self, images, labels, classnames, template):
        super().__init__(images, labels)
        self.classnames, self.template = classnames, template


def toy_dataset(task, n, seed, chunk=1024):
    """n labelled images of a toy task (uint8 [3,32,32], int label), from the full world distribution."""
    if task not in TOY_TASKS:
        raise DataError(f"unknown toy task '{task}' (known: {', '.join(TOY_TASKS)})")
    attr, classnames, template = TOY_TASKS[task]
    g = torch.Generator().manual_seed(seed * 1000 + list(TOY_TASKS).index(task))
    images, labels = [], []
    for start in range(0, n, chunk):
        a = toy_attributes(min(chunk, n - start), g)
        images.append((toy_render(a, g) * 255).round().to(torch.uint8))
        labels.append(toy_train_label(a["colour"], a["position"]) if attr is None else a[attr])
    return ToyDataset(torch.cat(images), torch.cat(labels), classnames, template)


def toy_descriptions():
    """SAFT-style descriptions (class name -> list of descriptions) for every class of every toy task.

    Six per class describe it in the captions' own language (counts, sizes, the class named), so each is
    informative; two are in words the tiny CLIP never saw, the way an LLM's descriptions mix useful and
    hallucinated ones. SAFT's filtering ranks them by their similarity to the bare class name and keeps the top K.
    """
    side = {"left": "the left half", "right": "the right half", "top": "the upper half", "bottom": "the lower half"}
    desc = {}
    for name in TOY_TRAIN_NAMES:
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
           for c in TOY_COLOURS},
        "one object": ["a picture of one large object.", "this is a photo of one small object.", "a lonely single item."],
        "two objects": ["a picture of two large objects.", "this is a photo of two small objects.", "a matching pair."],
        "three objects": ["a picture of three large objects.", "this is a photo of three small objects.",
                          "a trio in a row."],
    }
    for task in TOY_HELDOUT:
        attr, classnames, template = TOY_TASKS[task]
        for name in classnames:
            tail = template.format(name)[len("a photo of "):]
            desc[name] = [template.format(name), f"an image of {tail}", f"a picture of {tail}"] + extra[name]
    return desc
