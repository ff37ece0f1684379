"""The pictures, drawn with Pillow: grids of images with notes (evaluate.py's examples and attention maps), a heat
map overlay, and line plots (the training curves of harness.TrainLog)."""
import math

import torch

TILE = 128  # images smaller than this are upscaled (nearest neighbour) by an integer factor
MARGIN, HEADER, TEXT_W, LINE = 4, 16, 200, 12
GOOD, BAD = "#1a7f37", "#c62828"


def tile_scale(h, w):
    return max(1, math.ceil(TILE / max(h, w)))


def grid_size(cols, rows, h, w):
    """(width, height) of save_grid's picture: rows x cols tiles of h x w images, and a text column on the right."""
    s = tile_scale(h, w)
    return MARGIN + cols * (w * s + MARGIN) + TEXT_W, HEADER + rows * (h * s + MARGIN)


def to_pil(x, scale=1):
    from PIL import Image
    arr = x.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def heat(m):
    """[H,W] map in [0,1] -> [3,H,W] colours: dark blue, blue, cyan, yellow, red (a jet-like ramp)."""
    stops = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.3, 1.0], [0.0, 0.9, 0.9], [1.0, 0.9, 0.0], [0.9, 0.0, 0.0]])
    t = m.detach().float().cpu().clamp(0, 1) * (len(stops) - 1)
    lo = t.floor().long().clamp(max=len(stops) - 2)
    frac = (t - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).permute(2, 0, 1)


def overlay(x, m):
    return 0.5 * x.detach().float().cpu() + 0.5 * heat(m)


def save_grid(path, rows, headers, notes, note_header=""):
    """One PNG: rows of equal-size [3,H,W] images in [0,1] under column headers, each row followed by its notes,
    lines of (text, colour)."""
    from PIL import Image, ImageDraw
    h, w = rows[0][0].shape[-2:]
    s = tile_scale(h, w)
    img = Image.new("RGB", grid_size(len(headers), len(rows), h, w), "white")
    draw = ImageDraw.Draw(img)
    text_x = MARGIN + len(headers) * (w * s + MARGIN)
    for j, head in enumerate(headers + [note_header]):
        draw.text((MARGIN + j * (w * s + MARGIN), 2), head, fill="black")
    for i, (tiles, lines) in enumerate(zip(rows, notes)):
        y = HEADER + i * (h * s + MARGIN)
        for j, tile in enumerate(tiles):
            img.paste(to_pil(tile, s), (MARGIN + j * (w * s + MARGIN), y))
        for k, (text, colour) in enumerate(lines):
            draw.text((text_x, y + 2 + LINE * k), text[:40], fill=colour)
    img.save(path, optimize=True)


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]  # one per series

def nice_ticks(lo, hi, n=5, least=0.0):
    raw = max((hi - lo) / n, least)
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** math.floor(math.log10(raw)) >= raw)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def plot_curves(path, panels, size=(440, 280)):
    """One PNG of line plots side by side; panels: [(title, {series name: [(x, y), ...]})]."""
    from PIL import Image, ImageDraw
    pw, ph = size
    img = Image.new("RGB", (pw * len(panels), ph), "white")
    draw = ImageDraw.Draw(img)
    for p, (title, series) in enumerate(panels):
        legend = 110 if len(series) > 1 else 0
        x0, y0, x1, y1 = p * pw + 50, 22, (p + 1) * pw - 14 - legend, ph - 30
        draw.text((x0, 5), title, fill="black")
        pts = [pt for s in series.values() for pt in s]
        if not pts:
            draw.text((x0, y0 + 20), "not measured", fill="black")
            continue
        xlo, xhi = min(x for x, _ in pts), max(x for x, _ in pts)
        ylo, yhi = min(y for _, y in pts), max(y for _, y in pts)
        xhi, (ylo, yhi) = max(xhi, xlo + 1), (ylo - 0.5, yhi + 0.5) if yhi - ylo < 1e-6 else (ylo, yhi)
        pad = 0.05 * (yhi - ylo)
        ylo, yhi = ylo - pad, yhi + pad
        X = lambda v: x0 + (v - xlo) / (xhi - xlo) * (x1 - x0)  # noqa: E731
        Y = lambda v: y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)  # noqa: E731
        for t in nice_ticks(ylo, yhi):
            draw.line([(x0, Y(t)), (x1, Y(t))], fill="#e8e8e8")
            draw.text((p * pw + 4, Y(t) - 6), f"{t:.4g}", fill="black")
        for t in nice_ticks(xlo, xhi, least=1):  # steps: whole numbers
            draw.line([(X(t), y1), (X(t), y1 + 3)], fill="black")
            draw.text((X(t) - 8, y1 + 5), f"{t:.4g}", fill="black")
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text(((x0 + x1) // 2 - 10, ph - 13), "step", fill="black")
        for k, (name, s) in enumerate(series.items()):
            colour = "black" if name == "mean" else PALETTE[k % len(PALETTE)]
            line = [(X(x), Y(y)) for x, y in s]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            for px, py in line if len(line) <= 40 else []:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            if legend:
                ly = y0 + 4 + 12 * k
                draw.line([(x1 + 8, ly + 6), (x1 + 22, ly + 6)], fill=colour, width=2)
                draw.text((x1 + 26, ly), name[:16], fill="black")
    img.save(path, optimize=True)
