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
A folder (or a file in it) loads an open_clip hub model (open_clip_config.json beside open_clip_model.safetensors or
open_clip_pytorch_model.bin) or a transformers CLIPModel (config.json beside model.safetensors or pytorch_model.bin),
built as its config says: activation, image size, normalisation; anything it cannot build exactly is refused.
`.safetensors` files are read here with torch alone. Every model loaded is described in one line on stderr.
Every failure raises CLIPError with a one-line message.
"""
import functools
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
import zipfile

import numpy as np
import torch

from .model import CLIP, MEAN, STD, VisionTransformer, build_model

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
    """A model name, a checkpoint file or a model folder -> CLIP in eval mode, fp32 weights, on `device`."""
    name_or_path = str(name_or_path)
    if name_or_path in MODELS:
        path, source = fetch(name_or_path, download_root)
        print(f"clip: {name_or_path} from {source}", file=sys.stderr)
        model = model_from_state_dict(read_state_dict(path), path)
        model.provenance = dict(source=f"OpenAI's {name_or_path}", activation="OpenAI's", normalisation="OpenAI's")
    elif os.path.isdir(name_or_path):
        model = load_folder(name_or_path)
    elif os.path.isfile(name_or_path):
        model = load_file(name_or_path)
    else:
        raise CLIPError(f"no CLIP model named {name_or_path!r} (available: {', '.join(MODELS)}) and no file at "
                        f"{os.path.abspath(name_or_path)} (nor a model folder)")
    print(f"clip: {describe(model)}", file=sys.stderr)
    return model.to(device).eval()


def describe(model):
    """One line: where a model came from, its image tower, activation, resolution, normalisation and text tower."""
    p, v = getattr(model, "provenance", {}), model.visual
    act = {"quick_gelu": "QuickGELU", "gelu": "GELU"}[getattr(model, "activation", "quick_gelu")]
    ls = " with layer scale" if any(k.endswith("ls_1.gamma") for k in v.state_dict()) else ""
    mean, std = (", ".join(f"{x:.4g}" for x in t) for t in (getattr(v, "mean", MEAN), getattr(v, "std", STD)))
    tower = describe_encoder(v.state_dict())[2:]
    at = "" if tower.endswith("px)") else f" at {v.input_resolution} px"
    return (f"{p.get('source', 'a CLIP built in memory')}: {tower}{ls}{at}; activation {act} ({p.get('activation', 'the default')}); normalisation mean "
            f"({mean}) std ({std}) ({p.get('normalisation', 'the default')}); text tower width "
            f"{model.transformer.width}, {model.transformer.layers} layers ({p.get('text', 'its own')})")


OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                     "open_clip_pytorch_model.pth")  # open_clip's order of preference
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def load_folder(folder):
    """An open_clip hub folder or a transformers CLIPModel folder -> CLIP, built as its config says."""
    names = sorted(os.listdir(folder))
    if "open_clip_config.json" in names:
        weights = next((n for n in OPEN_CLIP_WEIGHTS if n in names), None)
        if weights is None:
            raise CLIPError(f"{folder} has open_clip_config.json but none of {', '.join(OPEN_CLIP_WEIGHTS)} "
                            f"(it holds {', '.join(names[:8])})")
        return load_file(os.path.join(folder, weights))
    if "config.json" in names:
        weights = next((n for n in HF_WEIGHTS if n in names), None)
        if weights is None:
            sharded = [n for n in names if n.endswith(".index.json")]
            why = f"sharded weights ({sharded[0]}) are not read" if sharded else f"none of {', '.join(HF_WEIGHTS)}"
            raise CLIPError(f"{folder} has config.json but {why} (it holds {', '.join(names[:8])})")
        return load_file(os.path.join(folder, weights))
    raise CLIPError(f"{folder} is neither an open_clip hub folder (open_clip_config.json + weights) nor a transformers "
                    f"CLIPModel folder (config.json + weights); it holds {', '.join(names[:8]) or 'nothing'}")


def load_file(path):
    """A checkpoint file -> CLIP. Its folder's open_clip_config.json or config.json, if there, says how to build it;
    without one, only OpenAI's key names are read, as OpenAI's architecture (QuickGELU), and the line says so."""
    folder = os.path.dirname(os.path.abspath(path))
    sd = read_state_dict(path)
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        config = os.path.join(folder, "config.json")
        if not os.path.isfile(config):
            raise CLIPError(f"{path} holds a transformers CLIPModel (vision_model.*, text_model.* keys) but there is no "
                            f"config.json beside it: its activation and heads cannot be known; put its config.json there")
        return from_transformers(sd, path, read_json(config), folder)
    config = os.path.join(folder, "open_clip_config.json")
    if os.path.isfile(config):
        return from_open_clip(sd, path, read_json(config))
    if os.path.basename(path) in OPEN_CLIP_WEIGHTS or path.endswith(".safetensors"):
        raise CLIPError(f"{path} is an open_clip or transformers weights file without its config "
                        "(open_clip_config.json or config.json beside it): its activation (GELU or QuickGELU) and "
                        "normalisation cannot be known; download its folder whole and pass the folder")
    model = model_from_state_dict(sd, path)
    how = ("a TorchScript archive, OpenAI's format" if is_torchscript(path) else "a bare state dict does not say its "
           "activation: OpenAI's architecture, as its OpenAI key names; an open_clip GELU model needs its "
           "open_clip_config.json beside it")
    model.provenance = dict(source=path, activation=how, normalisation="OpenAI's")
    return model


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CLIPError(f"{path} is not readable JSON ({one_line(e)})") from None


def vision_kind(name_or_path):
    """'vit' or 'resnet': the image tower of a model name, folder or state dict file (its keys or config only,
    memory-mapped); None when it cannot be told without building the model (a TorchScript file, an unknown name).
    Downloads nothing, so scripts can refuse an architecture they cannot use before any expensive work."""
    if name_or_path in MODELS:
        return "resnet" if name_or_path.startswith("RN") else "vit"
    if os.path.isdir(name_or_path):
        config = os.path.join(name_or_path, "open_clip_config.json")
        if os.path.isfile(config):
            try:
                vision = read_json(config).get("model_cfg", {}).get("vision_cfg", {})
            except (CLIPError, AttributeError):
                return None
            return None if vision.get("timm_model_name") else "resnet" if isinstance(vision.get("layers"), list) else "vit"
        return "vit" if os.path.isfile(os.path.join(name_or_path, "config.json")) else None
    if not os.path.isfile(name_or_path) or zipfile.is_zipfile(name_or_path) and is_torchscript(name_or_path):
        return None
    state_dict = None
    if name_or_path.endswith(".safetensors"):
        try:
            state_dict = read_safetensors(name_or_path, header_only=True)
        except CLIPError:
            return None
    for mmap in () if state_dict is not None else (True, False):  # mmap reads no weights, but needs torch.save's zip
        try:
            state_dict = torch.load(name_or_path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:
            continue
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    keys = {str(k).removeprefix("module.") for k in state_dict} if isinstance(state_dict, dict) else set()
    if "visual.proj" in keys or "visual.class_embedding" in keys or "vision_model.embeddings.class_embedding" in keys:
        return "vit"
    if any(k.startswith("visual.attnpool.") for k in keys):
        return "resnet"
    return None


def read_state_dict(path):
    """A TorchScript archive, a torch.save'd checkpoint or a .safetensors file -> {name: tensor}."""
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path, header_only=False):
    """A .safetensors file -> {name: tensor}: 8 bytes of little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets into the buffer after the header), the raw buffer.
    With header_only, {name: shape} without reading the weights."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            size = os.fstat(f.fileno()).st_size
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            if header_only:
                return {k: tuple(h["shape"]) for k, h in header.items()}
            buffer = f.read()
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CLIPError(f"{path} is not a readable .safetensors file ({one_line(e)})") from None
    out = {}
    for name, h in header.items():
        dtype = SAFETENSORS_DTYPES.get(h.get("dtype"))
        if dtype is None:
            raise CLIPError(f"{path}: tensor {name} has dtype {h.get('dtype')}, which is not read (only "
                            f"{', '.join(SAFETENSORS_DTYPES)})")
        (begin, end), shape = h["data_offsets"], tuple(h["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(buffer) or end - begin != count * dtype.itemsize:
            raise CLIPError(f"{path}: tensor {name} ({h['dtype']} {list(shape)}) has offsets {begin}-{end} that do not "
                            f"fit it or the {len(buffer)}-byte buffer; the file is truncated or broken")
        data = bytearray(buffer[begin:end])  # a copy: aligned, and writable
        out[name] = torch.frombuffer(data, dtype=dtype).reshape(shape) if count else torch.empty(shape, dtype=dtype)
    return out


def is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def model_from_state_dict(state_dict, path, **options):
    missing = [k for k in REQUIRED if k not in state_dict]
    if missing:
        raise CLIPError(f"{path} is not a CLIP state dict: it lacks {', '.join(missing)} "
                        f"(it has {len(state_dict)} keys, e.g. {', '.join(list(state_dict)[:3]) or 'none'})")
    broken = nonfinite(state_dict)
    if broken:
        raise CLIPError(f"{path}: {len(broken)} of its {len(state_dict)} weight tensors hold NaN or inf "
                        f"({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}); the weights are broken")
    known = clip_names()
    unknown = [k for k in state_dict if _generic(k) not in known and k not in NON_WEIGHTS]
    if unknown:
        raise CLIPError(f"{path}: these keys are not OpenAI's CLIP architecture: {', '.join(unknown[:6])}"
                        f"{f' and {len(unknown) - 6} more' if len(unknown) > 6 else ''} (a non-OpenAI tower, e.g. "
                        "timm's ConvNeXt or a transformers text tower, is not built)")
    try:
        model = build_model(state_dict, **options)
    except Exception as e:
        raise CLIPError(f"{path} does not fit the CLIP architecture: {one_line(e)}") from None
    fault = encoder_fault(model.visual)
    if fault:
        raise CLIPError(f"{path}: the weights of its image encoder {fault}; the weights are broken")
    return model


def nonfinite(state_dict):
    """The keys of the floating-point tensors that hold NaN or inf."""
    return [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


@torch.no_grad()
def encoder_fault(visual):
    """None for a good image encoder, one that computes finite features; else what is wrong, a phrase after "the
    weights": tensors that hold NaN or inf, or finite weights whose features are not (thrown to ~1e38 by a diverging
    update). The features are those of one fixed image, in eval mode (the mode is restored), on the encoder's device."""
    sd = visual.state_dict()
    broken = nonfinite(sd)
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        return f"hold NaN or inf in {len(broken)} of {len(sd)} tensors ({', '.join(broken[:3])}{more})"
    p, r, training = next(visual.parameters()), visual.input_resolution, visual.training
    x = torch.linspace(-2, 2, 3 * r * r, device=p.device, dtype=p.dtype).view(1, 3, r, r)  # normalised pixels
    try:
        features = visual.eval()(x)
    finally:
        visual.train(training)
    if not torch.isfinite(features).all():
        top = max(v.abs().max().item() for v in sd.values() if v.is_floating_point() and v.numel())
        return f"are finite (up to {top:.1e}) but the features they compute are NaN or inf (on a fixed image)"
    return None


NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


@functools.cache
def clip_names():
    """Every key of an OpenAI CLIP (ViT or ResNet, with or without layer scale), block numbers as N."""
    with torch.random.fork_rng(devices=[]):  # building draws random weights: leave the caller's generator alone
        return _clip_names()


def _clip_names():
    vit = CLIP(8, 16, 1, 64, 16, 4, 8, 64, 1, 1, vision_layer_scale=True, text_layer_scale=True)
    rn = CLIP(8, 32, (1, 1, 1, 1), 2, None, 4, 8, 64, 1, 1)
    return {_generic(k) for m in (vit, rn) for k in m.state_dict()}


# ----------------------------------------------------------------------------- open_clip and transformers models
# Every config field that changes the computation is checked: a value other than the one OpenAI's architecture has
# is refused, naming it, rather than built approximately. Fields that only matter in training are ignored.

OPEN_CLIP_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "cast_dtype", "custom_text"}
OPEN_CLIP_VISION = dict(head_width=64, mlp_ratio=4.0, attentional_pool=False, no_ln_pre=False, pos_embed_type="learnable",
                        final_ln_after_pool=False, pool_type="tok", act_kwargs=None, norm_kwargs=None, block_type=None,
                        qk_norm=False, scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
                        scale_attn=False, scale_fc=False, timm_model_name=None, image_seq_len=None)
