"""The class names and prompt templates of each paper's code, per dataset: one prompt per class,
template.format(name). PROMPTS[convention][set] = (template, names), where names(ds) maps the loader's source names
(ds.source_names, in label order) to the names in the prompts, relabelling the set where classes merge.

agft: the AGFT paper's code. tga: the code of TGA-ZSR and Comp-TGA, whose dataset files come from TeCoA (PMG-AFT's
too): "This is a photo of a {}" without a full stop wherever a set has no template of its own, names lower-cased
(except Country211's), 101 Caltech-101 classes. saft: SAFT's code, which copies those dataset files: the same
strings. openai: OpenAI's template lists, several per set (the template is then a tuple), for evaluation only.
"""


class NamingError(Exception):
    """Class names that cannot be made (a package missing, an unknown code); data.py reports it as a DataError."""


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


def lower_spaces(name, slash=True):
    """The TeCoA family's class-name rule (TeCoA, PMG-AFT, TGA-ZSR, SAFT): lower case, '_', '-' and '/' read as
    spaces; its dataset files with prompts of their own leave '/' alone (slash=False)."""
    name = name.lower().replace("_", " ").replace("-", " ")
    return name.replace("/", " ") if slash else name


def refine(name):
    """AGFT's class-name rule: the TeCoA family's, surrounding spaces stripped."""
    return lower_spaces(name).strip()


def _caltech101_person(ds):
    """AGFT's Caltech-101: Faces and Faces_easy are one class, "person", first (100 classes); relabels ds."""
    faces = {"Faces", "Faces_easy"}
    rest = [c for c in ds.source_names if c not in faces]
    label = [0 if c in faces else 1 + rest.index(c) for c in ds.source_names]
    ds.samples = [(path, label[y]) for path, y in ds.samples]
    return ["person"] + [refine(c) for c in rest]


def _caltech256_name(c):
    # "NNN." dropped, and the "-101" suffix of the classes shared with Caltech-101 (every convention)
    return refine(c[4:].replace("-101", ""))


def _boeing(variant):
    # Variants starting with a digit 7 are Boeing 7x7s, written "Boeing 707-320" (every convention)
    return f"Boeing {variant}" if variant.startswith("7") else variant


# PCAM's two fixed prompts (so its template is "{}"): AGFT's, and the TeCoA family's, misspelt "Tthis" in its code
PCAM_AGFT = ["This is a photo of healthy lymph node tissue.", "This is a photo of lymph node tumor tissue."]
PCAM_TGA = ["Tthis is a photo of healthy lymph node tissue.", "This is a photo of lymph node tumor tissue."]


def _country_names(ds, full=False):
    # The ISO code's pycountry name, XK = Kosovo; AGFT cuts it at the first comma and reads '-' as a space (AGFT pins
    # pycountry 24.6.1; names differ between versions), the TeCoA family keeps it whole and reads '_' and '-' as
    # spaces, case kept in both.
    try:
        import pycountry
    except ImportError:
        raise NamingError("country211: its class names come from the ISO codes through pycountry, which is not installed "
                        "(pip install pycountry==24.6.1, the version AGFT pins)") from None
    names = {c.alpha_2: c.name for c in pycountry.countries}
    names["XK"] = "Kosovo"
    unknown = [c for c in ds.classes if c not in names]
    if unknown:
        raise NamingError(f"country211: folders {unknown[:5]} are not ISO 3166 country codes known to pycountry")
    if full:
        return [names[c].replace("_", " ").replace("-", " ") for c in ds.source_names]
    return [names[c].split(",")[0].replace("-", " ") for c in ds.source_names]


def _each(rule):
    """A class-name rule applied to every source name."""
    return lambda ds: [rule(c) for c in ds.source_names]


def _no_slash(name):
    return lower_spaces(name, slash=False)


