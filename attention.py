"""Text-guided attention maps: where a class's text finds its class among a ViT's patch tokens. TGA-ZSR trains with
A(x, t) (text_guided), Comp-TGA with A_cls * (1 - A_non) (complementary), SAFT with A(x, mean of its description
heads); all three compare two maps with map_distance.

text_guided(tokens, t, size), from one encoder forward's tokens (every output token of the ViT after ln_post and the
projection, [B, 1+P, D]) and each sample's text feature t ([B, D]):
  1. each feature channel is divided by its L2 norm over the token axis (the CLS token included), not per token;
  2. the P patch tokens are kept and each scored by its dot product with t;
  3. the P scores are min-max normalised per image (+1e-8 in the denominator: a constant map gives 0, not NaN);
  4. reshaped row-major to sqrt(P) x sqrt(P), the patch grid;
  5. upsampled bilinearly (align_corners=False) to `size`, the input's H x W.
The paper's Eq. 6 (equation numbers here and in the scripts are those of the journal version, which restates TGA-ZSR
beside Comp-TGA) resizes before it normalises and names no channel normalisation; this is the authors' code's order,
which made the published numbers.
"""
import torch
import torch.nn.functional as F


def text_guided(tokens, text, size):
    """A(x, t), [B, H, W] in [0, 1] (steps 1-5 above). In fp32 even under autocast: min-max magnifies rounding."""
    with torch.autocast(tokens.device.type, enabled=False):
        tokens = tokens.float()
        tokens = tokens / tokens.norm(dim=1, keepdim=True)
        scores = torch.einsum("bpd,bd->bp", tokens[:, 1:], text.float())
        lo, hi = scores.min(dim=1, keepdim=True).values, scores.max(dim=1, keepdim=True).values
        scores = (scores - lo) / (hi - lo + 1e-8)
        g = round(scores.shape[1] ** 0.5)
        maps = F.interpolate(scores.view(-1, 1, g, g), size=size, mode="bilinear", align_corners=False)
    return maps[:, 0]


def complementary(tokens, text_cls, text_non, size):
    """Comp-TGA's map A_cls * (1 - A_non) (Comp-TGA Eq. 6-8), [B, H, W] in [0, 1]: text_cls and text_non [B, D] are the
    features of each sample's class prompt ("This is a photo of a {c}") and non-class prompt ("This is not a photo
    of a {c}"). Both maps come from the same tokens, each normalised and upsampled on its own; the product is not
    renormalised."""
    return text_guided(tokens, text_cls, size) * (1 - text_guided(tokens, text_non, size))


def map_distance(a, b):
    """The distance between two maps (TGA-ZSR Eq. 9, 12): ||a - b||_2 over each flattened H*W map, unsquared, averaged
    over the batch."""
    return (a - b).flatten(1).norm(dim=1).mean()
