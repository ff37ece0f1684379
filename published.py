"""Published per-dataset accuracies (%) of the seed papers' main tables (CLIP ViT-B/32, L-inf eps = 1/255),
copied as printed, one entry per evaluation protocol of this project (agft, tga, saft) with the setting its table
was measured in; match and comparison find the row to print beside an evaluation, or say why there is none."""

# Column order of each table as printed; each row below is the table's line of numbers, in that order.
_AGFT_COLS = ("caltech101", "caltech256", "cifar10", "cifar100", "dtd", "eurosat", "fgvc_aircraft", "flowers102",
              "food101", "imagenet", "oxford_pets", "pcam", "stanford_cars", "stl10", "sun397", "average")
_TGA_COLS = ("tinyimagenet", "cifar10", "cifar100", "stl10", "sun397", "food101", "oxford_pets", "flowers102", "dtd",
             "eurosat", "fgvc_aircraft", "imagenet", "caltech101", "caltech256", "stanford_cars", "pcam", "average")
_SAFT_COLS = ("tinyimagenet", "cifar10", "cifar100", "food101", "stl10", "oxford_pets", "flowers102", "dtd", "eurosat",
              "fgvc_aircraft", "caltech101", "caltech256", "stanford_cars", "pcam", "imagenet", "sun397", "average")


def _cells(cols, numbers):
    """{set: value} from a table line of numbers in the order of cols (a cell the table lacks: drop it from cols)."""
    values = [float(v) for v in numbers.split()]
    if len(values) != len(cols):
        raise ValueError(f"{len(values)} numbers for {len(cols)} columns: {numbers!r}")
    return dict(zip(cols, values))


def _without(cols, *names):
    return tuple(c for c in cols if c not in names)


