"""Tests of third-party checkpoints (evaluate.load_visual) and the pictures (examples, attention maps, curves).
CPU, offline, tiny random CLIPs. Run: OMP_NUM_THREADS=1 python -m pytest -q test_pictures.py"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import evaluate

# ----------------------------------------------------------------------------- fixtures (as in test_smoke.py)


def tiny_clip(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
               context_length=16, vocab_size=49408, transformer_width=32, transformer_heads=1, transformer_layers=1)
    return clip.CLIP(**{**cfg, **kw}).eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_clip.pt"
    torch.save(tiny_clip().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["red_thing", "green_thing", "blue_thing"]):
        os.makedirs(root / name)
        for i in range(6):
            img = torch.rand(40, 48, 3, generator=g) * 0.3
            img[..., c] += 0.7
            Image.fromarray((img.clamp(0, 1) * 255).byte().numpy()).save(root / name / f"{i}.png")
    return str(root)


def tecoa_args(tiny_ckpt, tiny_folder, out, *extra):
    return ["--model", tiny_ckpt, "--train-set", "imagefolder", "--data-root", tiny_folder, "--eval-sets", "imagefolder",
            "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "1", "--lr", "1e-3", "--workers", "0",
            "--device", "cpu", "--out-dir", str(out), *extra]


# ----------------------------------------------------------------------------- third-party checkpoints


def text_tower(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


def layouts():
    """{name: (checkpoint object, the format name load_visual should report)}: the released layouts of the other
    codebases, with their real key names, holding the image encoder of tiny_clip(seed=1)."""
    src = tiny_clip(seed=1)
    vis = src.visual.state_dict()
    full = src.state_dict()
    module = {f"module.{k}": v for k, v in vis.items()}
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-5, "params": list(range(len(vis)))}]}
    return {
        "ours": ({"visual": vis, "model": "tiny", "method": "tecoa", "step": 2}, "nanoZSAR"),
        # TeCoA / PMG-AFT (finetuning.py): prompter weights, epoch, best_acc1 as a numpy scalar, the optimizer
        "tecoa": ({"epoch": 10, "state_dict": {"pad_up": torch.zeros(1)}, "add_prompter": {},
                   "vision_encoder_state_dict": vis, "best_acc1": np.float64(31.5), "optimizer": optimizer},
                  "vision_encoder_state_dict"),
        "tecoa_module": ({"epoch": 10, "vision_encoder_state_dict": module}, "vision_encoder_state_dict"),
        # AGFT (MyCLIP.state_dict_train): modules by attribute path, params (prompts) empty; fp16 in their runs
        "agft": ({"modules": {"clip.visual": vis}, "params": {}}, "AGFT"),
        "clip_full": (full, "CLIP state dict"),
        "clip_full_ddp": ({f"module.{k}": v for k, v in full.items()}, "CLIP state dict"),
        "bare": (vis, "image-encoder state dict"),  # FARE's released files: open_clip's model.visual.state_dict()
    }


@pytest.mark.parametrize("layout", list(layouts()))
def test_third_party_layouts_load_the_same_encoder(layout, tmp_path, capsys):
    ckpt, fmt = layouts()[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    model = tiny_clip(seed=0)
    evaluate.load_visual(model, str(path), "tiny")
    want = tiny_clip(seed=1).visual.state_dict()
    got = model.visual.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(text_tower(model)["token_embedding.weight"], tiny_clip(seed=0).token_embedding.weight)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"checkpoint: {path}: ") and fmt in line


def test_open_clip_layer_scale_is_folded(tmp_path):
    """open_clip's x + gamma * f(x) (ls_1 / ls_2) loads as OpenAI's x + f'(x) with gamma in the last projection."""
    want = tiny_clip(seed=1).visual.state_dict()
    sd = {f"visual.{k}": v.clone() for k, v in want.items()}
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        for ls, proj in (("ls_1", "attn.out_proj"), ("ls_2", "mlp.c_proj")):
            gamma = torch.rand(64, generator=g) + 0.5
            sd[f"visual.transformer.resblocks.{i}.{ls}.gamma"] = gamma
            sd[f"visual.transformer.resblocks.{i}.{proj}.weight"] /= gamma[:, None]
            sd[f"visual.transformer.resblocks.{i}.{proj}.bias"] /= gamma
    torch.save(sd, tmp_path / "open_clip.pt")
    model = tiny_clip(seed=0)
    evaluate.load_visual(model, str(tmp_path / "open_clip.pt"), "tiny")
    got = model.visual.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_fp16_weights_load_as_fp32(tmp_path):
    vis = {k: v.half() for k, v in tiny_clip(seed=1).visual.state_dict().items()}
    torch.save({"modules": {"clip.visual": vis}, "params": {}}, tmp_path / "agft.pt")
    model = tiny_clip(seed=0)
    evaluate.load_visual(model, str(tmp_path / "agft.pt"), "tiny")
    assert all(v.dtype == torch.float32 and torch.equal(v, vis[k].float()) for k, v in model.visual.state_dict().items())