OPEN_CLIP_TEXT = dict(text_arch="clip", vocab_size=49408, mlp_ratio=4.0, embed_cls=False, no_causal_mask=False,
                      final_ln_after_pool=False, pool_type="argmax", proj_bias=False, proj_type="linear",
                      act_kwargs=None, norm_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                      scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False, hf_model_name=None,
                      hf_tokenizer_name=None, tokenizer_type="", variable_text=False)
OPEN_CLIP_IGNORED = {"layers", "width", "patch_size", "image_size", "heads", "context_length", "ls_init_value",
                     "patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "pad_id", "eos_id",
                     "bos_id", "tokenizer_kwargs", "tokenizer_mode", "timm_model_pretrained", "timm_pool", "timm_proj",
                     "timm_proj_bias", "timm_drop", "timm_drop_path", "timm_model_kwargs", "hf_model_pretrained",
                     "hf_proj_type", "hf_pooler_type", "hf_model_config", "tiktoken_name"}


def refuse_fields(cfg, fixed, where, path):
    """CLIPError naming the first field of `cfg` that is unknown or differs from the value in `fixed`."""
    for key, value in cfg.items():
        if key in fixed and value != fixed[key] and not (key == "block_type" and value == "default"):
            name = f"a timm tower ({value})" if key == "timm_model_name" else (
                f"a transformers text tower ({value})" if key == "hf_model_name" else f"{key} {value!r}")
            raise CLIPError(f"{path}: {where} has {name}; only OpenAI's CLIP architecture is built here (its "
                            f"{key} is {fixed[key]!r}), so this model is refused rather than run approximately")
        if key not in fixed and key not in OPEN_CLIP_IGNORED:
            raise CLIPError(f"{path}: {where} has the field {key!r} ({value!r}), not understood here; refused "
                            "rather than built without it")