PUBLISHED = {
    # Headers "FGVC" -> fgvc_aircraft, "Flower102" -> flowers102, "OxfordPet" -> oxford_pets, "Stanf.Cars" ->
    # stanford_cars. "ImageNet" is the validation set of the fine-tuning set (not zero-shot), inside the average.
    # The paper prints "AGFT (Ours)"; GLADIATOR's numbers are quoted by AGFT from the GLADIATOR paper.
    "agft": {
        "source": "AGFT (Cui et al., CVPR 2026), Table 1 (robust) and Table 2 (clean)",
        "table": "AGFT Table 1",
        "tables": {"robust": "Table 1", "clean": "Table 2"},
        "model": "ViT-B/32",
        "train_set": "imagenet",
        "prompts": ("agft",),  # every row of the table trained with AGFT's prompts
        "attack": "pgd", "steps": 20, "step_size": 1 / 255, "eps": 1 / 255, "resize_before_attack": False,
        "pretrained_row": "CLIP",
        "average_over": _AGFT_COLS[:-1],  # "Average": the plain mean of the 15 sets
        "rows": {
            "CLIP": {
                "robust": _cells(_AGFT_COLS, "21.27 11.69 10.31 4.69 2.55 0.02 0.00 1.00 4.06 1.13 2.37 0.13 0.21 33.10 1.08 6.24"),
                "clean": _cells(_AGFT_COLS, "92.03 82.81 87.19 61.15 41.17 45.40 19.25 65.34 83.61 59.53 87.32 58.26 54.10 96.89 59.01 66.20"),
            },
            "TeCoA": {
                "robust": _cells(_AGFT_COLS, "71.83 61.23 59.85 34.47 23.56 15.06 4.85 30.60 29.01 41.29 61.90 14.42 14.06 83.33 32.12 38.51"),
                "clean": _cells(_AGFT_COLS, "85.30 77.34 78.75 50.02 34.68 27.22 12.62 51.31 56.24 63.50 82.01 53.44 33.88 93.23 54.45 56.93"),
            },
            "PMG-AFT": {
                "robust": _cells(_AGFT_COLS, "77.78 63.15 65.93 39.41 26.70 15.05 5.93 33.36 39.37 35.05 65.34 18.99 20.33 86.31 32.21 41.66"),
                "clean": _cells(_AGFT_COLS, "90.25 78.33 83.24 57.26 35.42 25.93 13.97 52.79 70.03 53.57 82.58 54.22 42.21 94.73 53.96 59.23"),
            },
            "TGA-ZSR": {  # the ImageNet cells (52.80 robust, 70.96 clean) are as printed, though above CLIP's clean 59.53
                "robust": _cells(_AGFT_COLS, "71.67 64.06 63.30 36.79 22.07 13.95 4.85 27.26 28.81 52.80 65.12 30.95 14.78 85.01 31.12 40.84"),
                "clean": _cells(_AGFT_COLS, "81.70 77.45 81.18 53.45 31.70 24.81 9.98 44.19 51.31 70.96 79.91 46.48 29.34 93.52 50.10 55.07"),
            },
            "GLADIATOR": {
                "robust": _cells(_AGFT_COLS, "73.34 63.50 67.89 40.82 24.75 14.92 6.23 34.58 34.92 44.53 68.10 39.29 20.65 86.53 31.86 43.46"),
                "clean": _cells(_AGFT_COLS, "85.42 79.44 86.94 60.86 35.59 26.52 15.66 56.77 67.32 63.83 84.25 49.37 43.75 95.71 53.61 60.34"),
            },
            "AGFT": {
                "robust": _cells(_AGFT_COLS, "82.23 67.95 71.72 45.55 24.14 16.25 7.94 35.95 44.76 44.95 71.03 33.89 27.34 88.52 36.39 46.57"),
                "clean": _cells(_AGFT_COLS, "91.05 80.26 86.72 62.38 33.40 25.06 16.49 54.89 72.14 60.11 85.58 55.52 45.69 95.72 55.19 61.35"),
            },
        },
    },
    # Headers "Tiny-ImageNet" -> tinyimagenet (the fine-tuning set, inside the average), "Oxfordpets" -> oxford_pets,
    # "FGVC-Aircraft" -> fgvc_aircraft, "Caltech-101/256" -> caltech101/256. CLIP is the pre-trained model; FT-Clean
    # and FT-Adv. are CLIP fully fine-tuned on clean / adversarial TinyImageNet. The paper prints "TGA-ZSR (ours)" and
    # "Comp-TGA (ours)", each cell followed by a parenthesised spread (a std over runs), not kept here.
    "tga": {
        "source": "Complementary Text-Guided Attention (journal extension of TGA-ZSR), Table I (robust) and "
                  "Table II (clean)",
        "table": "TGA-ZSR/Comp-TGA Table I",
        "tables": {"robust": "Table I", "clean": "Table II"},
        "model": "ViT-B/32",
        "train_set": "tinyimagenet",
        "prompts": ("tga", "saft"),  # the same strings
        "attack": "pgd", "steps": 100, "step_size": 1 / 255, "eps": 1 / 255, "resize_before_attack": True,
        "pretrained_row": "CLIP",
        "average_over": _TGA_COLS[:-1],  # the plain mean of all 16 sets, TinyImageNet included
        "rows": {
            "CLIP": {  # clean: TinyImageNet and SUN397 are both 57.26 as printed
                "robust": _cells(_TGA_COLS, "0.88 2.42 0.26 26.11 1.00 6.60 3.84 1.19 2.02 0.05 0.00 1.24 19.88 12.60 0.20 0.11 4.90"),
                "clean": _cells(_TGA_COLS, "57.26 88.06 60.45 97.04 57.26 83.89 87.41 65.47 40.69 42.59 20.25 59.15 85.34 81.73 52.02 52.09 64.42"),
            },
            "FT-Clean": {
                "robust": _cells(_TGA_COLS, "13.55 19.92 4.94 40.00 0.82 0.64 2.40 0.68 2.66 0.05 0.03 1.08 14.95 9.69 0.09 1.32 7.05"),
                "clean": _cells(_TGA_COLS, "79.04 84.55 54.25 93.78 46.80 47.10 80.98 46.43 30.32 24.39 9.30 44.40 78.69 70.81 31.15 47.89 54.37"),
            },
            "FT-Adv.": {
                "robust": _cells(_TGA_COLS, "51.59 38.58 21.28 69.55 17.60 12.55 34.97 19.92 15.90 11.95 1.83 17.26 50.73 40.18 8.42 48.88 28.83"),
                "clean": _cells(_TGA_COLS, "73.83 68.96 39.69 86.89 33.37 27.74 60.10 33.45 23.14 16.49 4.86 32.06 67.41 57.72 18.11 49.91 43.36"),
            },
            "TeCoA": {
                "robust": _cells(_TGA_COLS, "37.57 30.30 17.53 67.19 19.70 14.76 36.44 22.46 17.45 12.14 1.62 18.18 55.86 41.88 8.49 47.39 28.06"),
                "clean": _cells(_TGA_COLS, "63.97 66.14 36.74 87.24 40.54 35.11 66.15 38.75 25.53 17.13 6.75 37.09 74.63 62.50 24.65 50.01 45.81"),
            },
            "FARE": {
                "robust": _cells(_TGA_COLS, "23.88 21.25 10.72 59.59 8.30 10.97 24.56 15.48 10.96 0.14 0.84 10.54 45.96 34.35 4.38 10.17 18.25"),
                "clean": _cells(_TGA_COLS, "77.54 87.58 62.80 94.33 49.91 70.02 81.47 57.10 36.33 22.69 14.19 51.78 84.04 77.50 44.35 46.07 59.85"),
            },
            "LAAT": {
                "robust": _cells(_TGA_COLS, "52.71 35.49 21.32 67.79 18.51 12.64 35.54 19.29 11.38 12.60 1.38 18.43 55.85 41.23 6.60 37.47 28.02"),
                "clean": _cells(_TGA_COLS, "73.96 63.09 39.32 84.65 35.62 26.50 58.84 32.61 19.68 19.50 3.78 33.31 72.66 58.43 16.01 51.58 43.10"),
            },
            "PMG-AFT": {
                "robust": _cells(_TGA_COLS, "47.11 46.01 25.83 74.51 22.21 19.58 41.62 23.45 15.05 12.54 1.98 21.43 62.42 45.99 11.72 48.64 32.51"),
                "clean": _cells(_TGA_COLS, "67.11 74.62 44.68 88.85 37.42 37.47 66.34 35.66 21.17 17.76 4.71 35.93 76.70 61.96 25.21 49.99 46.60"),
            },
            "TGA-ZSR": {
                "robust": _cells(_TGA_COLS, "63.95 61.45 35.27 84.22 33.22 33.97 57.75 34.55 22.08 14.27 4.75 28.74 70.97 60.06 20.40 47.76 42.09"),
                "clean": _cells(_TGA_COLS, "75.72 86.46 56.52 93.48 51.99 57.59 77.32 48.08 29.06 24.24 11.93 48.04 80.70 74.74 36.62 49.58 56.44"),
            },
            "Comp-TGA": {
                "robust": _cells(_TGA_COLS, "69.22 70.46 42.26 86.23 34.61 33.57 60.09 35.84 23.90 16.64 5.41 29.47 72.16 60.83 22.17 48.56 44.46"),
                "clean": _cells(_TGA_COLS, "76.07 84.46 55.64 92.88 51.47 54.01 76.49 46.07 29.43 23.25 11.30 46.08 80.50 73.31 36.55 49.46 55.44"),
            },
        },
    },
    # One table, a Robust block and a Clean block. Headers "ImageNet-1K" -> imagenet, "Oxfordpets" -> oxford_pets.
    # "Zero-shot Average" is over the 15 zero-shot sets; TinyImageNet (the fine-tuning set) is reported apart from it.
    # SAFT-L (CuPL's LLM descriptions) and SAFT-M (an MLLM's descriptions) are the mean of three runs; the table also
    # prints their std, not kept here. FARE's cells equal the "tga" FARE row (only its average differs: 15 sets).
    # "CLIP" here is CLIP fine-tuned on clean TinyImageNet (the paper's baseline (i)), not the pre-trained model: its
    # cells equal the "tga" FT-Clean row. Two of its cells are missing from the text it was copied from, left absent:
    # the robust FGVC-Aircraft cell (the FT-Clean row of the "tga" Table I has 0.03 there, which makes the printed
    # 6.62 the mean of the 15 sets) and the clean "Zero-shot Average".
    "saft": {
        "source": "SAFT (Zhang et al., TMLR), Table 1 (clean and robust, one table)",
        "table": "SAFT Table 1",
        "tables": {"robust": "Table 1", "clean": "Table 1"},
        "model": "ViT-B/32",
        "train_set": "tinyimagenet",
        "prompts": ("tga", "saft"),
        "attack": "pgd", "steps": 100, "step_size": 1 / 255, "eps": 1 / 255, "resize_before_attack": True,
        "pretrained_row": None,  # its "CLIP" row is a fine-tuned model
        "average_over": _SAFT_COLS[1:-1],  # "Zero-shot Average": the plain mean of the 15 sets, TinyImageNet apart
        "rows": {
            "CLIP": {
                "robust": _cells(_without(_SAFT_COLS, "fgvc_aircraft"), "13.55 19.92 4.94 0.64 40.00 2.40 0.68 2.66 0.05 14.95 9.69 0.09 1.32 1.08 0.82 6.62"),
                "clean": _cells(_without(_SAFT_COLS, "average"), "79.04 84.55 54.25 47.10 93.78 80.98 46.43 30.32 24.39 9.30 78.69 70.81 31.15 47.89 44.40 46.80"),
            },
            "TeCoA": {
                "robust": _cells(_SAFT_COLS, "31.29 31.56 16.16 14.35 65.93 34.39 19.09 16.39 10.19 1.87 52.92 40.62 8.74 45.57 15.97 16.23 26.00"),
                "clean": _cells(_SAFT_COLS, "54.59 66.78 34.37 33.60 85.90 61.81 34.06 24.79 18.83 6.42 70.67 60.08 22.23 52.32 31.85 34.53 43.08"),
            },
            "FARE": {  # the clean average is printed "58.68*" (a footnote)
                "robust": _cells(_SAFT_COLS, "23.88 21.25 10.72 10.97 59.59 24.56 15.48 10.96 0.14 0.84 45.96 34.35 4.38 10.17 10.54 8.30 17.88"),
                "clean": _cells(_SAFT_COLS, "77.54 87.58 62.80 70.02 94.33 81.47 57.10 36.33 22.69 14.19 84.04 77.50 44.35 46.07 51.78 49.91 58.68"),
            },
            "PMG-AFT": {
                "robust": _cells(_SAFT_COLS, "32.46 50.58 26.42 16.59 68.79 35.57 15.69 12.85 9.33 1.85 53.33 36.30 5.54 48.92 15.02 16.37 27.54"),
                "clean": _cells(_SAFT_COLS, "47.36 71.20 40.53 28.77 81.83 54.28 24.14 18.28 13.12 3.84 64.73 48.49 10.77 49.93 23.72 27.58 37.42"),
            },
            "TGA-ZSR": {
                "robust": _cells(_SAFT_COLS, "47.87 42.61 22.27 20.75 75.47 42.32 25.46 18.45 10.84 3.51 60.91 50.43 12.91 42.10 21.11 23.29 31.50"),
                "clean": _cells(_SAFT_COLS, "76.84 85.90 57.20 56.46 92.92 75.47 47.51 29.94 24.60 11.98 80.02 73.82 36.32 49.91 46.50 50.16 54.58"),
            },
            "SAFT-L": {
                "robust": _cells(_SAFT_COLS, "53.27 52.26 28.34 25.67 78.97 46.07 30.22 20.74 12.42 4.53 64.67 54.27 15.86 47.09 22.74 26.33 35.35"),
                "clean": _cells(_SAFT_COLS, "73.47 85.81 57.26 58.69 93.30 77.90 48.96 30.05 25.83 13.39 79.89 74.39 35.18 49.86 46.61 51.91 55.27"),
            },
            "SAFT-M": {
                "robust": _cells(_SAFT_COLS, "50.79 45.32 25.29 25.84 78.48 43.29 29.48 19.31 11.95 4.02 63.36 53.08 14.40 46.80 22.43 23.62 33.78"),
                "clean": _cells(_SAFT_COLS, "74.88 86.49 60.94 58.43 94.63 75.09 49.13 30.64 29.56 13.86 81.35 75.26 34.41 49.99 47.30 53.08 56.01"),
            },
        },
    },
}

