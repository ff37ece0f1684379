"""Tests of PMG-AFT and AGFT: exact invariants of each objective on a tiny random CLIP, and a 2-step run of each script.

Run: OMP_NUM_THREADS=1 python -m pytest -q test_methods_a.py
"""
import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import agft
import attacks
import clip
import evaluate
import pmg_aft


# ----------------------------------------------------------------------------- fixtures: a tiny CLIP and a tiny image folder


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


def setup(module, *argv):
    """A tiny CLIP's encoder f, the method's setup m (text features of 5 classes, frozen f0), args, a batch."""
    model = tiny_clip()
    encoder = clip.ImageEncoder(model.visual)
    classes = SimpleNamespace(classnames=["red", "green", "blue", "round", "square"], template="a photo of a {}.")
    args = module.get_args(["--device", "cpu", *argv])
    m = module.setup_method(model, classes, encoder, args, SimpleNamespace(device=torch.device("cpu")))
    torch.manual_seed(1)
    x, y = torch.rand(6, 3, 40, 40), torch.tensor([0, 1, 2, 3, 4, 0])
    return encoder, m, args, x, y


def cos(encoder, x, text):
    return F.normalize(encoder(x), dim=-1) @ text.t()


# ----------------------------------------------------------------------------- both: the frozen copy and the defaults


@pytest.mark.parametrize("module", [pmg_aft, agft])
def test_frozen_copy_is_separate_and_frozen(module):
    encoder, m, args, x, y = setup(module)
    assert m.text.shape == (5, 32) and torch.allclose(m.text.norm(dim=-1), torch.ones(5))
    assert not m.f0.training and all(not p.requires_grad for p in m.f0.parameters())
    assert all(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():
        before = m.f0(x)
        assert torch.equal(before, encoder(x))
        for p in encoder.parameters():
            p.add_(0.01)
        assert torch.equal(m.f0(x), before)  # f0 shares no storage with f


def test_paper_defaults():
    a = pmg_aft.get_args([])
    assert (a.train_set, a.batch_size, a.lr, a.alpha, a.beta) == ("tinyimagenet", 256, 5e-5, 1.0, 1.0)
    a = agft.get_args(["--gamma", "0.4", "--inv-tau", "180"])
    assert (a.train_set, a.batch_size, a.lr, a.gamma, a.inv_tau) == ("imagenet", 256, 4e-4, 0.4, 180.0)
    assert vars(a) == vars(agft.get_args([]))  # the paper's setting is the default
    assert (a.eps, a.step_size, a.attack_steps, a.epochs, a.warmup_steps) == (1 / 255, 1 / 255, 2, 10, 1000)


# ----------------------------------------------------------------------------- PMG-AFT


def test_pmg_aft_equals_plain_ce_when_f_is_f0_and_x_adv_is_x():
    encoder, m, args, x, y = setup(pmg_aft, "--alpha", "0.7", "--beta", "1.3")
    loss, terms = pmg_aft.loss_fn(encoder, x, x, y, m, args)
    ce = F.cross_entropy(100 * cos(encoder, x, m.text), y)
    assert terms["kl_general"].abs() < 1e-6 and terms["kl_clean"].abs() < 1e-6
    assert torch.allclose(loss, ce, atol=1e-5) and torch.allclose(terms["ce"], ce, atol=1e-6)


def test_pmg_aft_loss_terms_direction_and_gradient():
    """KL(p_target || p_adv) per sample averaged over the batch, the clean branch not detached, f0 frozen."""
    encoder, m, args, x, y = setup(pmg_aft, "--alpha", "0.7", "--beta", "1.3")
    with torch.no_grad():
        for p in encoder.parameters():  # f moves away from f0
            p.add_(0.02 * torch.randn_like(p))
    x_adv = attacks.pgd(clip.ZeroShotClassifier(encoder, m.text), x, y, 8 / 255, 2 / 255, 2)
    loss, terms = pmg_aft.loss_fn(encoder, x, x_adv, y, m, args)
    g = torch.autograd.grad(loss, list(encoder.parameters()))

    def kl(p, q):  # sum_c p (log p - log q), mean over the batch
        return (p.softmax(1) * (p.log_softmax(1) - q.log_softmax(1))).sum(1).mean()
    z_adv, z_clean = 100 * cos(encoder, x_adv, m.text), 100 * cos(encoder, x, m.text)
    z0_adv = 100 * cos(m.f0, x_adv, m.text)
    general, clean = kl(z0_adv, z_adv), kl(z_clean, z_adv)
    ref = F.cross_entropy(z_adv, y) + 0.7 * general + 1.3 * clean
    assert general > 1e-4 and clean > 1e-4
    assert torch.allclose(terms["kl_general"], general, atol=1e-5)
    assert torch.allclose(terms["kl_clean"], clean, atol=1e-5)
    assert torch.allclose(loss, ref, atol=1e-5)
    g_ref = torch.autograd.grad(ref, list(encoder.parameters()), retain_graph=True)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g, g_ref))
    detached = ref - 1.3 * clean + 1.3 * kl(z_clean.detach(), z_adv)
    g_det = torch.autograd.grad(detached, list(encoder.parameters()))
    assert not all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g, g_det))
    assert all(p.grad is None for p in m.f0.parameters())