def test_unknown_layouts_are_refused_naming_the_keys(tmp_path):
    vis = tiny_clip(seed=1).visual.state_dict()
    cases = {
        "unknown": ({"encoder": {"w": torch.zeros(1)}, "epoch": 3}, "unknown checkpoint layout.*encoder.*epoch"),
        "extra": ({**vis, "prompt_pos_embedding": torch.zeros(2, 64)}, "not understood: prompt_pos_embedding"),
        "hf": ({"vision_model.embeddings.patch_embedding.weight": torch.zeros(1), "conv1.weight": vis["conv1.weight"]},
               "not understood: vision_model.embeddings.patch_embedding.weight"),
        "partial": ({k: v for k, v in vis.items() if k != "proj"}, "1 keys are missing: proj"),
        "wider": (tiny_clip(seed=1, vision_width=128).visual.state_dict(), "holds a ViT image encoder \\(width 128"),
        "list": ([1, 2], "unknown checkpoint layout.*list"),
    }
    for name, (obj, words) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(evaluate.UsageError, match=words):
            evaluate.load_visual(tiny_clip(), str(tmp_path / f"{name}.pt"), "tiny")


# ----------------------------------------------------------------------------- pictures


def test_save_examples_writes_a_grid_per_dataset(tiny_ckpt, tiny_folder, tmp_path):
    evaluate.main(["--model", tiny_ckpt, "--datasets", "imagefolder", "--data-root", tiny_folder, "--device", "cpu",
                   "--workers", "0", "--steps", "1", "--save-examples", "2", "--out-dir", str(tmp_path)])
    img = Image.open(tmp_path / "examples_imagefolder.png")
    assert img.size == evaluate.grid_size(3, 2, 32, 32) == (4 + 3 * (128 + 4) + 200, 16 + 2 * (128 + 4))
    px = np.asarray(img.convert("RGB"))
    tile = lambda j: px[16:16 + 128, 4 + j * 132:4 + j * 132 + 128]  # noqa: E731  row 0, column j
    assert (tile(0) != 255).any() and not np.array_equal(tile(0), tile(1))  # an image; the attack changed it
    assert np.array_equal(tile(0)[::4, ::4], tile(0)[1::4, 1::4])  # upscaled x4, nearest neighbour


def test_curve_and_attention_pictures_after_two_steps(tiny_ckpt, tiny_folder, tmp_path):
    import tga_zsr
    tga_zsr.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path, "--eval-every", "1", "--save-attention", "2"))
    curve = json.load(open(tmp_path / "curve.json"))
    assert [s for s, _ in curve["clean_accuracy"]] == [0, 1, 2] and [s for s, _ in curve["step_loss"]] == [1, 2]
    assert all(0 <= acc["imagefolder"] <= 100 for _, acc in curve["clean_accuracy"])
    assert Image.open(tmp_path / "curve.png").size == (2 * 440, 280)
    assert Image.open(tmp_path / "attention.png").size == evaluate.grid_size(5, 2, 32, 32)


def test_curve_without_accuracy_is_the_loss_alone(tiny_ckpt, tiny_folder, tmp_path):
    import tecoa
    tecoa.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path, "--no-eval-baseline"))
    assert json.load(open(tmp_path / "curve.json"))["clean_accuracy"] == []
    assert Image.open(tmp_path / "curve.png").size == (440, 280)
