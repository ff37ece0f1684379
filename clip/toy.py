"""The toy CLIP: a tiny CLIP (ViT image tower) pre-trained contrastively on the toy world of `data.py`.

`clip.load("toy")` calls `load_toy()`: the weights are read from the cache, or pre-trained there on first use
(a few minutes on one CPU thread, deterministic from the seed) and saved as a plain state dict with OpenAI's key
names, so `build_model` loads it like any released checkpoint. Cache: $NANOZSAR_CACHE/toy_clip-<key>.pt, by default
under ~/.cache/nanozsar, where <key> hashes the architecture, the recipe and the world's version, so a changed
recipe never loads stale weights. A lock (flock on <file>.lock) lets one process pre-train while the others wait;
an unreadable cache file is pre-trained again.

The toy world runs on one CPU thread unless OMP_NUM_THREADS says otherwise: on a 2-core machine two threads are
about 1.8x faster when nothing else runs, and about nine times slower as soon as anything else does.
Measured numbers for the pre-trained model are in the README's toy section (`python toy_table.py` prints them).
"""
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from .loader import file_lock, write_atomically
from .model import CLIP, MEAN, STD, build_model

# ViT-B/32's architecture at toy scale: 32 px images cut into 4x4 patches (an 8x8 grid, so attention maps carry
# position), a 64-wide 2-layer text tower over the real BPE vocabulary (ids go up to 49407, so the embedding keeps
# all 49408 rows; unused rows never move).
TOY_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=4,
                  context_length=32, vocab_size=49408, transformer_width=64, transformer_heads=1,
                  transformer_layers=2)
TOY_STEPS, TOY_BATCH, TOY_LR, TOY_SEED = 1000, 128, 1e-3, 0
TOY_VERSION = 3  # of the world and the recipe: bump it when data.py's toy world or pre-training changes


def toy_key():
    recipe = [TOY_VERSION, TOY_CONFIG, TOY_STEPS, TOY_BATCH, TOY_LR, TOY_SEED]
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def toy_cache_path():
    root = os.environ.get("NANOZSAR_CACHE", os.path.expanduser("~/.cache/nanozsar"))
    return os.path.join(root, f"toy_clip-{toy_key()}.pt")


def toy_threads():
    """One CPU thread for the toy world unless OMP_NUM_THREADS is set (see the module docstring)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def sincos_2d(grid, channels, temperature=16.0):
    """2D sin-cos table [grid*grid, channels]: a quarter of the channels each for sin y, cos y, sin x, cos x."""
    q = channels // 4
    omega = temperature ** (-torch.arange(q) / q)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float), torch.arange(grid, dtype=torch.float), indexing="ij")
    ay, ax = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)


def build_toy(seed=TOY_SEED):
    """A freshly initialised toy CLIP. The patch tokens' positional embedding starts as a 2D sin-cos table over all
    channels (CLIP's random init otherwise): with CLIP's init, or sin-cos in a few channels only, whether the tiny
    ViT learns position within minutes depends on the seed and even on the float summation order; with the full
    table it learns position every time (background texture, which no task asks about, is what it gives up)."""
    torch.manual_seed(seed)
    model = CLIP(**TOY_CONFIG)
    grid = model.visual.input_resolution // model.visual.conv1.kernel_size[0]
    with torch.no_grad():
        model.visual.positional_embedding[1:] = sincos_2d(grid, model.visual.conv1.out_channels)
    return model


def _normalise(images):
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


class _Tokens:
    """clip.tokenize with a cache: the caption grammar repeats itself, BPE is the slow part of a step."""

    def __init__(self, context_length):
        from .tokenizer import tokenize
        self.tokenize, self.context_length, self.cache = tokenize, context_length, {}

    def __call__(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            self.cache.update(zip(new, self.tokenize(new, context_length=self.context_length, truncate=True)))
        return torch.stack([self.cache[t] for t in texts])


def pretrain_toy(path, steps=TOY_STEPS, batch_size=TOY_BATCH, lr=TOY_LR, seed=TOY_SEED,
                 warmup=0.05, weight_decay=0.1, log_every_s=5.0, log=print, callback=None):
    """Symmetric InfoNCE on fresh caption batches every step; AdamW, linear warm-up then cosine to 0.

    Saves the state dict (OpenAI key names) atomically to `path` and returns the model (eval mode).
    callback(step, model), if given, runs after every step (e.g. to record a learning curve).
    """
    from data import toy_caption_batch

    model = build_toy(seed)
    tokens = _Tokens(model.context_length)
    no_decay = ("token_embedding", "positional_embedding", "class_embedding")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not any(k in n for k in no_decay)]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not any(k in n for k in no_decay))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size)
    t0 = last = time.time()
    model.train()
    for step in range(1, steps + 1):
        images, captions = toy_caption_batch(batch_size, g)
        logits, _ = model(_normalise(images), tokens(captions))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if callback is not None:
            callback(step, model)
        if time.time() - last >= log_every_s or step == steps:
            last, el = time.time(), time.time() - t0
            log(f"toy pre-training: step {step}/{steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f}"
                f" lr {sched.get_last_lr()[0]:.2e} {el:.0f}s elapsed, ETA {el / step * (steps - step):.0f}s")
    model.eval()
    write_atomically(path, lambda f: torch.save(model.state_dict(), f), "wb")
    return model


def _read(path, log):
    try:
        return build_model(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # a truncated or foreign file: pre-train again rather than fail
        log(f"toy CLIP: the cached weights {path} are unreadable ({type(e).__name__}); pre-training them again")
        return None


def load_toy(device="cpu"):
    """The pre-trained toy CLIP (eval mode, fp32), pre-training it into the cache on first use."""
    toy_threads()
    path = toy_cache_path()
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    model = _read(path, log) if os.path.exists(path) else None
    if model is None:
        with file_lock(path, log):  # one process pre-trains; any other waits here, then reads its file
            model = _read(path, lambda s: None) if os.path.exists(path) else None
            if model is None:
                log(f"toy CLIP: no weights at {path}; pre-training them once (a few minutes on one CPU thread)")
                pretrain_toy(path, log=log)
                model = _read(path, log)
    return model.to(device)