def test_pmg_aft_targets_are_the_labels():
    encoder, m, args, x, y = setup(pmg_aft)
    assert pmg_aft.targets(x, y, m, args) is y


# ----------------------------------------------------------------------------- AGFT


def test_agft_target_is_tempered_softmax_of_the_frozen_model():
    encoder, m, args, x, y = setup(agft, "--gamma", "0.4", "--inv-tau", "180")
    with torch.no_grad():
        for p in encoder.parameters():  # the target must come from f0, not f
            p.add_(0.02 * torch.randn_like(p))
        p = agft.targets(x, y, m, args)
        ref = torch.softmax(0.4 * 180 * cos(m.f0, x, m.text), dim=1)
    assert p.shape == (6, 5) and torch.allclose(p.sum(1), torch.ones(6))
    assert torch.allclose(p, ref, atol=1e-6)
    assert not torch.allclose(p, torch.softmax(72 * cos(encoder, x, m.text), dim=1), atol=1e-3)


def test_agft_loss_is_soft_cross_entropy_at_inv_tau():
    encoder, m, args, x, y = setup(agft, "--gamma", "0.4", "--inv-tau", "180")
    with torch.no_grad():
        p = agft.targets(x, y, m, args)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    loss, terms = agft.loss_fn(encoder, x, x_adv, p, m, args)
    ref = -(p * torch.log_softmax(180 * cos(encoder, x_adv, m.text), dim=1)).sum(1).mean()
    assert torch.allclose(loss, ref, atol=1e-5) and torch.allclose(terms["ce"], ref, atol=1e-5)
    # with gamma = 1, f = f0 and x_adv = x the target is the model's own prediction: the loss is its entropy
    args.gamma = 1.0
    with torch.no_grad():
        p1 = agft.targets(x, y, m, args)
    loss1, _ = agft.loss_fn(encoder, x, x, p1, m, args)
    assert torch.allclose(loss1, -(p1 * p1.log()).sum(1).mean(), atol=1e-5)


def test_agft_attack_raises_the_soft_loss_within_the_ball():
    encoder, m, args, x, y = setup(agft, "--gamma", "0.4", "--inv-tau", "180", "--eps", "8/255", "--step-size",
                                   "2/255", "--attack-steps", "3")
    with torch.no_grad():
        p = agft.targets(x, y, m, args)
    x_adv = agft.train_attack(encoder, x, p, m, args)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert agft.loss_fn(encoder, x, x_adv, p, m, args)[0] > agft.loss_fn(encoder, x, x, p, m, args)[0]
    assert all(q.grad is None for q in encoder.parameters())
    # the attack ascends the soft-label CE at the training scale inv_tau, not at CLIP's 100
    runs = {}
    for scale in (180.0, 100.0):
        torch.manual_seed(3)
        runs[scale] = attacks.pgd(clip.ZeroShotClassifier(encoder, m.text, scale), x, p, 8 / 255, 2 / 255, 3)
    torch.manual_seed(3)
    x_adv = agft.train_attack(encoder, x, p, m, args)
    assert torch.equal(x_adv, runs[180.0]) and not torch.equal(x_adv, runs[100.0])


# ----------------------------------------------------------------------------- both scripts end to end


@pytest.mark.parametrize("module,terms", [(pmg_aft, ["ce", "kl_general", "kl_clean"]), (agft, ["ce"])])
def test_two_steps_then_evaluate(module, terms, tiny_ckpt, tiny_folder, tmp_path):
    module.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "run", "--no-eval-baseline"))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["method"] == module.__name__
    start = tiny_clip().visual.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in ckpt["visual"].items())  # it trained
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert res["results"]["imagefolder"]["n"] == 18
    log = open(tmp_path / "run" / "log.txt").read()
    assert "step 2/2" in log and all(f"{t} " in log.split("step 2/2")[1] for t in terms)


def test_agft_resume_keeps_f0_pretrained(tiny_ckpt, tiny_folder, tmp_path, monkeypatch):
    """A resumed run equals an uninterrupted one: f0 (the soft target's source) is copied before the resume."""
    four = ("--max-steps", "4", "--save-every", "2", "--no-eval-baseline")
    monkeypatch.setattr(evaluate, "final_evaluation", lambda *a, **k: None)
    agft.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "a", *four))

    class Stop(Exception):
        pass
    save = evaluate.save_checkpoint

    def save_then_die(path, obj):  # the run dies right after its step-2 checkpoint
        save(path, obj)
        raise Stop
    monkeypatch.setattr(evaluate, "save_checkpoint", save_then_die)
    with pytest.raises(Stop):
        agft.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "b", *four))
    monkeypatch.setattr(evaluate, "save_checkpoint", save)
    agft.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "b", *four, "--resume"))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["visual"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["visual"]
    assert all(torch.equal(a[k], b[k]) for k in a)