# The row each of this project's training scripts trains, per protocol (the CLIP rows of "agft" and "tga" are
# evaluate.py on OpenAI's weights). Rows without a script (GLADIATOR, LAAT, ...) are for --paper-row.
SCRIPT_ROWS = {
    "agft": {"tecoa": "TeCoA", "pmg_aft": "PMG-AFT", "tga_zsr": "TGA-ZSR", "agft": "AGFT"},
    "tga": {"tecoa": "TeCoA", "pmg_aft": "PMG-AFT", "tga_zsr": "TGA-ZSR", "comp_tga": "Comp-TGA", "fare": "FARE"},
    # saft.py trains SAFT-L with CuPL's descriptions (its documented run); a run on the MLLM's: --paper-row SAFT-M
    "saft": {"tecoa": "TeCoA", "pmg_aft": "PMG-AFT", "tga_zsr": "TGA-ZSR", "saft": "SAFT-L", "fare": "FARE"},
}


def script_row(protocol, method, args):
    """The row a checkpoint of ours trains (SCRIPT_ROWS), or None; `tecoa.py --loss clip` trains the TGA-ZSR tables'
    FT-Adv. row, and FT-Clean's with no attack (eps 0)."""
    if method == "tecoa" and args.get("loss") == "clip":
        return None if protocol != "tga" else "FT-Clean" if not args.get("eps") else "FT-Adv."
    return SCRIPT_ROWS.get(protocol, {}).get(method)


