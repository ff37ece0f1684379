"""The attack suite on tiny fixed models (CPU, a few seconds). Run: python -m pytest -q test_attacks.py"""
import json
import os

import pytest
import torch
import torch.nn as nn
from PIL import Image

import attacks
import clip
import evaluate

torch.set_num_threads(1)  # these models are tiny: thread hand-offs cost more than they save on a shared 2-core box


class MLP(nn.Module):
    """A fixed random ReLU classifier on 3x8x8 images."""

    def __init__(self, classes=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(3 * 8 * 8, 32), nn.Linear(32, classes)
        self.requires_grad_(False)

    def forward(self, x):
        return self.l2(torch.relu(self.l1((x - 0.5).flatten(1))))


def world(n=128, classes=10, wrong=16, seed=0):
    """(model, x, y): labels are the model's own predictions except the first `wrong`, which are clean-wrong."""
    model = MLP(classes, seed)
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = model(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % classes
    return model, x, y


def acc(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def run(name, model, x, y, eps, seed=0, steps=10, apgd_steps=20, queries=100):
    """evaluate.py's attack `name` (or AutoAttack's standard version), Square cut to `queries` queries."""
    torch.manual_seed(seed)
    if name == "square":
        return attacks.square(model, x, y, eps, queries)
    if name == "autoattack-standard":
        return attacks.autoattack(model, x, y, eps, "standard", apgd_steps, queries)
    return evaluate.make_attack(name, eps, eps / 4, steps, apgd_steps)(model, x, y)


ALL = evaluate.ATTACKS + ["autoattack-standard"]


# ----------------------------------------------------------------------------- every attack: the contract


@pytest.mark.parametrize("name", ALL)
def test_in_ball_and_box_and_clean_at_eps_zero(name):
    model, x, y = world(n=32, wrong=4)
    eps = 8 / 255
    x_adv = run(name, model, x, y, eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    if not name.startswith("tifgsm"):  # a 15x15 blur of an 8x8 gradient: TI barely moves this model, by design
        assert acc(model, x_adv, y) < acc(model, x, y)
    assert torch.equal(model(run(name, model, x, y, 0.0)).argmax(1), model(x).argmax(1))


def test_clean_wrong_points_never_become_right():
    model, x, y = world(n=64, wrong=8)
    right = model(x).argmax(1) == y
    for name in ALL:
        x_adv = run(name, model, x, y, 4 / 255)
        adv_right = model(x_adv).argmax(1) == y
        assert not (adv_right & ~right).any(), name
        if name.startswith(("apgd", "square", "autoattack")):  # AutoAttack's bookkeeping: returned unchanged
            assert torch.equal(x_adv[~right], x[~right]), name


def test_attacks_leave_parameters_and_mode_alone():
    torch.manual_seed(0)
    cfg = dict(embed_dim=16, image_resolution=16, vision_layers=1, vision_width=32, vision_patch_size=8,
               context_length=8, vocab_size=49408, transformer_width=16, transformer_heads=1, transformer_layers=1)
    model = clip.CLIP(**cfg).train()  # whatever mode the caller chose stays
    text = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    classifier = clip.ZeroShotClassifier(clip.ImageEncoder(model.visual), text)
    x, y = torch.rand(4, 3, 20, 20), torch.tensor([0, 1, 2, 3])  # resized inside the encoder, as CIFAR is
    for name in ["cw", "tifgsm_t_rand", "pifgsm++", "apgd_t", "square", "autoattack-standard"]:
        x_adv = run(name, classifier, x, y, 4 / 255, steps=2, apgd_steps=3)
        assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6, name
    assert all(p.grad is None for p in model.parameters()) and model.training


# ----------------------------------------------------------------------------- strength


def test_iterative_attacks_at_least_as_strong_as_fgsm_and_apgd_as_pgd():
    model, x, y = world(n=256)
    eps = 4 / 255
    a = {name: acc(model, run(name, model, x, y, eps, steps=20, apgd_steps=20), y)
         for name in ["fgsm", "pgd", "cw", "mifgsm", "nifgsm", "pifgsm", "apgd_ce", "apgd_dlr", "autoattack"]}
    for name in ["pgd", "cw", "apgd_ce", "apgd_dlr", "autoattack"]:
        assert a[name] <= a["fgsm"] + 0.01, (name, a)
    for name in ["mifgsm", "nifgsm", "pifgsm"]:  # momentum and patch-wise steps aim at transfer: within noise
        assert a[name] <= a["fgsm"] + 0.03, (name, a)
    assert a["apgd_ce"] <= a["pgd"] + 0.02, a  # same budget (20 steps), within noise
    assert a["autoattack"] <= min(a["apgd_ce"], a["apgd_dlr"]) + 0.02, a
    assert a["pgd"] < acc(model, x, y) - 0.2  # and the attacks do bite


def test_apgd_restarts_and_more_steps_do_not_hurt():
    model, x, y = world(n=128)
    eps = 3 / 255
    torch.manual_seed(0)
    short = acc(model, attacks.apgd_ce(model, x, y, eps, steps=5), y)
    torch.manual_seed(0)
    longer = acc(model, attacks.apgd_ce(model, x, y, eps, steps=50, restarts=2), y)
    assert longer <= short


def test_loss_functions_on_hand_made_logits():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 1.0, 2.0]])
    y, t = torch.tensor([0, 0]), torch.tensor([1, 3])
    assert attacks.margin(z, y).tolist() == [1.0, -5.0]
    assert attacks.dlr_loss(z, y).tolist() == pytest.approx([-1 / 2, 5 / 4])
    assert attacks.dlr_targeted_loss(z, y, t).tolist() == pytest.approx([-1 / 2.5, 2 / 4.5])
    assert attacks.cw_loss(z, y).item() == pytest.approx(-1.0)  # the fooled row is clamped at kappa = 0
    assert attacks.cw_loss(z, y, kappa=10).item() == pytest.approx(-1.0 + 5.0)


# ----------------------------------------------------------------------------- targeted attacks and target choice


def test_target_pickers():
    model, x, y = world()
    torch.manual_seed(0)
    t = attacks.random_target(model, x, y)
    assert (t != y).all() and t.min() >= 0 and t.max() < 10 and len(t.unique()) > 5
    ll = attacks.least_likely_target(model, x, y)
    z = model(x)
    assert (ll != y).all() and torch.equal(z.gather(1, ll[:, None])[:, 0], z.scatter(1, y[:, None], 1e9).min(1).values)


@pytest.mark.parametrize("name", evaluate.TARGETABLE)
def test_targeted_attacks_hit_their_target(name):
    torch.manual_seed(0)  # a linear model on 4x4-pooled colour: smooth enough for DI's shifts and TI's blur
    w = torch.randn(12, 10)
    model = lambda x: 10 * torch.nn.functional.avg_pool2d(x - 0.5, 4).flatten(1) @ w  # noqa: E731
    x = torch.rand(64, 3, 8, 8)
    y = model(x).argmax(1)
    for pick in (attacks.random_target, attacks.least_likely_target):
        target = pick(model, x, y)
        x_adv = getattr(attacks, name)(model, x, target, 64 / 255, 8 / 255, 20, targeted=True)
        hit = (model(x_adv).argmax(1) == target).float().mean().item()
        assert hit >= (0.75 if name in ("difgsm", "tifgsm") else 0.9), (pick.__name__, hit)


# ----------------------------------------------------------------------------- AutoAttack: bookkeeping and fallbacks


def test_sequential_robust_set_is_the_intersection_of_its_parts():
    model, x, y = world()
    right = model(x).argmax(1) == y
    parts = [lambda m, xx, yy: attacks.fgsm(m, xx, yy, 3 / 255),
             lambda m, xx, yy: attacks.pgd(m, xx, yy, 2 / 255, 0.5 / 255, 5, rand_init=False)]
    alone = [model(p(model, x, y)).argmax(1) == y for p in parts]  # deterministic: same per point in any batch
    together = model(attacks.sequential(model, x, y, parts)).argmax(1) == y
    assert torch.equal(together, right & alone[0] & alone[1])
    assert together.sum() < alone[1].sum()


def test_autoattack_is_at_least_as_strong_as_its_first_part():
    model, x, y = world()
    torch.manual_seed(0)  # AutoAttack's APGD-CE run draws the same start as APGD-CE alone
    ce = model(attacks.apgd_ce(model, x, y, 3 / 255, 20)).argmax(1) == y
    torch.manual_seed(0)
    aa = model(attacks.autoattack(model, x, y, 3 / 255, steps=20)).argmax(1) == y
    assert not (aa & ~ce).any() and aa.sum() < ce.sum()


def test_fewer_than_three_classes_fall_back_to_apgd_ce(capsys):
    model, x, y = world(n=32, classes=2, wrong=4)
    attacks._said.clear()
    for name in ["apgd_dlr", "apgd_t", "autoattack", "autoattack-standard", "apgd_dlr"]:
        x_adv = run(name, model, x, y, 8 / 255)
        assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    err = capsys.readouterr().err
    assert err.count("APGD-DLR needs at least 3 classes") == 1 and "AutoAttack with 2 classes" in err


# ----------------------------------------------------------------------------- transfer family specifics


def test_transfer_pieces():
    k = attacks.gaussian_kernel(15, 3)
    assert k.shape == (15, 15) and k.sum().item() == pytest.approx(1.0) and k.argmax().item() == 7 * 15 + 7
    pp = attacks.pifgsmpp_kernel()  # torchattacks' channel/width-swapped 3x3 Gaussian: flat along the width
    assert torch.equal(pp[..., 0], pp[..., 2]) and pp[1, 1, 0] > 0.9 and pp[0, 0, 0] < 1e-3
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    outs = [attacks.input_diversity(x) for _ in range(40)]
    changed = [o for o in outs if not torch.equal(o, x)]
    assert all(o.shape == x.shape for o in outs) and 8 <= len(changed) <= 32
    assert all((o[..., :1, :].abs().sum() == 0) | (o[..., -1:, :].abs().sum() == 0) for o in changed)  # padded rows
    g = torch.zeros(2, 3, 4, 4)
    assert torch.equal(attacks.l1_mean_normalise(g), g)  # a flat gradient stays zero, not NaN


# ----------------------------------------------------------------------------- evaluate.py: names and --attack all


def test_attack_names():
    assert len(evaluate.AGFT_ATTACKS) == 15 and set(evaluate.AGFT_ATTACKS) <= set(evaluate.ATTACKS)
    assert evaluate.attack_names("all") == evaluate.AGFT_ATTACKS
    assert evaluate.attack_names("pgd, cw") == ["pgd", "cw"]
    with pytest.raises(evaluate.UsageError, match="unknown attack 'pdg'"):
        evaluate.attack_names("pdg")
    assert evaluate.attack_config("autoattack", 1 / 255, 1 / 255, 20, 100, "standard")["steps"] == 100


def test_evaluate_cli_several_attacks(tmp_path):
    torch.manual_seed(0)
    cfg = dict(embed_dim=16, image_resolution=16, vision_layers=1, vision_width=32, vision_patch_size=8,
               context_length=16, vocab_size=49408, transformer_width=16, transformer_heads=1, transformer_layers=1)
    torch.save(clip.CLIP(**cfg).state_dict(), tmp_path / "tiny.pt")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["red_thing", "green_thing", "blue_thing"]):
        os.makedirs(tmp_path / "folder" / name)
        for i in range(3):
            img = torch.rand(16, 16, 3, generator=g) * 0.3
            img[..., c] += 0.7
            Image.fromarray((img * 255).byte().numpy()).save(tmp_path / "folder" / name / f"{i}.png")
    evaluate.main(["--model", str(tmp_path / "tiny.pt"), "--datasets", "imagefolder", "--data-root",
                   str(tmp_path / "folder"), "--attack", "pgd,fgsm,autoattack", "--eps", "4/255", "--steps", "2",
                   "--apgd-steps", "3", "--device", "cpu", "--workers", "0", "--out-dir", str(tmp_path / "eval")])
    res = json.load(open(tmp_path / "eval" / "results.json"))
    assert list(res["attacks"]) == ["pgd", "fgsm", "autoattack"] and res["n"]["imagefolder"] == 9
    assert set(res["robust"]["imagefolder"]) == {"pgd", "fgsm", "autoattack"}
    assert all(res["robust"]["imagefolder"][a] <= res["clean"]["imagefolder"] for a in res["attacks"])
    assert res["attacks"]["autoattack"]["steps"] == 3 and "clean" in res["average"]