GENERIC = "This is a photo of a {}"
PROMPTS = {
    "agft": {
        "caltech101": ("A photo of a {}.", _caltech101_person),
        "caltech256": ("A photo of a {}.", _each(_caltech256_name)),
        "cifar10": ("This is a photo of a {}.", _each(refine)),
        "cifar100": ("This is a photo of a {}.", _each(refine)),
        "dtd": ("A surface with a {} texture.", _each(refine)),
        "eurosat": ("A centered satellite photo of {}.", lambda ds: list(EUROSAT_NAMES)),
        "fgvc_aircraft": ("A photo of a {}, a type of aircraft.", _each(_boeing)),  # case kept
        "flowers102": ("A photo of a {}, a type of flower.", lambda ds: flowers_agft()),
        "food101": ("A photo of {}, a type of food.", _each(refine)),
        "imagenet": ("This is a photo of a {}.", _each(str)),  # Keras-style names, case kept
        "oxford_pets": ("A photo of a {}, a type of pet.", _each(refine)),
        "pcam": ("{}", lambda ds: list(PCAM_AGFT)),
        # the year (last 5 characters) dropped, '-' read as a space, case kept
        "stanford_cars": ("A photo of a {}.", _each(lambda c: c[:-5].replace("-", " "))),
        "stl10": ("This is a photo of a {}.", _each(str)),  # torchvision's names as they are
        "sun397": ("This is a photo of a {}.", _each(refine)),
        "tinyimagenet": ("This is a photo of a {}.", _each(str)),
        "country211": ("A photo I took in {}.", _country_names),
        "imagenet-r": ("This is a photo of a {}.", _each(str)),
        "imagenet-sketch": ("This is a photo of a {}.", _each(str)),
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
        "pcam": ("{}", lambda ds: list(PCAM_TGA)),
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


# ----------------------------------------------------------------------------- template ensembles
# OpenAI's zero-shot templates (the openai/CLIP repository: data/prompts.md per dataset, the 80 ImageNet ones from
# notebooks/Prompt_Engineering_for_ImageNet.ipynb), the lists CLIP_benchmark and RobustVLM evaluate with. A set
# without a list of its own (Caltech-256, TinyImageNet, ImageNet-R, ImageNet-Sketch) takes the ImageNet list, as
# CLIP_benchmark does. CIFAR-10 and CIFAR-100 share one list, STL-10 and SUN397 another.
OPENAI_IMAGENET = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)
OPENAI_CIFAR = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)
OPENAI_CALTECH101 = (
    "a photo of a {}.", "a painting of a {}.", "a plastic {}.", "a sculpture of a {}.", "a sketch of a {}.",
    "a tattoo of a {}.", "a toy {}.", "a rendition of a {}.", "a embroidered {}.", "a cartoon {}.",
    "a {} in a video game.", "a plushie {}.", "a origami {}.", "art of a {}.", "graffiti of a {}.",
    "a drawing of a {}.", "a doodle of a {}.", "a photo of the {}.", "a painting of the {}.", "the plastic {}.",
    "a sculpture of the {}.", "a sketch of the {}.", "a tattoo of the {}.", "the toy {}.", "a rendition of the {}.",
    "the embroidered {}.", "the cartoon {}.", "the {} in a video game.", "the plushie {}.", "the origami {}.",
    "art of the {}.", "graffiti of the {}.", "a drawing of the {}.", "a doodle of the {}.",
)
OPENAI_COUNTRY211 = (
    "a photo i took in {}.", "a photo i took while visiting {}.", "a photo from my home country of {}.",
    "a photo from my visit to {}.", "a photo showing the country of {}.",
)
OPENAI_DTD = (
    "a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.", "a photo of a {} object.",
    "a photo of the {} texture.", "a photo of the {} pattern.", "a photo of the {} thing.",
    "a photo of the {} object.",
)
OPENAI_CARS = (
    "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
    "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.",
)
OPENAI_LISTS = {
    "cifar10": OPENAI_CIFAR, "cifar100": OPENAI_CIFAR, "caltech101": OPENAI_CALTECH101, "dtd": OPENAI_DTD,
    "stanford_cars": OPENAI_CARS, "country211": OPENAI_COUNTRY211,
    "eurosat": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "fgvc_aircraft": ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
    "flowers102": ("a photo of a {}, a type of flower.",), "food101": ("a photo of {}, a type of food.",),
    "oxford_pets": ("a photo of a {}, a type of pet.",), "pcam": ("this is a photo of {}",),
    "stl10": ("a photo of a {}.", "a photo of the {}."), "sun397": ("a photo of a {}.", "a photo of the {}."),
}
# openai: a tuple of templates per set, an ensemble (evaluate.text_head averages their normalised text features),
# with the class names of the tga convention; PCAM's are OpenAI's two.
PROMPTS["openai"] = {name: (OPENAI_LISTS.get(name, OPENAI_IMAGENET), names)
                     for name, (_, names) in PROMPTS["tga"].items()}
PROMPTS["openai"]["pcam"] = (OPENAI_LISTS["pcam"],
                             lambda ds: ["lymph node", "lymph node containing metastatic tumor tissue"])
ENSEMBLES = {"openai"}  # conventions with several templates per set: evaluation only (the training losses take one)