def from_open_clip(sd, path, config):
    """An open_clip state dict (OpenAI's key names) and its open_clip_config.json -> CLIP."""
    where = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    cfg = config.get("model_cfg", config)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict) or not isinstance(cfg.get("text_cfg"), dict):
        raise CLIPError(f"{where} has no model_cfg with vision_cfg and text_cfg; it is not an open_clip model config")
    unknown = sorted(set(cfg) - OPEN_CLIP_TOP)
    if unknown or cfg.get("custom_text"):
        what = f"the fields {', '.join(unknown)}" if unknown else "custom_text (a separate text model)"
        raise CLIPError(f"{where} has {what}: not OpenAI's CLIP architecture, refused")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    refuse_fields(vision, OPEN_CLIP_VISION, "vision_cfg", where)
    refuse_fields(text, OPEN_CLIP_TEXT, "text_cfg", where)
    if text.get("heads", 8) * 64 != text.get("width", 512):
        raise CLIPError(f"{where}: text_cfg has {text.get('heads', 8)} heads of width {text.get('width', 512)}; only "
                        "OpenAI's 64-wide heads are built")
    activation = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    pre = config.get("preprocess_cfg") or {}
    mean, std = pre.get("mean", MEAN), pre.get("std", STD)
    why = ("open_clip_config.json preprocess_cfg" if "mean" in pre and "std" in pre else
           "OpenAI's, open_clip's default: open_clip_config.json has no preprocess_cfg mean/std")
    model = model_from_state_dict(sd, path, activation=activation, mean=triple(mean, where), std=triple(std, where))
    check_config_shapes(model, path, where, vision.get("width"), vision.get("layers"), vision.get("patch_size"),
                        vision.get("image_size"), text.get("width"), text.get("layers"))
    act = "open_clip_config.json quick_gelu true" if cfg.get("quick_gelu") else "open_clip_config.json: no quick_gelu"
    model.provenance = dict(source=f"{path} (open_clip)", activation=act, normalisation=why)
    return model


def triple(value, where):
    value = [value] * 3 if isinstance(value, (int, float)) else value
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(x, (int, float)) for x in value)):
        raise CLIPError(f"{where}: the image mean/std {value!r} is not 3 numbers")
    return tuple(float(x) for x in value)


