"""Tests of clip/: loading both checkpoint kinds, model outputs, tokenizer ids, download errors. CPU, offline."""
import hashlib
import io
import os
import sys
import types
import urllib.error
import urllib.request
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clip
import clip.loader

torch.set_num_threads(min(2, torch.get_num_threads()))

# The real hyper-parameters of two released models; state dicts built from them have OpenAI's names and shapes.
VIT_B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
RN50 = dict(VIT_B32, embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None)
# Shapes read off OpenAI's model classes (openai-clip 1.0.1) for the same configurations.
REAL = {"ViT-B/32": (VIT_B32, 302, {"visual.conv1.weight": (768, 3, 32, 32), "visual.class_embedding": (768,),
                                    "visual.positional_embedding": (50, 768), "visual.proj": (768, 512),
                                    "visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
                                    "token_embedding.weight": (49408, 512), "text_projection": (512, 512)}),
        "RN50": (RN50, 489, {"visual.conv1.weight": (32, 3, 3, 3), "visual.layer4.2.conv3.weight": (2048, 512, 1, 1),
                             "visual.layer1.0.downsample.0.weight": (256, 64, 1, 1),
                             "visual.attnpool.positional_embedding": (50, 2048),
                             "visual.attnpool.c_proj.weight": (1024, 2048), "text_projection": (512, 1024)})}
TINY_VIT = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
TINY_RN = dict(TINY_VIT, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None)


def random_clip(config, seed=0):
    """A CLIP with random weights, BatchNorm included (so no residual branch is zero)."""
    torch.manual_seed(seed)
    model = clip.CLIP(**config)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 0.7)
            nn.init.normal_(m.bias, std=0.02)
            nn.init.normal_(m.running_mean, std=0.1)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
    return model.eval()


class Box(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(state_dict, path):
    """A TorchScript archive like OpenAI's: a scripted module whose state_dict() holds these names and tensors."""
    root = Box()
    for name, tensor in state_dict.items():
        *parents, leaf = name.split(".")
        module = root
        for p in parents:
            if p not in module._modules:
                module.add_module(p, Box())
            module = module._modules[p]
        module.register_buffer(leaf, tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.script(root).save(str(path))


def openai_style(state_dict):
    """fp16 weights plus the three integer entries OpenAI's archives carry."""
    out = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    return {**out, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
            "vocab_size": torch.tensor(49408)}


def check_forward(model, images, texts, repeat=True):
    """model(images, tokens) equals the features computed step by step; with repeat, encoding is deterministic."""
    tokens = clip.tokenize(texts)
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, tokens)
        image, text = model.encode_image(images), model.encode_text(tokens)
        if repeat:
            assert torch.equal(model.encode_image(images), image) and torch.equal(model.encode_text(tokens), text)
    expected = model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    assert logits_per_image.shape == (len(images), len(texts))
    torch.testing.assert_close(logits_per_image, expected, rtol=0, atol=1e-5)
    assert torch.equal(logits_per_text, logits_per_image.t())
    return image, text


# ---------------------------------------------------------------- released architectures, both file kinds

@pytest.fixture(scope="module", params=["ViT-B/32", "RN50"])
def released(request, tmp_path_factory):
    config, n_keys, shapes = REAL[request.param]
    reference = random_clip(config).state_dict()
    assert len(reference) == n_keys and all(tuple(reference[k].shape) == s for k, s in shapes.items())
    folder = tmp_path_factory.mktemp(request.param.replace("/", "-"))
    torch.save(reference, folder / "plain.pt")
    save_torchscript(openai_style(reference), folder / "openai.pt")
    yield request.param, reference, folder
    for f in folder.iterdir():  # ~1 GB: don't leave it to pytest's retention of temporary folders
        f.unlink()


def test_load_released_architectures(released):
    name, reference, folder = released
    plain = clip.load(str(folder / "plain.pt"))
    for k, v in plain.state_dict().items():  # every weight exactly as saved
        assert v.dtype == reference[k].dtype and torch.equal(v, reference[k]), k
    del plain
    model = clip.load(str(folder / "openai.pt"))  # fp16 TorchScript -> fp32
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k].half().to(v.dtype)), k
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # one: CPU time is scarce
    image, text = check_forward(model, images, ["a photo of a dog.", "a diagram"], repeat=False)
    dim = REAL[name][0]["embed_dim"]
    assert image.shape == (1, dim) and text.shape == (2, dim) and image.isfinite().all()
    if name == "ViT-B/32":
        with torch.no_grad():
            tokens = model.encode_image(images, all_tokens=True)
        assert tokens.shape == (1, 50, 512)
        torch.testing.assert_close(tokens[:, 0], image, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- small models: file variants, helpers

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = random_clip(TINY_VIT)
    torch.save(model.state_dict(), folder / "tiny.pt")
    return model, folder


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_tiny_models_build_from_shapes(config, tmp_path):
    reference = random_clip(config, seed=1)
    save_torchscript(openai_style(reference.state_dict()), tmp_path / "m.pt")
    model = clip.load(str(tmp_path / "m.pt"))
    assert model.visual.input_resolution == 32 and model.context_length == 77
    rebuilt = clip.build_model(model.state_dict())  # a copy, sharing no memory with its source
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(rebuilt.parameters(), model.parameters()))
    check_forward(model, torch.rand(3, 3, 32, 32), ["one", "two", "three", "four"])
    if config is TINY_RN:
        with pytest.raises(ValueError):
            model.encode_image(torch.rand(1, 3, 32, 32), all_tokens=True)


