"""A small CLIP: OpenAI's architecture and checkpoints (model.py, tokenizer.py, loader.py), the open_clip and
transformers models of that architecture (GELU or QuickGELU, layer scale, their own normalisation), and the checkpoints
of fine-tuned image encoders that robust-CLIP codebases release (loader.py).

    model = clip.load("ViT-B/32")                       # eval mode, fp32; or an open_clip / transformers folder
    text = clip.encode_text(model, ["a photo of a dog"])  # [C, D], L2-normalised
    classify = clip.ZeroShotClassifier(clip.ImageEncoder(model.visual), text)  # [0,1] images -> logits
    clip.load_visual(model, "ckpt.pt", "ViT-B/32")      # a fine-tuned image encoder into model.visual
"""
import torch
import torch.nn.functional as F

from .loader import (CLIPError, available_models, checkpoint_encoder, describe, load, load_visual, read_checkpoint,
                     read_safetensors, vision_kind)
from .model import CLIP, ImageEncoder, ZeroShotClassifier, build_model, cosine_logits
from .tokenizer import tokenize

__all__ = ["available_models", "load", "describe", "read_safetensors", "vision_kind", "read_checkpoint",
           "checkpoint_encoder", "load_visual", "tokenize", "encode_text", "CLIPError", "CLIP", "build_model", "ImageEncoder", "ZeroShotClassifier",
           "cosine_logits"]


@torch.no_grad()
def encode_text(model, prompts, batch_size=256):
    """L2-normalised fp32 text features [C, D] of C prompts (too-long prompts are truncated)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = next(model.parameters()).device
    features = [model.encode_text(tokenize(prompts[i:i + batch_size], model.context_length, truncate=True).to(device))
                for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(features).float(), dim=-1)
