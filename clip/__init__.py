"""A small CLIP: OpenAI's architecture and checkpoints (model.py, tokenizer.py, loader.py), the open_clip and
transformers models of that architecture (GELU or QuickGELU, layer scale, their own normalisation), and the checkpoints
of fine-tuned image encoders that robust-CLIP codebases release (loader.py).

    model = clip.load("ViT-B/32")                       # eval mode, fp32; or an open_clip / transformers folder
    text = clip.encode_text(model, ["a photo of a dog"])  # [C, D], L2-normalised
    classify = clip.ZeroShotClassifier(clip.ImageEncoder(model.visual), text)  # [0,1] images -> logits
    clip.load_visual(model, "ckpt.pt", "ViT-B/32")      # a fine-tuned image encoder into model.visual
    clip.encoder_fault(model.visual)                    # None for an encoder that computes finite features
    clip.check_distinct([prompts], names, model.context_length, "cifar10")  # classes the model cannot tell apart
"""
import sys

import torch
import torch.nn.functional as F

from .loader import (CLIPError, available_models, checkpoint_encoder, describe, encoder_fault, load, load_visual,
                     read_checkpoint, read_safetensors, vision_kind)
from .model import CLIP, ImageEncoder, ZeroShotClassifier, build_model, cosine_logits
from .tokenizer import tokenize

__all__ = ["available_models", "load", "describe", "read_safetensors", "vision_kind", "read_checkpoint",
           "checkpoint_encoder", "load_visual", "encoder_fault", "tokenize", "encode_text", "check_distinct", "CLIPError",
           "CLIP", "build_model", "ImageEncoder", "ZeroShotClassifier", "cosine_logits"]


@torch.no_grad()
def encode_text(model, prompts, batch_size=256):
    """L2-normalised fp32 text features [C, D] of C prompts (too-long prompts are truncated)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = next(model.parameters()).device
    features = [model.encode_text(tokenize(prompts[i:i + batch_size], model.context_length, truncate=True).to(device))
                for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(features).float(), dim=-1)


WARNED = set()  # the warnings check_distinct has printed in this process


def check_distinct(heads, names, context_length=77, what="", kind="classes", fix="rename one of them", paper=False):
    """CLIPError (one line) naming two classes the model cannot tell apart: their prompts give the same token ids
    (after the tokenizer's lower case and spacing, and its cut at context_length) in every one of the text heads
    `heads` (K lists of C prompts), so the same text features, and a coin flip between them. names: the C names to
    say (kind: what they are). paper: the class list is a paper's own, whose repeats are its published protocol
    (ImageNet's "crane" and "maillot" come twice, "Cardigan" is "cardigan"): a warning on stderr, once, instead."""
    tokens = torch.stack([tokenize(list(head), context_length, truncate=True) for head in heads], 1)  # [C, K, L]
    seen, pairs = {}, []
    for i, row in enumerate(map(tuple, tokens.flatten(1).tolist())):
        if row in seen:
            pairs.append((seen[row], i))
        seen.setdefault(row, i)
    if not pairs:
        return
    a, b = pairs[0]
    pa, pb = heads[0][a], heads[0][b]
    same = (f"the same prompt {pa[:60]!r}" if pa == pb else f"the same prompt to the model ({pa!r} and {pb!r})"
            if len(pa + pb) <= 120 else "the same prompt to the model")
    every = f" in all {len(heads)} text heads" if len(heads) > 1 else ""
    more = f" [and {len(pairs) - 1} more pair(s)]" if len(pairs) > 1 else ""
    if not paper:
        raise CLIPError(f"{what}: the {kind} {names[a]!r} and {names[b]!r} give {same}{every} for CLIP (the same token "
                        f"ids, cut at {context_length} tokens), so the same text features{more}; {fix}")
    listed = ", ".join(f"{names[i]!r}{f' and {names[j]!r}' if names[i] != names[j] else ''} (classes {i} and {j})"
                       for i, j in pairs)
    msg = (f"warning: {what}: {listed} are the same text to the model: it cannot tell them apart (a coin flip); "
           "kept, as the paper's own class names have them")
    if msg not in WARNED:
        WARNED.add(msg)
        print(msg, file=sys.stderr)
