"""clip.load: OpenAI's released CLIP models by name, or a local checkpoint file.

A name (see available_models()) is looked up in the cache directory: `download_root` if given, else the
NANOZSAR_CLIP_CACHE environment variable, else ~/.cache/clip. If it is not there, it is downloaded, with a
progress line on stderr, first from OpenAI's URL (the file must match the SHA-256 that is the URL's
second-to-last path component; saved as e.g. ViT-B-32.pt), then from open_clip's copy of the same weights on
the Hugging Face hub (timm/<arch>.openai, open_clip_pytorch_model.bin, OpenAI's key names; no published
checksum, so only its length is checked; saved as e.g. vit_base_patch32_clip_224.openai.bin). Downloads go to
a temporary file renamed into place when complete. A line on stderr says which file and source were used.
A path loads a TorchScript archive as OpenAI publishes them (fp16, converted to fp32) or a torch.save'd
state dict (optionally under "state_dict", optionally with DistributedDataParallel's "module." prefix).
Every failure raises CLIPError with a one-line message.
"""
import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
import zipfile

import numpy as np
import torch

from .model import ModifiedResNet, VisionTransformer, build_model

# {stem} is the model name with "/" and "@" replaced by "-", e.g. ViT-L-14-336px
OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{sha256}/{stem}.pt"
MIRROR_URL = "https://huggingface.co/timm/{arch}.openai/resolve/main/open_clip_pytorch_model.bin"
MODELS = {  # name: (SHA-256 of OpenAI's file, architecture name of the Hugging Face mirror)
    "RN50": ("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "resnet50_clip"),
    "RN101": ("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "resnet101_clip"),
    "RN50x4": ("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "resnet50x4_clip"),
    "RN50x16": ("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "resnet50x16_clip"),
    "RN50x64": ("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "resnet50x64_clip"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "vit_base_patch32_clip_224"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "vit_base_patch16_clip_224"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "vit_large_patch14_clip_224"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "vit_large_patch14_clip_336"),
}
REQUIRED = ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.attn.in_proj_weight",
            "ln_final.weight", "text_projection", "logit_scale", "visual.conv1.weight")


class CLIPError(Exception):
    """Loading failed; the message is one line, meant to be printed without a traceback."""


def available_models():
    return list(MODELS)


def load(name_or_path, device="cpu", download_root=None):
    """A model name or a checkpoint path -> CLIP in eval mode, fp32 weights, on `device`."""
    if name_or_path in MODELS:
        path, source = fetch(name_or_path, download_root)
        print(f"clip: {name_or_path} from {source}", file=sys.stderr)
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        raise CLIPError(f"no CLIP model named {name_or_path!r} (available: {', '.join(MODELS)}) and no file at "
                        f"{os.path.abspath(name_or_path)}")
    return model_from_state_dict(read_state_dict(path), path).to(device).eval()


def vision_kind(name_or_path):
    """'vit' or 'resnet': the image tower of a model name or of a torch.save'd state dict (its keys only,
    memory-mapped); None when it cannot be told without building the model (a TorchScript file, an unknown name).
    Downloads nothing, so scripts can refuse an architecture they cannot use before any expensive work."""
    if name_or_path in MODELS:
        return "resnet" if name_or_path.startswith("RN") else "vit"
    if not os.path.isfile(name_or_path) or zipfile.is_zipfile(name_or_path) and is_torchscript(name_or_path):
        return None
    state_dict = None
    for mmap in (True, False):  # mmap reads no weights, but needs the zip format of torch.save
        try:
            state_dict = torch.load(name_or_path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:
            continue
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    keys = {str(k).removeprefix("module.") for k in state_dict} if isinstance(state_dict, dict) else set()
    if "visual.proj" in keys or "visual.class_embedding" in keys:
        return "vit"
    if any(k.startswith("visual.attnpool.") for k in keys):
        return "resnet"
    return None


def read_state_dict(path):
    """A TorchScript archive or a torch.save'd checkpoint -> {name: tensor}."""
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's files are TorchScript
                warnings.simplefilter("ignore")
                state_dict = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIPError(f"{path} is not a PyTorch checkpoint or TorchScript archive ({one_line(e)})") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise CLIPError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def model_from_state_dict(state_dict, path):
    missing = [k for k in REQUIRED if k not in state_dict]
    if missing:
        raise CLIPError(f"{path} is not a CLIP state dict: it lacks {', '.join(missing)} "
                        f"(it has {len(state_dict)} keys, e.g. {', '.join(list(state_dict)[:3]) or 'none'})")
    broken = [k for k, v in state_dict.items()
              if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CLIPError(f"{path}: {len(broken)} of its {len(state_dict)} weight tensors hold NaN or inf "
                        f"({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}); the weights are broken")
    try:
        return build_model(state_dict)
    except Exception as e:
        raise CLIPError(f"{path} does not fit the CLIP architecture: {one_line(e)}") from None


def fetch(name, download_root=None):
    """Path of the cached or freshly downloaded file for a model name, and a note on where it came from."""
    sha256, arch = MODELS[name]
    stem = name.replace("/", "-").replace("@", "-")
    root = download_root or os.environ.get("NANOZSAR_CLIP_CACHE") or os.path.expanduser("~/.cache/clip")
    sources = [(OPENAI_URL.format(sha256=sha256, stem=stem), os.path.join(root, stem + ".pt"), sha256),
               (MIRROR_URL.format(arch=arch), os.path.join(root, arch + ".openai.bin"), None)]
    tried = []
    for url, path, expected in sources:
        if os.path.isfile(path):
            if expected is None or file_sha256(path) == expected:
                return path, f"{path} (cached download of {url})"
            tried.append(f"{path} (SHA-256 mismatch, ignored)")
    for url, path, expected in sources:
        for wait in (*RETRY_WAITS, None):
            try:
                download(url, path, expected)
                return path, f"{url} (saved to {path})"
            except Exception as e:  # offline, HTTP error, checksum mismatch, disk full...: again, then the next source
                if wait is None or not transient(e):
                    tried.append(f"{url} ({one_line(e)})")
                    break
                print(f"clip: {url}: {one_line(e)}; trying again in {wait:g} s", file=sys.stderr)
                time.sleep(wait)
    raise CLIPError(f"could not get {name}: tried {'; '.join(tried)}. Download one of these by hand and put it at "
                    f"{sources[0][1]} (OpenAI's file) or {sources[1][1]} (the mirror's file), "
                    f"or pass a file path to clip.load")


RETRY_WAITS = (2, 10)  # seconds before the 2nd and 3rd try of a source, after a transient error


def transient(e):
    """An error that may pass: a server error (HTTP 5xx, 429), a timeout or a dropped connection; not a 4xx answer or
    a checksum mismatch."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code == 429
    return isinstance(e, (urllib.error.URLError, TimeoutError, ConnectionError)) or "incomplete" in str(e)


def download(url, path, expected_sha256=None):
    """url -> path through a temporary file, renamed once complete (and matching expected_sha256, if given)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp, digest, done = f"{path}.{os.getpid()}.part", hashlib.sha256(), 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "nanoZSAR"})
        with urllib.request.urlopen(request, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                print(f"\rclip: downloading {url}: {done >> 20}/{total >> 20 or '?'} MiB", end="", file=sys.stderr)
        if total and done != total:
            raise OSError(f"download incomplete, {done} of {total} bytes")
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise OSError(f"SHA-256 mismatch, got {digest.hexdigest()}")
        os.replace(tmp, path)
    finally:
        if done:
            print(file=sys.stderr)
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def one_line(e):
    if isinstance(e, urllib.error.HTTPError):
        text = f"HTTP {e.code} {e.reason}"
    else:
        text = " ".join(str(e.reason if isinstance(e, urllib.error.URLError) else e).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


# ----------------------------------------------------------------------------- checkpoints of fine-tuned image encoders
# Ours, and the layouts the other codebases release: read_checkpoint -> checkpoint_encoder (which layout, the image
# encoder's state dict in OpenAI's key names) -> load_visual (into a built model).


def read_checkpoint(path):
    if not os.path.isfile(path):
        raise CLIPError(f"checkpoint not found: {path}")
    try:  # numpy scalars are allowed: TeCoA's and PMG-AFT's checkpoints store best_acc1 as one
        with torch.serialization.safe_globals(NUMPY_SCALARS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIPError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


# (name, test, get): the first layout whose test passes gives the encoder. Keys may carry "module." (DataParallel) or
# "_orig_mod." (torch.compile) and, in open_clip files, layer scales (ls_1/ls_2.gamma), folded into the projections.
CHECKPOINT_FORMATS = [
    ("nanoZSAR checkpoint", lambda c: isinstance(c.get("visual"), dict), lambda c: c["visual"]),
    ("TeCoA / PMG-AFT / TGA-ZSR / SAFT checkpoint (vision_encoder_state_dict)",
     lambda c: isinstance(c.get("vision_encoder_state_dict"), dict), lambda c: c["vision_encoder_state_dict"]),
    ("AGFT checkpoint (modules['clip.visual'])", lambda c: isinstance(c.get("modules"), dict) and
     isinstance(c["modules"].get("clip.visual"), dict), lambda c: c["modules"]["clip.visual"]),
    ("CLIP state dict (visual.* keys; OpenAI or open_clip names)", lambda c: any(k.startswith("visual.") for k in c),
     lambda c: {k[len("visual."):]: v for k, v in c.items() if k.startswith("visual.")}),
    ("image-encoder state dict (OpenAI or open_clip names, e.g. FARE)", lambda c: "conv1.weight" in c, lambda c: c),
]
# keys of a full CLIP state dict that belong to the text tower (OpenAI's and open_clip's names), skipped
TEXT_KEYS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale",
             "logit_bias", "text.", "attn_mask", "input_resolution", "context_length", "vocab_size")
VIT_NAMES = {(768, 12, 32, 224): "ViT-B/32", (768, 12, 16, 224): "ViT-B/16", (1024, 24, 14, 224): "ViT-L/14",
             (1024, 24, 14, 336): "ViT-L/14@336px"}
_SCALAR = getattr(np, "_core", getattr(np, "core", None)).multiarray.scalar
NUMPY_SCALARS = [np.dtype, (_SCALAR, "numpy.core.multiarray.scalar"), (_SCALAR, "numpy._core.multiarray.scalar")] + [
    t for t in vars(np.dtypes).values() if isinstance(t, type)]  # numpy 1.x and 2.x names of a pickled scalar


def _generic(key):
    return ".".join("N" if part.isdigit() else part for part in key.split("."))


def image_tower_names():
    """Every key an OpenAI ViT or ResNet image tower can have, block numbers as N (from two tiny towers, no weights)."""
    vit, rn = VisionTransformer(32, 16, 8, 1, 1, 8), ModifiedResNet((1, 1, 1, 1), 8, 1, 32, 2)
    return {_generic(k) for m in (vit, rn) for k in m.state_dict()}


def strip_prefix(sd, prefixes=("module.", "_orig_mod.")):
    """Keys without DataParallel's "module." and torch.compile's "_orig_mod." prefixes."""
    out = {}
    for k, v in sd.items():
        while k.startswith(prefixes):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def fold_layer_scale(sd):
    """open_clip's x + gamma * f(x) (ls_1 after attn.out_proj, ls_2 after mlp.c_proj) as OpenAI's x + f'(x)."""
    sd = dict(sd)
    for key in [k for k in sd if k.endswith((".ls_1.gamma", ".ls_2.gamma"))]:
        gamma, block = sd.pop(key).float(), key.rsplit(".", 2)[0]
        proj = f"{block}.attn.out_proj" if ".ls_1." in key else f"{block}.mlp.c_proj"
        sd[f"{proj}.weight"] = sd[f"{proj}.weight"].float() * gamma[:, None]
        sd[f"{proj}.bias"] = sd[f"{proj}.bias"].float() * gamma
    return sd


def describe_encoder(sd):
    """'a ViT-L/14 image encoder' (or its width/layers/patch/resolution), 'a ResNet image encoder', from shapes."""
    if "proj" not in sd or "conv1.weight" not in sd or "positional_embedding" not in sd:
        return "a ResNet image encoder" if "attnpool.c_proj.weight" in sd else "an image encoder"
    width, patch = sd["conv1.weight"].shape[0], sd["conv1.weight"].shape[-1]
    layers = len([k for k in sd if k.endswith(".attn.in_proj_weight")])
    res = patch * round((sd["positional_embedding"].shape[0] - 1) ** 0.5)
    name = VIT_NAMES.get((width, layers, patch, res))
    return f"a {name} image encoder" if name else f"a ViT image encoder (width {width}, {layers} layers, patch {patch}, {res} px)"


def checkpoint_encoder(ckpt, path):
    """(layout, image-encoder state dict in OpenAI's key names) of a checkpoint read by read_checkpoint.

    UsageError (one line) for a layout not in CHECKPOINT_FORMATS, keys it cannot map, and weights that are not all
    finite (NaN or inf: a diverged run). Needs no model, so evaluate.py runs it before loading or downloading one."""
    top = strip_prefix(ckpt) if isinstance(ckpt, dict) and all(isinstance(k, str) for k in ckpt) else {}
    found = next(((name, get) for name, test, get in CHECKPOINT_FORMATS if test(top)), None)
    if found is None:
        keys = list(top)[:6] if top else type(ckpt).__name__
        raise CLIPError(f"{path}: unknown checkpoint layout, no image encoder found; keys not understood: {keys} "
                         f"(readable: ours, vision_encoder_state_dict, AGFT's modules, (visual.)conv1.weight... state dicts)")
    name, get = found
    sd = strip_prefix(get(top))
    if name.startswith("CLIP state dict"):
        sd.update({k: v for k, v in top.items() if not k.startswith("visual.") and not k.startswith(TEXT_KEYS)})
    sd = fold_layer_scale(sd)
    known = image_tower_names()
    unknown = [k for k in sd if _generic(k) not in known]
    if unknown:
        more = f" and {len(unknown) - 6} more" if len(unknown) > 6 else ""
        raise CLIPError(f"{path}: {name}, but these keys are not understood: {', '.join(unknown[:6])}{more} (only "
                         "OpenAI-architecture ViT/ResNet image encoders can be mapped)")
    broken = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise CLIPError(f"{path}: {name}, but {len(broken)} of its {len(sd)} weight tensors hold NaN or inf "
                         f"({', '.join(broken[:3])}{more}); the weights are broken (a diverged run?): use an earlier "
                         "checkpoint")
    return name, sd


def check_encoder_fits(sd, path, model_name, ours=None):
    """UsageError (one line) when --model names one of OpenAI's architectures and the checkpoint's encoder is
    recognisably another one (a ViT for a ResNet, ViT-L/14 for ViT-B/32): before that model is downloaded."""
    if model_name not in available_models():
        return
    kind, held = vision_kind(model_name), describe_encoder(sd)
    named = next((n for n in VIT_NAMES.values() if held == f"a {n} image encoder"), None)
    vit = "positional_embedding" in sd and "proj" in sd and "conv1.weight" in sd
    if (kind == "resnet" and not vit) or (kind == "vit" and held == f"a {model_name} image encoder"):
        return  # a ResNet's exact shapes are compared once the model is built (load_visual)
    suggest = ours or named or "<its CLIP>"
    raise CLIPError(f"{path} holds {held}{f' ({ours})' if ours else ''}, not the one of --model {model_name} "
                     f"(a {'ResNet' if kind == 'resnet' else model_name} image encoder); pass --model {suggest}")


def load_visual(model, path, model_name, ckpt=None):
    """Load the image encoder of a checkpoint into model.visual and return the checkpoint (read here unless given).

    Reads our scripts' checkpoints and the released ones of the other codebases (CHECKPOINT_FORMATS), says on stderr
    which layout it found, and refuses (UsageError) keys it cannot map, weights that are not finite, and encoders of
    another architecture."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    name, sd = checkpoint_encoder(ckpt, path)
    expected = model.visual.state_dict()
    if set(sd) != set(expected) or any(sd[k].shape != v.shape for k, v in expected.items() if k in sd):
        if all(k in expected and v.shape == expected[k].shape for k, v in sd.items()):  # our architecture, cut short
            missing = [k for k in expected if k not in sd]
            raise CLIPError(f"{path}: {name}, but {len(missing)} keys are missing: {', '.join(missing[:6])}")
        ours = ckpt.get("model") if name == "nanoZSAR checkpoint" else None
        raise CLIPError(f"{path} holds {describe_encoder(sd)}{f' ({ours})' if ours else ''}, not the one of --model "
                         f"{model_name} ({describe_encoder(expected)}); pass --model {ours or '<its CLIP>'}")
    model.visual.load_state_dict(sd)
    print(f"checkpoint: {path}: {name}, {describe_encoder(sd)}", file=sys.stderr)
    return ckpt