def test_wrapped_state_dict_and_device(tiny, tmp_path):
    model, _ = tiny
    wrapped = {"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "ddp.pt")
    loaded = clip.load(tmp_path / "ddp.pt", device=torch.device("cpu"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_encode_text(tiny):
    model, _ = tiny
    prompts = ["a photo of a cat", "a photo of a dog", "word " * 100]  # the last one is truncated
    features = clip.encode_text(model, prompts, batch_size=2)
    assert features.shape == (3, 32) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        expected = F.normalize(model.encode_text(clip.tokenize(prompts, truncate=True)), dim=-1)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(clip.encode_text(model, "a photo of a cat"), features[:1])


def test_toy_dispatch(monkeypatch):
    fake = types.ModuleType("clip.toy")
    fake.load_toy = lambda device: ("toy model on", device)
    monkeypatch.setitem(sys.modules, "clip.toy", fake)
    assert clip.load("toy", device="cpu") == ("toy model on", "cpu")


# ---------------------------------------------------------------- errors

def test_bad_paths_and_files(tmp_path):
    with pytest.raises(clip.CLIPError, match="RN50x64, ViT-B/32.*no file at"):
        clip.load("ViT-B/33")
    with pytest.raises(clip.CLIPError, match="no file at"):
        clip.load(str(tmp_path / "missing.pt"))
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(clip.CLIPError, match="not a CLIP state dict: it lacks token_embedding.weight") as e:
        clip.load(str(tmp_path / "other.pt"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(clip.CLIPError, match="not a PyTorch checkpoint") as e2:
        clip.load(str(tmp_path / "notes.txt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(clip.CLIPError, match="holds a list"):
        clip.load(str(tmp_path / "list.pt"))
    assert "\n" not in str(e.value) + str(e2.value)


def test_wrong_shapes_give_clip_error(tiny, tmp_path):
    state_dict = dict(tiny[0].state_dict())
    state_dict["ln_final.bias"] = torch.zeros(7)
    torch.save(state_dict, tmp_path / "bad.pt")
    with pytest.raises(clip.CLIPError, match="does not fit the CLIP architecture"):
        clip.load(str(tmp_path / "bad.pt"))


def serve(files):
    """A stand-in for urllib.request.urlopen serving {url: bytes}, answering 404 for anything else."""
    def urlopen(request, timeout=None):
        url = request.full_url
        if url not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        response = io.BytesIO(files[url])
        response.headers = {"Content-Length": str(len(files[url]))}
        return response
    return urlopen


def test_offline_error_names_urls_and_paths(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network (test)")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("NANOZSAR_CLIP_CACHE", str(tmp_path / "env"))
    with pytest.raises(clip.CLIPError) as e:
        clip.load("ViT-B/32")
    message = str(e.value)
    assert "\n" not in message and "no network (test)" in message
    sha = clip.loader.MODELS["ViT-B/32"][0]
    assert f"https://openaipublic.azureedge.net/clip/models/{sha}/ViT-B-32.pt" in message
    mirror = "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_pytorch_model.bin"
    assert mirror in message
    assert os.path.join(str(tmp_path / "env"), "ViT-B-32.pt") in message
    with pytest.raises(clip.CLIPError, match=str(tmp_path / "root")):  # download_root beats the variable
        clip.load("RN50", download_root=str(tmp_path / "root"))


def test_checksum_mismatch_keeps_nothing(tmp_path, monkeypatch):
    url = clip.loader.OPENAI_URL.format(sha256=clip.loader.MODELS["RN101"][0], stem="RN101")
    monkeypatch.setattr(urllib.request, "urlopen", serve({url: b"not the model"}))
    with pytest.raises(clip.CLIPError, match="SHA-256 mismatch.*HTTP 404"):
        clip.load("RN101", download_root=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_download_checks_sha256_and_caches(tiny, tmp_path, monkeypatch, capsys):
    data = (tiny[1] / "tiny.pt").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(clip.loader.MODELS, "ViT-B/32", (sha, "vit_base_patch32_clip_224"))
    url = clip.loader.OPENAI_URL.format(sha256=sha, stem="ViT-B-32")
    monkeypatch.setattr(urllib.request, "urlopen", serve({url: data}))
    model = clip.load("ViT-B/32", download_root=str(tmp_path))
    assert os.listdir(tmp_path) == ["ViT-B-32.pt"] and url in capsys.readouterr().err
    assert torch.equal(model.visual.proj, tiny[0].visual.proj)
    monkeypatch.setattr(urllib.request, "urlopen", serve({}))  # the cached copy needs no network
    assert torch.equal(clip.load("ViT-B/32", download_root=str(tmp_path)).visual.proj, tiny[0].visual.proj)


def test_mirror_fallback_and_hand_placed_file(tiny, tmp_path, monkeypatch, capsys):
    data = (tiny[1] / "tiny.pt").read_bytes()
    mirror = clip.loader.MIRROR_URL.format(arch="resnet50_clip")
    monkeypatch.setattr(urllib.request, "urlopen", serve({mirror: data}))  # OpenAI's URL answers 404
    clip.load("RN50", download_root=str(tmp_path / "a"))
    assert os.listdir(tmp_path / "a") == ["resnet50_clip.openai.bin"] and mirror in capsys.readouterr().err
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / "resnet50_clip.openai.bin").write_bytes(data)  # placed by hand, as the error message says
    monkeypatch.setattr(urllib.request, "urlopen", serve({}))
    clip.load("RN50", download_root=str(tmp_path / "b"))


# ---------------------------------------------------------------- tokenizer (ids checked against OpenAI's)

TOKEN_IDS = {
    "a photo of a dog.": [320, 1125, 539, 320, 1929, 269],
    "A PHOTO OF A DOG.": [320, 1125, 539, 320, 1929, 269],
    "  a\tphoto\n\nof   a dog.  ": [320, 1125, 539, 320, 1929, 269],
    "Tom &amp; Jerry": [2435, 261, 9164],
    "&amp;lt;3": [283, 274],
    "café naïve": [15304, 1097, 35689, 563],
    "東京": [48338, 21078, 361],
    "😀": [7334],
    "it's don't": [585, 568, 847, 713],
    "3.14": [274, 269, 272, 275],
    "hello<|endoftext|>world": [3306, 49407, 1002],
    "â€œquotedâ€\x9d": [257, 27706, 257],  # mojibake, repaired by ftfy
    "a 'photo' of an airplane!?": [320, 262, 1125, 262, 539, 550, 16451, 6004],
    "bicycle-built-for-two": [11652, 268, 3874, 268, 556, 268, 1237],
    "\u00a0x\u2003y": [343, 344],
    "": [],
}


@pytest.mark.parametrize("text", list(TOKEN_IDS))
def test_token_ids(text):
    ids = [49406, *TOKEN_IDS[text], 49407]
    tokens = clip.tokenize(text)
    assert tokens.dtype == torch.long and tokens.shape == (1, 77)
    assert tokens[0, :len(ids)].tolist() == ids and not tokens[0, len(ids):].any()


def test_tokenize_lengths():
    assert clip.tokenize(["a", "b c"], context_length=5).tolist() == [[49406, 320, 49407, 0, 0],
                                                                      [49406, 321, 322, 49407, 0]]
    fits = " ".join(["dog"] * 75)  # 75 tokens + SOT + EOT = 77
    assert clip.tokenize(fits)[0, -1] == 49407
    long = fits + " dog"
    with pytest.raises(RuntimeError, match="'dog dog .*context length 77"):
        clip.tokenize(["short", long])
    cut = clip.tokenize(long, truncate=True)[0]
    assert cut[:76].tolist() == [49406] + [1929] * 75 and cut[76] == 49407