def row_names(protocol):
    """The row names of a protocol's table(s), in the paper's order."""
    if protocol not in PUBLISHED:
        raise KeyError(f"unknown protocol {protocol!r}; known: {', '.join(PUBLISHED)}")
    return list(PUBLISHED[protocol]["rows"])


def paper_row(protocol, row):
    """{"clean": {set: acc}, "robust": {set: acc}} of one published row (a copy); "average" is the table's own."""
    rows = PUBLISHED[protocol]["rows"] if protocol in PUBLISHED else None
    if rows is None or row not in rows:
        raise KeyError(f"no row {row!r} in protocol {protocol!r}; known rows: {', '.join(row_names(protocol))}")
    return {kind: dict(cells) for kind, cells in rows[row].items()}


UNPUBLISHED = {"robustvlm": "the RobustVLM README's zero-shot averages do not name the sets they cover, so no row is "
                            "held here"}


def _say(key, value):
    if key in ("eps", "step_size"):
        return f"{key.replace('_', ' ')} {value * 255:g}/255"
    if key == "steps":
        return f"{value} attack steps"
    if key == "resize_before_attack":
        return "CIFAR/STL resized before the attack" if value else "CIFAR/STL at native resolution"
    return f"{key.replace('_', ' ')} {value}"


def _differs(a, b):
    return abs(a - b) > 1e-9 if isinstance(a, float) and isinstance(b, float) else a != b


