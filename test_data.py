"""Dataset tests: tiny fake copies of every set in its real on-disk format, loaded through data.load_dataset.

CPU, offline, nothing downloaded. Run: python -m pytest -q test_data.py
"""
import json
import os
import pickle
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate

ROOT = os.path.dirname(os.path.abspath(__file__))
RES = 32  # the "model resolution" of these tests


# ----------------------------------------------------------------------------- writing fake files


def img(path, w=12, h=10, value=90, mode="RGB"):
    """A small solid image; the format follows the extension (.jpg, .JPEG -> JPEG)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, (w, h), value if mode == "L" else (value, 255 - value, 40)).save(path)


def text(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def write_mat(path, arrays):
    """A MATLAB 5 .mat file of double row vectors, uncompressed (the format MATLAB's save -v6 writes)."""
    def element(kind, payload):
        return struct.pack("<II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)
    body = b""
    for name, values in arrays.items():
        values = np.asarray(values, dtype="<f8")
        matrix = (element(6, struct.pack("<II", 6, 0))  # array flags: class double
                  + element(5, struct.pack("<ii", 1, len(values)))  # dimensions 1 x n
                  + element(1, name.encode()) + element(9, values.tobytes()))
        body += element(14, matrix)
    header = b"MATLAB 5.0 MAT-file, written by nanoZSAR's tests".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100)
    with open(path, "wb") as f:
        f.write(header + b"IM" + body)


def load(name, root, **kw):
    return data.load_dataset(name, str(root), RES, **kw)


def check(ds, n, classnames, template, shape=(3, RES, RES), dtype=torch.float32):
    """Size, names, prompts, label range and image size of a loaded set."""
    assert len(ds) == n
    assert ds.classnames == classnames and ds.template == template
    assert data.prompts(ds) == [template.format(c) for c in classnames]
    for i in range(len(ds)):
        x, y = ds[i]
        assert tuple(x.shape) == shape and x.dtype == dtype
        assert 0 <= int(y) < len(classnames)
    return [int(ds[i][1]) for i in range(len(ds))]


def one_line_error(match, fn, *args, **kw):
    with pytest.raises(data.DataError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture
def no_checksums(monkeypatch):
    """torchvision checks the MD5 of the CIFAR and STL-10 files, which fake copies cannot match."""
    import torchvision
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)


# ----------------------------------------------------------------------------- the zero-shot sets


def test_caltech101_merges_the_faces_into_person(tmp_path):
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    for c in ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "car_side"]:
        for i in (1, 2):
            img(str(cats / c / f"image_{i:04d}.jpg"), mode="L" if c == "car_side" else "RGB")  # grey JPEGs occur
    labels = check(load("caltech101", tmp_path), 8, ["person", "leopards", "car side"], "A photo of a {}.")
    assert labels == [0, 0, 0, 0, 1, 1, 2, 2]


def test_caltech256_drops_number_and_101_suffix(tmp_path):
    cats = tmp_path / "caltech256" / "256_ObjectCategories"
    for c in ["001.ak47", "145.motorbikes-101", "257.clutter"]:
        img(str(cats / c / f"{c[:3]}_0001.jpg"))
    text(str(cats / "001.ak47" / "notes.txt"), ["not an image"])
    labels = check(load("caltech256", tmp_path), 3, ["ak47", "motorbikes", "clutter"], "A photo of a {}.")
    assert labels == [0, 1, 2]


def write_cifar(root, n=4, hundred=False):
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder)
    names = ["apple", "aquarium_fish", "baby"] if hundred else ["airplane", "automobile", "bird"]
    key, meta, batch = ("fine_label", "meta", "test") if hundred else ("label", "batches.meta", "test_batch")
    with open(folder / meta, "wb") as f:
        pickle.dump({f"{key}_names": names}, f)
    entry = {"data": np.arange(n * 3072, dtype=np.uint8).reshape(n, 3072), f"{key}s": [i % 3 for i in range(n)]}
    for file in [batch] + ([] if hundred else [f"data_batch_{i}" for i in range(1, 6)]):
        with open(folder / file, "wb") as f:
            pickle.dump(entry, f)