def check_config_shapes(model, path, where, width, layers, patch, size, text_width, text_layers):
    """CLIPError when a config's tower sizes are not those of the weights (a config of another model)."""
    v = model.visual
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else size
    held = {"image size": v.input_resolution, "text width": model.transformer.width,
            "text layers": model.transformer.layers}
    if isinstance(v, VisionTransformer):
        held.update({"vision width": v.conv1.out_channels, "vision layers": v.transformer.layers,
                     "patch size": v.conv1.kernel_size[0]})
    said = {"vision width": width, "vision layers": layers, "patch size": patch, "image size": size,
            "text width": text_width, "text layers": text_layers}
    wrong = [f"{k} {said[k]} (weights: {held[k]})" for k in held if said.get(k) is not None and said[k] != held[k]]
    if wrong:
        raise CLIPError(f"{path}: {where} does not describe these weights: {', '.join(wrong)}")


HF_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
               max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
HF_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
HF_NAMES = [("embeddings.patch_embedding.weight", "conv1.weight"), ("embeddings.class_embedding", "class_embedding"),
            ("embeddings.position_embedding.weight", "positional_embedding"), ("pre_layrnorm.", "ln_pre."),
            ("post_layernorm.", "ln_post."), ("embeddings.token_embedding.", "token_embedding."),
            ("final_layer_norm.", "ln_final."), ("encoder.layers.", "transformer.resblocks."),
            ("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
            ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def from_transformers(sd, path, config, folder):
    """A transformers CLIPModel state dict and its config.json (+ preprocessor_config.json) -> CLIP."""
    where = os.path.join(folder, "config.json")
    if config.get("model_type") != "clip":
        raise CLIPError(f"{where} is a {config.get('model_type')!r} model ({', '.join(config.get('architectures') or [])}),"
                        " not a transformers CLIPModel (model_type 'clip'); refused")
    towers = {}
    for name, defaults in (("text", HF_TEXT), ("vision", HF_VISION)):
        cfg = {**defaults, **(config.get(f"{name}_config") or {}), **(config.get(f"{name}_config_dict") or {})}
        bad = [f"{k} {cfg[k]!r}" for k in ("layer_norm_eps", "num_channels") if k in defaults and cfg[k] != defaults[k]]
        if cfg["hidden_act"] not in ("quick_gelu", "gelu"):
            bad.append(f"hidden_act {cfg['hidden_act']!r} (only quick_gelu and gelu are built)")
        if cfg["num_attention_heads"] * 64 != cfg["hidden_size"] or cfg["intermediate_size"] != 4 * cfg["hidden_size"]:
            bad.append(f"{cfg['num_attention_heads']} heads and an MLP of {cfg['intermediate_size']} for width "
                       f"{cfg['hidden_size']} (OpenAI's shape: 64-wide heads, 4x MLP)")
        if name == "text" and (cfg["vocab_size"] != 49408 or cfg["eos_token_id"] not in (2, 49407)):
            bad.append(f"vocab_size {cfg['vocab_size']} / eos_token_id {cfg['eos_token_id']} (not OpenAI's tokenizer)")
        if bad:
            raise CLIPError(f"{where}: {name}_config has {'; '.join(bad)}; refused rather than built approximately")
        towers[name] = cfg
    if towers["text"]["hidden_act"] != towers["vision"]["hidden_act"]:
        raise CLIPError(f"{where}: the towers' hidden_act differ ({towers['vision']['hidden_act']} vision, "
                        f"{towers['text']['hidden_act']} text); only one activation for both is built")
    model = model_from_state_dict(openai_names(sd, path), path, activation=towers["vision"]["hidden_act"],
                                  **hf_normalisation(folder))
    v, t = towers["vision"], towers["text"]
    check_config_shapes(model, path, where, v["hidden_size"], v["num_hidden_layers"], v["patch_size"], v["image_size"],
                        t["hidden_size"], t["num_hidden_layers"])
    pre = os.path.join(folder, "preprocessor_config.json")
    model.provenance = dict(source=f"{path} (transformers CLIPModel)", activation=f"config.json hidden_act "
                            f"{v['hidden_act']}", normalisation="preprocessor_config.json image_mean/image_std"
                            if os.path.isfile(pre) else "no preprocessor_config.json: OpenAI's, the default of "
                            "transformers' CLIPImageProcessor")
    return model


def hf_normalisation(folder):
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    pre = read_json(path)
    return dict(mean=triple(pre.get("image_mean", MEAN), path), std=triple(pre.get("image_std", STD), path))


def openai_names(sd, path):
    """transformers CLIPModel keys -> OpenAI's: q/k/v projections concatenated, projection matrices transposed."""
    out, qkv = {}, {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
            out[{"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}.get(key, key)] = (
                value.t() if key.endswith("weight") else value)
            continue
        tower, _, rest = key.partition(".")
        if tower not in ("vision_model", "text_model"):
            out[key] = value  # refused by model_from_state_dict, naming it
            continue
        for hf, ours in HF_NAMES:
            rest = rest.replace(hf, ours)
        new = ("visual." if tower == "vision_model" else "") + rest
        for p in ("q", "k", "v"):
            if f".self_attn.{p}_proj." in new:
                block, kind = new.split(f".self_attn.{p}_proj.")
                qkv.setdefault((block, kind), {})[p] = value
                break
        else:
            out[new] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CLIPError(f"{path}: {block} lacks some of the q/k/v projections ({', '.join(sorted(parts))} found)")
        out[f"{block}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


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
    if os.path.isdir(path):
        raise CLIPError(f"{path} is a folder: --checkpoint takes a file holding an image encoder; a model folder "
                        f"(open_clip or transformers) is a whole CLIP: pass it as --model {path} instead")
    if not os.path.isfile(path):
        raise CLIPError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:  # numpy scalars are allowed: TeCoA's and PMG-AFT's checkpoints store best_acc1 as one
        with torch.serialization.safe_globals(NUMPY_SCALARS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIPError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


# (name, test, get): the first layout whose test passes gives the encoder. Keys may carry "module." (DataParallel) or
# "_orig_mod." (torch.compile) and, in open_clip files, layer scales (ls_1/ls_2.gamma); load_visual folds those into
# the projections when --model's tower has none.
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
    """Every key an OpenAI ViT or ResNet image tower can have (layer scales too), block numbers as N."""
    return {k[len("visual."):] for k in clip_names() if k.startswith("visual.")}


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
    if found is None and any(k.startswith("vision_model.") for k in top):
        raise CLIPError(f"{path} holds a transformers CLIPModel (vision_model.* keys): a whole CLIP with its own config; "
                        "pass its folder (config.json beside the weights) as --model instead")
    if found is None:
        keys = list(top)[:6] if top else type(ckpt).__name__
        raise CLIPError(f"{path}: unknown checkpoint layout, no image encoder found; keys not understood: {keys} "
                         f"(readable: ours, vision_encoder_state_dict, AGFT's modules, (visual.)conv1.weight... state dicts)")
    name, get = found
    sd = strip_prefix(get(top))
    if name.startswith("CLIP state dict"):
        sd.update({k: v for k, v in top.items() if not k.startswith("visual.") and not k.startswith(TEXT_KEYS)})
    known = image_tower_names()
    unknown = [k for k in sd if _generic(k) not in known]
    if unknown:
        more = f" and {len(unknown) - 6} more" if len(unknown) > 6 else ""
        raise CLIPError(f"{path}: {name}, but these keys are not understood: {', '.join(unknown[:6])}{more} (only "
                         "OpenAI-architecture ViT/ResNet image encoders can be mapped)")
    broken = nonfinite(sd)
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise CLIPError(f"{path}: {name}, but {len(broken)} of its {len(sd)} weight tensors hold NaN or inf "
                         f"({', '.join(broken[:3])}{more}); the weights are broken (a diverged run?): use an earlier "
                         "checkpoint")
    return name, sd


def model_phrase(model_name, source=None):
    """How an error names the model: "--model X" when typed, else "X (source)", e.g. the default's or the
    checkpoint's "model" field, so that no error names a flag that was not given."""
    return f"--model {model_name}" if source is None else f"{model_name} ({source})"


def check_encoder_fits(sd, path, model_name, ours=None, source=None):
    """UsageError (one line) when the model (--model, or where `source` says it came from) is one of OpenAI's
    architectures and the checkpoint's encoder is recognisably another one (a ViT for a ResNet, ViT-L/14 for
    ViT-B/32): before that model is downloaded."""
    if model_name not in available_models():
        return
    kind, held = vision_kind(model_name), describe_encoder(sd)
    named = next((n for n in VIT_NAMES.values() if held == f"a {n} image encoder"), None)
    vit = "positional_embedding" in sd and "proj" in sd and "conv1.weight" in sd
    if (kind == "resnet" and not vit) or (kind == "vit" and held == f"a {model_name} image encoder"):
        return  # a ResNet's exact shapes are compared once the model is built (load_visual)
    suggest = ours or named or "<its CLIP>"
    raise CLIPError(f"{path} holds {held}{f' ({ours})' if ours else ''}, not the one of "
                     f"{model_phrase(model_name, source)} (a {'ResNet' if kind == 'resnet' else model_name} image "
                     f"encoder); pass --model {suggest}")


def check_text_tower(ckpt, model, path, model_name, source=None):
    """CLIPError when a whole-CLIP checkpoint's text tower is not --model's (another pre-training, e.g. LAION's):
    --checkpoint replaces the image encoder only, so its own text tower would be silently dropped."""
    top = strip_prefix(ckpt) if isinstance(ckpt, dict) and all(isinstance(k, str) for k in ckpt) else {}
    for key, ours in model.state_dict().items():
        theirs = top.get(key)
        if key.startswith("visual.") or not torch.is_tensor(theirs):
            continue
        same = theirs.shape == ours.shape and (theirs.float() - ours).norm() <= 1e-3 * ours.norm() + 1e-6
        if not same:
            raise CLIPError(f"{path} is a whole CLIP whose text tower is not {model_phrase(model_name, source)}'s "
                            f"({key} differs); --checkpoint replaces the image encoder only: pass it as --model {path} "
                            "instead (with its open_clip_config.json beside it if it is an open_clip model)")


def load_visual(model, path, model_name, ckpt=None, source=None):
    """Load the image encoder of a checkpoint into model.visual and return the checkpoint (read here unless given).

    Reads our scripts' checkpoints and the released ones of the other codebases (CHECKPOINT_FORMATS), says on stderr
    which layout it found and which architecture it runs as, and refuses (CLIPError) keys it cannot map, encoders
    of another architecture (source: where model_name came from, when not --model), whole CLIPs with another text
    tower and weights that compute no finite features (encoder_fault)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    name, sd = checkpoint_encoder(ckpt, path)
    if name.startswith("CLIP state dict"):  # only there are top-level keys text-tower keys
        check_text_tower(ckpt, model, path, model_name, source)
    expected = model.visual.state_dict()
    if not any(k.endswith(".ls_1.gamma") for k in expected):
        sd = fold_layer_scale(sd)
    if set(sd) != set(expected) or any(sd[k].shape != v.shape for k, v in expected.items() if k in sd):
        if all(k in expected and v.shape == expected[k].shape for k, v in sd.items()):  # our architecture, cut short
            missing = [k for k in expected if k not in sd]
            raise CLIPError(f"{path}: {name}, but {len(missing)} keys are missing: {', '.join(missing[:6])}")
        ours = ckpt.get("model") if name == "nanoZSAR checkpoint" else None
        raise CLIPError(f"{path} holds {describe_encoder(sd)}{f' ({ours})' if ours else ''}, not the one of "
                         f"{model_phrase(model_name, source)} ({describe_encoder(expected)}); pass --model "
                         f"{ours or '<its CLIP>'}")
    model.visual.load_state_dict(sd)
    fault = encoder_fault(model.visual)
    if fault:
        raise CLIPError(f"{path}: {name}, whose weights {fault}; the weights are broken (a diverged run?): use an "
                        "earlier checkpoint")
    act = {"quick_gelu": "QuickGELU", "gelu": "GELU"}[getattr(model, "activation", "quick_gelu")]
    how = ("the model it was trained from" if name == "nanoZSAR checkpoint" and ckpt.get("model") == model_name
           else "an image encoder's keys do not say its activation")
    print(f"checkpoint: {path}: {name}, {describe_encoder(sd)}; run in {model_phrase(model_name, source)}'s architecture: {act}, "
          f"{model.visual.input_resolution} px, its normalisation and text tower ({how})", file=sys.stderr)
    return ckpt
