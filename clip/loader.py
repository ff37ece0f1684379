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
"toy" loads the small toy CLIP of clip/toy.py. Every failure raises CLIPError with a one-line message.
"""
import contextlib
import hashlib
import os
import sys
import urllib.error
import urllib.request
import warnings
import zipfile

import torch

from .model import build_model

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
    if name_or_path == "toy":
        from .toy import load_toy  # imported here so that clip/ works without it
        return load_toy(device)
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
    """'vit' or 'resnet': the image tower of a model name, of "toy", or of a torch.save'd state dict (its keys only,
    memory-mapped); None when it cannot be told without building the model (a TorchScript file, an unknown name).
    Downloads nothing, so scripts can refuse an architecture they cannot use before any expensive work."""
    if name_or_path == "toy":
        from .toy import TOY_CONFIG
        return "resnet" if TOY_CONFIG.get("vision_patch_size") is None else "vit"
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
        try:
            download(url, path, expected)
            return path, f"{url} (saved to {path})"
        except Exception as e:  # offline, HTTP error, checksum mismatch, disk full...: try the next source
            tried.append(f"{url} ({one_line(e)})")
    raise CLIPError(f"could not get {name}: tried {'; '.join(tried)}. Download one of these by hand and put it at "
                    f"{sources[0][1]} (OpenAI's file) or {sources[1][1]} (the mirror's file), "
                    f"or pass a file path to clip.load")


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


# cache files: a lock while one process writes, and atomic writes (used by the toy cache and the run harness)

@contextlib.contextmanager
def file_lock(path, log=print):
    """An exclusive lock on path + '.lock' for the duration (flock: released by the kernel if the process dies); says
    so when it has to wait for another process. Without fcntl (Windows) it does not lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that holds {path}.lock")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_atomically(path, write, mode="w"):
    """Write a file atomically: write(f) into a temporary file in the same folder, flushed to disk, then renamed over
    the old one, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
