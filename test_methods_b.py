"""Tests of TGA-ZSR, Comp-TGA and SAFT: exact invariants of each objective on a tiny random ViT CLIP, and a 2-step
run of each script. CPU, offline. Run: OMP_NUM_THREADS=1 python -m pytest -q test_methods_b.py"""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import attacks
import clip
import comp_tga
import data
import evaluate
import saft
import tecoa
import tga_zsr

TGA_METHODS = [tga_zsr, comp_tga, saft]
CLASSES = ["red thing", "green thing", "blue thing"]


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


def setup(module, *flags, classes=CLASSES, model=None, train_set="imagefolder"):
    """A tiny ViT CLIP, its pixel-space encoder, the script's parsed args and its method state m."""
    model = model or tiny_clip()
    enc = clip.ImageEncoder(model.visual)
    args = module.get_args(["--model", "tiny", "--train-set", train_set, "--device", "cpu", *flags])
    ds = SimpleNamespace(classnames=classes, template="a photo of a {}.")
    m = module.setup_method(model, ds, enc, args, evaluate.Run(torch.device("cpu"), torch.float32))
    return model, enc, args, m


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % len(CLASSES)


def nudge(enc, seed=2, scale=0.05):
    """Move the trained encoder away from f0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- the attention maps


def test_attention_map_is_the_specified_computation():
    enc = clip.ImageEncoder(tiny_clip().visual)
    x, text = torch.rand(3, 3, 32, 32), F.normalize(torch.randn(3, 32), dim=-1)
    tokens = enc(x, all_tokens=True)
    assert tokens.shape == (3, 1 + 16, 32)
    assert torch.allclose(tokens[:, 0], enc(x), atol=1e-5)  # token 0 is the CLS feature of the logits
    # at the patch grid's own size: channels normalised over the token axis (CLS included), dot product, min-max
    s = torch.einsum("bpd,bd->bp", (tokens / tokens.norm(dim=1, keepdim=True))[:, 1:], text)
    s = (s - s.min(1, keepdim=True).values) / (s.max(1, keepdim=True).values - s.min(1, keepdim=True).values)
    assert torch.allclose(clip.text_guided_attention(tokens, text, (4, 4)), s.view(3, 4, 4), atol=1e-6)
    a = clip.text_guided_attention(tokens, text, (32, 32))
    assert a.shape == (3, 32, 32) and a.min() >= 0 and a.max() <= 1
    # bilinear upsampling of the 4x4 map (align_corners=False): the corner pixel is the corner patch
    assert torch.allclose(a[:, 0, 0], s[:, 0], atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the map is computed in fp32 under autocast too
        assert torch.equal(clip.text_guided_attention(tokens, text, (32, 32)), a)


def test_complementary_map_is_class_times_one_minus_nonclass():
    enc = clip.ImageEncoder(tiny_clip().visual)
    tokens = enc(torch.rand(2, 3, 32, 32), all_tokens=True)
    cls, non = F.normalize(torch.randn(2, 32), dim=-1), F.normalize(torch.randn(2, 32), dim=-1)
    a = clip.complementary_attention(tokens, cls, non, (32, 32))
    expected = clip.text_guided_attention(tokens, cls, (32, 32)) * (1 - clip.text_guided_attention(tokens, non, (32, 32)))
    assert torch.equal(a, expected) and a.min() >= 0 and a.max() <= 1 and a.shape == (2, 32, 32)


@pytest.mark.parametrize("module", TGA_METHODS, ids=lambda m: m.__name__)
def test_maps_have_input_size_lie_in_01_and_use_only_the_true_class(module):
    _, enc, args, m = setup(module)
    x, y = batch(2)  # classes 0 and 1 only
    tokens = enc(x, all_tokens=True)
    a = module.attention(tokens, y, x, m)
    assert a.shape == (2, 32, 32) and a.min() >= 0 and a.max() <= 1
    for name in ("text", "cls", "non"):  # change every text of class 2: the maps must not move
        if hasattr(m, name):
            getattr(m, name)[2] = F.normalize(torch.randn(32), dim=0)
    assert torch.equal(module.attention(tokens, y, x, m), a)
    with torch.no_grad():
        _, a0 = module.targets(x, y, m, args)
    assert torch.equal(a0, a)  # f0 = f: the target map is the same map


# ----------------------------------------------------------------------------- the objectives


@pytest.mark.parametrize("module", TGA_METHODS, ids=lambda m: m.__name__)
def test_loss_is_plain_ce_when_f_is_f0_and_x_adv_is_x(module):
    _, enc, args, m = setup(module)
    x, y = batch()
    with torch.no_grad():
        t = module.targets(x, y, m, args)
    loss, terms = module.loss_fn(enc, x, x, t, m, args)
    assert terms["refine"] == 0 and terms["constrain"] == 0 and torch.equal(loss.detach(), terms["ce"])
    heads = m.heads if module is saft else m.text[None]
    ce = sum(tecoa.loss_fn(enc, x, x, y, SimpleNamespace(text=w), args)[0] for w in heads) / len(heads)
    assert torch.allclose(loss, ce, atol=1e-5)


@pytest.mark.parametrize("module", TGA_METHODS, ids=lambda m: m.__name__)
def test_attention_terms_follow_the_trained_encoder_only(module):
    _, enc, args, m = setup(module)
    x, y = batch()
    with torch.no_grad():
        t = module.targets(x, y, m, args)
    nudge(enc)
    x_adv = attacks.pgd(lambda z: z.mean((2, 3)), x, y, 4 / 255, 4 / 255, 1)  # any point in the ball
    loss, terms = module.loss_fn(enc, x, x_adv, t, m, args)
    a0, size = t[1], x.shape[-2:]
    refine = (module.attention(enc(x_adv, all_tokens=True), y, x, m) - a0).flatten(1).norm(dim=1).mean()
    constrain = (module.attention(enc(x, all_tokens=True), y, x, m) - a0).flatten(1).norm(dim=1).mean()
    assert terms["refine"] > 0 and terms["constrain"] > 0 and a0.shape[-2:] == size
    assert torch.allclose(terms["refine"], refine) and torch.allclose(terms["constrain"], constrain)
    assert torch.allclose(loss, terms["ce"] + args.alpha * refine + args.beta * constrain)
    loss.backward()
    assert all(p.grad is None for p in m.f0.parameters()) and all(p.grad is not None for p in enc.parameters())


def test_defaults_are_the_papers():
    for module, alpha, beta in [(tga_zsr, 0.08, 0.05), (comp_tga, 0.10, 0.10), (saft, 0.08, 0.05)]:
        args = module.get_args([])
        assert (args.alpha, args.beta, args.train_set, args.batch_size, args.lr) == (alpha, beta, "tinyimagenet", 128, 1e-4)
        assert (args.eps, args.step_size, args.attack_steps) == (1 / 255, 1 / 255, 2)
    assert saft.get_args([]).k == 5 and saft.get_args([]).descriptions is None


@pytest.mark.parametrize("module", [tga_zsr, comp_tga], ids=lambda m: m.__name__)
def test_training_attack_is_pgd_on_the_ce_term(module):
    _, enc, args, m = setup(module)
    x, y = batch()
    with torch.no_grad():
        t = module.targets(x, y, m, args)
    torch.manual_seed(5)
    x_adv = module.train_attack(enc, x, t, m, args)
    torch.manual_seed(5)
    ref = attacks.pgd(clip.ZeroShotClassifier(enc, m.text), x, y, args.eps, args.step_size, args.attack_steps)
    assert torch.equal(x_adv, ref) and (x_adv - x).abs().max() <= args.eps + 1e-6


def test_comp_tga_prompts_are_class_and_nonclass():
    model, _, _, m = setup(comp_tga)
    assert torch.equal(m.cls, clip.encode_text(model, [f"This is a photo of a {c}" for c in CLASSES]))
    assert torch.equal(m.non, clip.encode_text(model, [f"This is not a photo of a {c}" for c in CLASSES]))


# ----------------------------------------------------------------------------- SAFT's descriptions and heads


def write_json(path, obj):
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_saft_heads_hold_the_kth_ranked_description_of_every_class(tmp_path):
    desc = {c: [f"a drawing of a {c}.", f"{c}", f"an old {c} in the rain.", "a cat.", f"a {c} on a table.",
                f"two {c}s.", "nothing at all."] for c in CLASSES}
    model, _, args, m = setup(saft, "--descriptions", write_json(tmp_path / "d.json", desc), "--k", "3")
    names = clip.encode_text(model, CLASSES)
    for c, name in enumerate(CLASSES):
        feats = clip.encode_text(model, desc[name])
        score = feats @ names[c]
        ranked = [desc[name][i] for i in score.sort(descending=True, stable=True).indices[:3]]
        assert m.chosen[c] == ranked and ranked[0] == name  # the bare name itself has cosine 1: rank 1
    for k in range(3):
        assert torch.equal(m.heads[k], clip.encode_text(model, [m.chosen[c][k] for c in range(3)]))
    assert m.heads.shape == (3, 3, 32) and torch.allclose(m.text, m.heads.mean(0))


def test_saft_fallback_classes_are_matched_normalised_and_counted(tmp_path, capsys):
    desc = {"Red_Thing": ["a", "b", "c"], "green-thing": ["a", "b"], "yellow thing": ["a", "b", "c"]}
    _, _, args, m = setup(saft, "--descriptions", write_json(tmp_path / "d.json", desc), "--k", "3")
    out = capsys.readouterr().out
    assert "2 of 3 classes" in out and "green thing, blue thing" in out
    assert sorted(m.chosen[0]) == ["a", "b", "c"]  # "Red_Thing" matched "red thing"
    assert m.chosen[1] == ["a photo of a green thing."] * 3 and m.chosen[2] == ["a photo of a blue thing."] * 3


def test_saft_without_descriptions_says_so_and_uses_templates(capsys):
    _, _, _, m = setup(saft, "--k", "2")
    out = capsys.readouterr().out
    assert out.count("no --descriptions") == 1
    assert m.chosen[1] == [t.format("green thing") for t in saft.TEMPLATES[:2]]


def test_saft_with_one_template_head_is_tga_zsr():
    _, enc, args, m = setup(saft, "--k", "1")  # TEMPLATES[0] is the test set's template
    _, _, targs, tm = setup(tga_zsr)
    assert torch.equal(m.heads[0], tm.text)
    x, y = batch()
    with torch.no_grad():
        t, tt = saft.targets(x, y, m, args), tga_zsr.targets(x, y, tm, targs)
    nudge(enc)
    x_adv = (x + 2 / 255).clamp(0, 1)
    assert torch.allclose(saft.loss_fn(enc, x, x_adv, t, m, args)[0], tga_zsr.loss_fn(enc, x, x_adv, tt, tm, targs)[0])


def test_saft_toy_world_uses_its_own_descriptions(tmp_path):
    toy = data.TOY_TASKS[data.TOY_TRAIN][1]
    _, _, args, m = setup(saft, "--out-dir", str(tmp_path), classes=toy, train_set=data.TOY_TRAIN)
    assert args.descriptions == str(tmp_path / "descriptions.json")
    assert json.load(open(args.descriptions)) == data.toy_descriptions()
    assert all(set(c) <= set(data.toy_descriptions()[n]) for c, n in zip(m.chosen, toy))


def test_bad_descriptions_and_resnets_get_one_line_errors(tmp_path):
    for bad, words in [("{not json", "not valid JSON"), ('["a", "b"]', "expected a JSON object"),
                       ('{"red thing": "a"}', "expected a JSON object")]:
        with pytest.raises(evaluate.UsageError, match=words) as e:
            setup(saft, "--descriptions", write_json(tmp_path / "bad.json", bad))
        assert "\n" not in str(e.value)
    with pytest.raises(evaluate.UsageError, match="cannot read"):
        setup(saft, "--descriptions", str(tmp_path / "missing.json"))
    resnet = tiny_clip(vision_layers=(1, 1, 1, 1), vision_width=8)
    for module in TGA_METHODS:
        with pytest.raises(evaluate.UsageError, match="needs a ViT image encoder"):
            setup(module, model=resnet)


# ----------------------------------------------------------------------------- the scripts, 2 steps end to end


@pytest.mark.parametrize("module", TGA_METHODS, ids=lambda m: m.__name__)
def test_two_steps_then_evaluate(module, tiny_ckpt, tiny_folder, tmp_path):
    extra = ["--descriptions", write_json(tmp_path / "d.json", {c: [f"a {c}.", f"one {c}", "x", "y", "z"]
                                                                for c in CLASSES})] if module is saft else []
    module.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "run", "--no-eval-baseline", *extra))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["method"] == module.__name__
    assert json.load(open(tmp_path / "run" / "results.json"))["results"]["imagefolder"]["n"] == 18
    log = open(tmp_path / "run" / "log.txt").read()
    assert "refine" in log and "constrain" in log