def match(protocol, run, trained=None, row=None):
    """(row, None): the published row to print beside an evaluation, else (None, why not, one line).

    run: the evaluation's {"model", "attack", "steps", "step_size", "eps", "resize_before_attack", "prompts"};
    trained: a checkpoint of ours, {"method", "args"}, {} for anyone else's, None for OpenAI's own weights; row: one
    chosen by name (--paper-row), which skips the checks of how the checkpoint was trained."""
    if protocol not in PUBLISHED:
        return None, f"no paper row: {UNPUBLISHED.get(protocol, f'protocol {protocol} has no published table')}"
    entry = PUBLISHED[protocol]
    if run.get("prompts", entry["prompts"][0]) not in entry["prompts"]:
        return None, f"no paper row: prompts {run['prompts']} differ from {entry['table']}'s {entry['prompts'][0]}"
    for key, value in run.items():
        if key != "prompts" and _differs(value, entry[key]):
            return None, f"no paper row: {_say(key, value)} differs from {entry['table']}'s {_say(key, entry[key])}"
    if row:
        return row, None
    if trained is None:
        if entry["pretrained_row"] is None:
            return None, (f"no paper row: {entry['table']}'s CLIP row is CLIP fine-tuned on clean data, not OpenAI's "
                          "weights; --paper-row NAME chooses a row")
        return entry["pretrained_row"], None
    method, args = trained.get("method"), trained.get("args") or {}
    name = script_row(protocol, method, args)
    if name is None:
        who = method or "another codebase"
        return None, (f"no paper row: {entry['table']} has no row for a checkpoint of {who}; --paper-row NAME "
                      f"chooses one of {', '.join(row_names(protocol))}")
    for key in ("model", "train_set", "eps"):
        expected = 0.0 if key == "eps" and name == "FT-Clean" else entry[key]
        if _differs(args.get(key), expected):
            return None, (f"no paper row: trained with {_say(key, args.get(key))}, unlike {entry['table']}'s "
                          f"{_say(key, expected)}")
    if args.get("prompts") not in entry["prompts"]:
        return None, (f"no paper row: trained with prompts {args.get('prompts')}, unlike {entry['table']}'s "
                      f"{entry['prompts'][0]}")
    return name, None


def comparison(protocol, run, trained=None, row=None):
    """results.json's "paper": {"protocol", "row", "source", "clean", "robust"} for the matching row (match), else
    {"protocol", "row": None, "why"}."""
    name, why = match(protocol, run, trained, row)
    if name is None:
        return {"protocol": protocol, "row": None, "why": why}
    return {"protocol": protocol, "row": name, "source": PUBLISHED[protocol]["source"], **paper_row(protocol, name)}


def training_comparison(run, trained):
    """comparison() for the evaluation at the end of a training run: the first table with a row for its method that
    matches (tables of its training set first), else the first one's reason; None where no table has the method."""
    method, train_set = trained["method"], trained["args"].get("train_set")
    tables = sorted((p for p in SCRIPT_ROWS if script_row(p, method, trained["args"])),
                    key=lambda p: PUBLISHED[p]["train_set"] != train_set)
    found = [comparison(p, run, trained) for p in tables]
    return next((c for c in found if c["row"]), found[0] if found else None)