def test_cifar_native_resolution_unless_resized(tmp_path, no_checksums):
    write_cifar(tmp_path)
    write_cifar(tmp_path, hundred=True)
    names = ["airplane", "automobile", "bird"]
    assert check(load("cifar10", tmp_path), 4, names, "This is a photo of a {}.", (3, 32, 32), torch.uint8) == [0, 1, 2, 0]
    x, _ = data.load_dataset("cifar10", str(tmp_path), 48, resize_small=True)[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    check(load("cifar100", tmp_path), 4, ["apple", "aquarium fish", "baby"], "This is a photo of a {}.", (3, 32, 32),
          torch.uint8)
    assert len(load("cifar10", tmp_path, train=True)) == 20  # five training batches


def test_cifar_with_bad_checksums_is_one_line_error(tmp_path):
    write_cifar(tmp_path)
    msg = one_line_error("could not read", load, "cifar10", tmp_path)
    assert "cifar-10-batches-py" in msg and "--download" in msg


def test_stl10_native_resolution(tmp_path, no_checksums):
    folder = tmp_path / "stl10_binary"
    os.makedirs(folder)
    np.random.default_rng(0).integers(0, 255, (3, 3, 96, 96), dtype=np.uint8).tofile(folder / "test_X.bin")
    np.array([1, 10, 4], dtype=np.uint8).tofile(folder / "test_y.bin")  # labels are stored 1-based
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    text(str(folder / "class_names.txt"), names)
    ds = load("stl10", tmp_path)
    assert check(ds, 3, names, "This is a photo of a {}.", (3, 96, 96), torch.uint8) == [0, 9, 3]
    assert load("stl10", tmp_path, resize_small=True)[0][0].shape == (3, RES, RES)


def test_dtd_test_split_partition_1(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    for c in ["banded", "zig-zagged"]:
        img(str(base / "images" / c / f"{c}_0001.jpg"), w=20, h=14)
    text(str(base / "labels" / "test1.txt"), ["zig-zagged/zig-zagged_0001.jpg", "banded/banded_0001.jpg"])
    text(str(base / "labels" / "test2.txt"), ["banded/banded_0001.jpg"])
    labels = check(load("dtd", tmp_path), 2, ["banded", "zig zagged"], "A surface with a {} texture.")
    assert labels == [1, 0]


def test_eurosat_fixed_names(tmp_path):
    for c in data.EUROSAT_FOLDERS:
        img(str(tmp_path / "eurosat" / "2750" / c / f"{c}_1.jpg"), w=64, h=64)
    labels = check(load("eurosat", tmp_path), 10, data.EUROSAT_NAMES, "A centered satellite photo of {}.")
    assert labels == list(range(10)) and data.EUROSAT_NAMES[2] == "brushland or shrubland"
    os.rename(tmp_path / "eurosat" / "2750" / "SeaLake", tmp_path / "eurosat" / "2750" / "Sea")
    one_line_error("class folders", load, "eurosat", tmp_path)


def test_fgvc_aircraft_variants_with_boeing(tmp_path):
    base = tmp_path / "fgvc-aircraft-2013b" / "data"
    text(str(base / "variants.txt"), ["707-320", "A300B4", "Cessna 172"])
    text(str(base / "images_variant_test.txt"), ["0034309 707-320", "0062781 Cessna 172"])
    for i in ("0034309", "0062781"):
        img(str(base / "images" / f"{i}.jpg"), w=30, h=20)
    labels = check(load("FGVCAircraft", tmp_path), 2, ["Boeing 707-320", "A300B4", "Cessna 172"],
                   "A photo of a {}, a type of aircraft.")
    assert labels == [0, 2]


def test_flowers102_test_split_without_scipy(tmp_path):
    base = tmp_path / "flowers-102"
    for i in range(1, 6):
        img(str(base / "jpg" / f"image_{i:05d}.jpg"))
    write_mat(str(base / "imagelabels.mat"), {"labels": [1, 102, 5, 77, 1]})
    write_mat(str(base / "setid.mat"), {"trnid": [1], "valid": [5], "tstid": [2, 3, 4]})
    names = data.flowers_agft()
    assert len(names) == 102 and names[1] == "hard leaved pocket orchid" and names[59] == "pink yellow dahlia"
    assert names[11] == "colts foot" and names[87] == "cyclamen "  # as AGFT writes them
    assert check(load("flowers102", tmp_path), 3, names, "A photo of a {}, a type of flower.") == [101, 4, 76]


def test_read_mat_matches_scipy(tmp_path):
    sio = pytest.importorskip("scipy.io")
    for compress in (False, True):
        path = str(tmp_path / f"x{compress}.mat")
        sio.savemat(path, {"labels": np.array([[3.0, 1.0, 2.0]]), "tstid": np.arange(1, 300, dtype=np.uint16)[None],
                           "small": np.array([[7]], dtype=np.uint8), "words": "text is skipped"},
                    do_compression=compress)
        arrays = data.read_mat(path)
        assert arrays["labels"].tolist() == [3, 1, 2] and arrays["tstid"].tolist() == list(range(1, 300))
        assert arrays["small"].tolist() == [7] and "words" not in arrays


def test_food101_test_json(tmp_path):
    base = tmp_path / "food-101"
    os.makedirs(base / "meta")
    with open(base / "meta" / "test.json", "w") as f:
        json.dump({"baby_back_ribs": ["baby_back_ribs/2"], "apple_pie": ["apple_pie/1", "apple_pie/3"]}, f)
    for p in ["baby_back_ribs/2", "apple_pie/1", "apple_pie/3"]:
        img(str(base / "images" / f"{p}.jpg"), w=40, h=30)
    labels = check(load("food101", tmp_path), 3, ["apple pie", "baby back ribs"], "A photo of {}, a type of food.")
    assert sorted(labels) == [0, 0, 1]


def test_oxford_pets_test_split(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    text(str(base / "annotations" / "test.txt"), ["Abyssinian_1 1 1 1", "american_bulldog_10 2 2 1"])
    os.makedirs(base / "annotations" / "trimaps")
    for i in ["Abyssinian_1", "american_bulldog_10"]:
        img(str(base / "images" / f"{i}.jpg"))
    labels = check(load("oxford_pets", tmp_path), 2, ["abyssinian", "american bulldog"],
                   "A photo of a {}, a type of pet.")
    assert labels == [0, 1]


def test_pcam_prompts_and_missing_h5py(tmp_path):
    assert data.SETS["pcam"][2] == "{}"
    assert data._pcam_names(None)[1] == "This is a photo of lymph node tumor tissue."
    base = tmp_path / "pcam"
    for xy in "xy":
        text(str(base / f"camelyonpatch_level_2_split_test_{xy}.h5"), ["not really HDF5"])
    try:
        import h5py  # noqa: F401
    except ImportError:
        assert "h5py" in one_line_error("needs h5py", load, "pcam", tmp_path)
    else:
        one_line_error("could not read", load, "pcam", tmp_path)


def test_stanford_cars_with_scipy(tmp_path):
    sio = pytest.importorskip("scipy.io", reason="torchvision reads the Stanford Cars .mat files with scipy")
    base = tmp_path / "stanford_cars"
    os.makedirs(base / "devkit")
    names = np.array(["AM General Hummer SUV 2000", "Acura TL Type-S 2008"], dtype=object)
    sio.savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": names[None]})
    annos = np.array([("00001.jpg", 2), ("00002.jpg", 1)], dtype=[("fname", object), ("class", object)])
    sio.savemat(str(base / "cars_test_annos_withlabels.mat"), {"annotations": annos[None]})
    for f in ("00001.jpg", "00002.jpg"):
        img(str(base / "cars_test" / f), w=50, h=30)
    labels = check(load("stanford_cars", tmp_path), 2, ["AM General Hummer SUV", "Acura TL Type S"], "A photo of a {}.")
    assert labels == [1, 0]


def test_sun397_whole_set(tmp_path):
    base = tmp_path / "SUN397"
    text(str(base / "ClassName.txt"), ["/a/abbey", "/a/apartment_building/outdoor"])
    img(str(base / "a" / "abbey" / "sun_aaa.jpg"))
    img(str(base / "a" / "apartment_building" / "outdoor" / "sun_bbb.jpg"))
    labels = check(load("sun397", tmp_path), 2, ["abbey", "apartment building outdoor"], "This is a photo of a {}.")
    assert sorted(labels) == [0, 1]


# ----------------------------------------------------------------------------- ImageNet and its relatives


def write_tiny(root):
    base = root / "tiny-imagenet-200"
    wnids = ["n04067472", "n01443537", "n02124075"]  # listed unsorted, as in the zip
    text(str(base / "wnids.txt"), wnids)
    text(str(base / "words.txt"), ["n00001740\tentity", "n01443537\tgoldfish, Carassius auratus",
                                   "n02124075\tEgyptian cat", "n04067472\treel",
                                   "n01820546\tsulphur-crested cockatoo, Kakatoe galerita, Cacatua galerita"])
    for w in wnids:
        for i in range(2):
            img(str(base / "train" / w / "images" / f"{w}_{i}.JPEG"), w=64, h=64)
        text(str(base / "train" / w / f"{w}_boxes.txt"), [f"{w}_0.JPEG\t0\t0\t10\t10"])
    text(str(base / "val" / "val_annotations.txt"),
         [f"val_{i}.JPEG\t{w}\t0\t0\t63\t63" for i, w in enumerate(["n02124075", "n01443537", "n02124075"])])
    for i in range(3):
        img(str(base / "val" / "images" / f"val_{i}.JPEG"), w=64, h=64)


def test_tinyimagenet_val_through_annotations(tmp_path):
    write_tiny(tmp_path)
    names = ["goldfish", "Egyptian cat", "reel"]  # sorted wnids; the first lemma of each synset
    assert check(load("tinyimagenet", tmp_path), 3, names, "This is a photo of a {}.") == [1, 0, 1]
    assert check(load("tinyimagenet", tmp_path, train=True), 6, names, "This is a photo of a {}.") == [0, 0, 1, 1, 2, 2]
    assert sorted(os.listdir(tmp_path / "tiny-imagenet-200" / "val")) == ["images", "val_annotations.txt"]  # untouched


def test_tinyimagenet_unknown_wnid_is_one_line_error(tmp_path):
    write_tiny(tmp_path)
    text(str(tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"), ["val_0.JPEG\tn99999999\t0\t0\t1\t1"])
    one_line_error("could not read", load, "tinyimagenet", tmp_path)


def test_imagenet_val_names_and_variants(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    jpeg = tmp_path / "one.JPEG"
    img(str(jpeg), w=40, h=30)
    for w in wnids:
        os.makedirs(tmp_path / "imagenet" / "val" / w)
        os.link(jpeg, tmp_path / "imagenet" / "val" / w / "ILSVRC2012_val_1.JPEG")
    ds = load("imagenet", tmp_path)
    assert len(ds) == 1000 and len(ds.classnames) == 1000 and ds.template == "This is a photo of a {}."
    assert ds.classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert ds.classnames[134] == ds.classnames[517] == "crane"  # AGFT keeps the homonyms (torchvision: "crane bird")
    assert ds.classnames[638] == ds.classnames[639] == "maillot" and "jack o' lantern" in ds.classnames
    x, y = ds[999]
    assert x.shape == (3, RES, RES) and y == 999
    # ImageNet-R and -Sketch name their wnid folders through the ImageNet copy beside them
    for sub, w in [("imagenet-r", wnids[134]), ("imagenet-r", wnids[1]), ("sketch", wnids[0])]:
        img(str(tmp_path / sub / w / "a.jpg"))
    check(load("imagenet-r", tmp_path), 2, ["goldfish", "crane"], "This is a photo of a {}.")
    check(load("ImageNet_Sketch", tmp_path), 1, ["tench"], "This is a photo of a {}.")
    # a training split without the 1000 folders
    img(str(tmp_path / "imagenet" / "train" / wnids[0] / "a.JPEG"))
    one_line_error("1000", load, "imagenet", tmp_path, train=True)


def test_imagenet_r_names_from_tiny_words_or_error(tmp_path):
    img(str(tmp_path / "imagenet-r" / "n01820546" / "art_0.jpg"))
    one_line_error("words.txt", load, "imagenet-r", tmp_path)
    write_tiny(tmp_path)
    check(load("imagenet-r", tmp_path), 1, ["sulphur crested cockatoo"], "This is a photo of a {}.")


def test_country211_names_through_pycountry(tmp_path, monkeypatch):
    for code in ["AD", "KR", "XK"]:
        img(str(tmp_path / "country211" / "test" / code / "1.jpg"))
    fake = types.SimpleNamespace(countries=[types.SimpleNamespace(alpha_2="AD", name="Andorra"),
                                            types.SimpleNamespace(alpha_2="KR", name="Korea, Republic of"),
                                            types.SimpleNamespace(alpha_2="GB", name="United Kingdom")])
    monkeypatch.setitem(sys.modules, "pycountry", fake)
    check(load("country211", tmp_path), 3, ["Andorra", "Korea", "Kosovo"], "A photo I took in {}.")
    monkeypatch.setitem(sys.modules, "pycountry", None)  # not installed
    one_line_error("pycountry", load, "country211", tmp_path)


# ----------------------------------------------------------------------------- errors


def test_missing_empty_and_unknown_sets_are_one_line_errors(tmp_path):
    for name in data.ZERO_SHOT_SETS + data.EXTRA_SETS:
        msg = one_line_error(name, load, name, tmp_path)
        folder = os.path.join(str(tmp_path), data.SETS[name][0])
        assert folder in msg and "expected" in msg and ("--download" in msg or "no automatic download" in msg)
    assert "--download" not in one_line_error("imagenet", load, "imagenet", tmp_path)
    assert "--data-root" in one_line_error("no --data-root", data.load_dataset, "dtd", None, RES)
    one_line_error("unknown dataset 'cifar11'", load, "cifar11", tmp_path)
    one_line_error("evaluation set", load, "dtd", tmp_path, train=True)
    text(str(tmp_path / "dtd" / "dtd" / "labels" / "test1.txt"), [])  # the split lists no image
    os.makedirs(tmp_path / "dtd" / "dtd" / "images")
    one_line_error("holds no images", load, "dtd", tmp_path)
    os.makedirs(tmp_path / "caltech101" / "101_ObjectCategories" / "Faces")
    one_line_error("holds no images", load, "caltech101", tmp_path)


def test_check_datasets_names_every_missing_set(tmp_path):
    write_cifar(tmp_path)
    msg = one_line_error("imagenet", evaluate.check_datasets, ["cifar10", "dtd", "ImageNet_R"], str(tmp_path),
                         train_set="imagenet")
    assert msg.endswith("[also missing: dtd, ImageNet_R]") and "train/" in msg
    evaluate.check_datasets(["cifar10", "imagefolder", ""], str(tmp_path), train_set="cifar10")


def test_evaluate_with_no_data_prints_one_line():
    out = subprocess.run([sys.executable, "evaluate.py", "--model", "ViT-B/32", "--datasets", "cifar10"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: cifar10: ") and len(out.stderr.strip().splitlines()) == 1
    assert "cifar-10-batches-py" in out.stderr and "--download" in out.stderr


# ----------------------------------------------------------------------------- protocols and the results table


def test_protocols_follow_the_papers():
    agft, tga, saft = (evaluate.PROTOCOLS[p] for p in ("agft", "tga", "saft"))
    assert (agft["steps"], agft["resize_before_attack"], agft["datasets"]) == (20, False, data.ZERO_SHOT_SETS)
    assert (tga["steps"], tga["resize_before_attack"], len(tga["datasets"]), tga["average"]) == (100, True, 16, tga["datasets"])
    assert saft["steps"] == 100 and saft["datasets"][0] == "tinyimagenet" and "tinyimagenet" not in saft["average"]
    for p in (agft, tga, saft):
        assert p["step_size"] == 1 / 255 and set(p["datasets"]) <= set(data.SETS)
        assert set(p["datasets"]) - {"tinyimagenet"} == set(data.ZERO_SHOT_SETS) and len(p["average"]) >= 15


def test_table_one_column_per_set_and_rows_per_model():
    res = {"tinyimagenet": {"clean": 50.0, "robust": 10.0}, "cifar10": {"clean": 80.0, "robust": 20.0},
           "dtd": {"clean": 40.0, "robust": 4.0}}
    base = {k: {"clean": v["clean"] - 10, "robust": v["robust"] / 2} for k, v in res.items()}
    lines = evaluate.table({"before": base, "after": res}, ["cifar10", "dtd", "tinyimagenet"],
                           over=["cifar10", "dtd"]).splitlines()
    assert lines[0].split() == ["CIFAR10", "DTD", "TinyIN", "avg"]
    assert [line.split()[:2] for line in lines[1:5]] == [["before", "clean"], ["after", "clean"],
                                                         ["before", "robust"], ["after", "robust"]]
    assert lines[2].split()[2:] == ["80.00", "40.00", "50.00", "60.00"] and lines[4].split()[-1] == "12.00"
    assert "tinyimagenet" in lines[5]
    assert evaluate.average(res, ["cifar10", "dtd"]) == {"clean": 60.0, "robust": 12.0}


def test_evaluate_protocol_end_to_end(tmp_path, monkeypatch, no_checksums):
    import clip
    torch.manual_seed(0)
    cfg = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
               context_length=16, vocab_size=49408, transformer_width=32, transformer_heads=1, transformer_layers=1)
    torch.save(clip.CLIP(**cfg).state_dict(), tmp_path / "tiny.pt")
    write_cifar(tmp_path)
    for c in data.EUROSAT_FOLDERS:
        img(str(tmp_path / "eurosat" / "2750" / c / f"{c}_1.jpg"), w=64, h=64)
    evaluate.main(["--model", str(tmp_path / "tiny.pt"), "--protocol", "tga", "--datasets", "EuroSAT,cifar10",
                   "--data-root", str(tmp_path), "--max-per-dataset", "3", "--steps", "1", "--batch-size", "2",
                   "--workers", "0", "--device", "cpu", "--out-dir", str(tmp_path / "eval")])
    res = json.load(open(tmp_path / "eval" / "results.json"))
    assert res["attack"] == {"name": "pgd", "eps": 1 / 255, "step_size": 1 / 255, "steps": 1}
    assert list(res["results"]) == ["eurosat", "cifar10"] and all(r["n"] == 3 for r in res["results"].values())
    assert res["protocol"]["name"] == "tga" and res["protocol"]["resize_before_attack"] is True
    assert set(res["average"]) == {"clean", "robust"} and res["average_over"] == ["eurosat", "cifar10"]
