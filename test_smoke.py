"""Smoke tests: CPU, offline, tiny random CLIPs and files written here. Run: python -m pytest -q test_smoke.py"""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import attacks
import clip
import data
import evaluate

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def fixed_classifier(seed=0):
    """A fixed linear classifier on 3x8x8 images, confident and correct on its own labels."""
    torch.manual_seed(seed)
    w = torch.randn(3 * 8 * 8, 4)
    model = lambda x: 4 * x.flatten(1) @ w  # noqa: E731
    x = torch.rand(64, 3, 8, 8)
    return model, x, model(x).argmax(1)


# ----------------------------------------------------------------------------- attacks


def test_pgd_stays_in_ball_and_lowers_accuracy():
    model, x, y = fixed_classifier()
    eps = 8 / 255
    x_adv = attacks.pgd(model, x, y, eps, 2 / 255, 10)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (model(x_adv).argmax(1) == y).float().mean() < 0.5


def test_pgd_eps_zero_is_clean():
    model, x, y = fixed_classifier()
    assert torch.equal(attacks.pgd(model, x, y, 0.0, 1 / 255, 5), x)


def test_pgd_targeted_and_soft_labels():
    model, x, y = fixed_classifier()
    target = (y + 1) % 4
    x_adv = attacks.pgd(model, x, target, 32 / 255, 4 / 255, 20, targeted=True)
    assert (model(x_adv).argmax(1) == target).float().mean() > 0.8
    torch.manual_seed(1)
    hard = attacks.pgd(model, x, y, 8 / 255, 2 / 255, 10)
    torch.manual_seed(1)  # one-hot soft labels give exactly the hard-label attack
    soft = attacks.pgd(model, x, torch.nn.functional.one_hot(y, 4).float(), 8 / 255, 2 / 255, 10)
    assert torch.equal(hard, soft)


def test_pgd_leaves_parameter_gradients_alone():
    model = tiny_clip()
    enc = clip.ImageEncoder(model.visual)
    text = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    attacks.pgd(clip.ZeroShotClassifier(enc, text), torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), 1 / 255, 1 / 255, 2)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- flags


def test_parse_eps():
    assert evaluate.parse_eps("1/255") == pytest.approx(1 / 255)
    assert evaluate.parse_eps("0.5") == 0.5
    for bad, words in [("4", "did you mean 4/255"), ("-1/255", "negative"), ("abc", "not a number")]:
        with pytest.raises(Exception, match=words):
            evaluate.parse_eps(bad)


def test_lr_schedule():
    lrs = [evaluate.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_epoch_sampler_same_global_batch_for_any_world_size():
    one = list(data.EpochSampler(20, 4, 0, 1, seed=3))
    two = [list(data.EpochSampler(20, 4, r, 2, seed=3)) for r in range(2)]
    merged = [i for s in range(5) for r in range(2) for i in two[r][2 * s:2 * s + 2]]
    assert one == merged
    s = data.EpochSampler(20, 4, seed=3)
    s.set_position(7)  # epoch 1, batch 2
    s1 = data.EpochSampler(20, 4, seed=3)
    s1.set_position(5)
    assert list(s) == list(s1)[8:]


# ----------------------------------------------------------------------------- tecoa end to end on a tiny random CLIP


def tecoa_args(tiny_ckpt, tiny_folder, out, *extra):
    return ["--model", tiny_ckpt, "--train-set", "imagefolder", "--data-root", tiny_folder, "--eval-sets", "imagefolder",
            "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "1", "--lr", "1e-3", "--workers", "0",
            "--device", "cpu", "--out-dir", str(out), *extra]


def test_tecoa_two_steps_then_evaluate(tiny_ckpt, tiny_folder, tmp_path):
    import tecoa
    tecoa.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["method"] == "tecoa"
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert set(res) >= {"model", "attack", "results", "average"} and res["results"]["imagefolder"]["n"] == 18
    out = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "run" / "ckpt.pt"),
                          "--datasets", "imagefolder", "--data-root", tiny_folder, "--device", "cpu", "--workers", "0",
                          "--steps", "2", "--out-dir", str(tmp_path / "eval")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.load(open(tmp_path / "eval" / "results.json"))["results"]["imagefolder"]["n"] == 18


def test_resume_matches_uninterrupted_run(tiny_ckpt, tiny_folder, tmp_path, monkeypatch):
    import tecoa
    four = ("--max-steps", "4", "--save-every", "2", "--no-eval-baseline")
    tecoa.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "a", *four))

    class Stop(Exception):
        pass
    save = evaluate.save_checkpoint

    def save_then_die(path, obj):  # the run dies right after its step-2 checkpoint
        save(path, obj)
        raise Stop
    monkeypatch.setattr(evaluate, "save_checkpoint", save_then_die)
    with pytest.raises(Stop):
        tecoa.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "b", *four))
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 2
    tecoa.main(tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "b", *four, "--resume"))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["visual"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["visual"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    evaluate.save_checkpoint(path, {"step": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        evaluate.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- the toy world


def test_toy_world_is_deterministic():
    a, b = data.toy_dataset(data.TOY_TRAIN, 64, seed=5), data.toy_dataset(data.TOY_TRAIN, 64, seed=5)
    xa, ya = zip(*[a[i] for i in range(64)])
    xb, yb = zip(*[b[i] for i in range(64)])
    assert all(torch.equal(p, q) for p, q in zip(xa, xb)) and ya == yb
    assert xa[0].dtype == torch.uint8 and xa[0].shape == (3, 32, 32)
    c = data.toy_dataset(data.TOY_TRAIN, 64, seed=6)
    assert not torch.equal(xa[0], c[0][0])
    for task in data.TOY_HELDOUT:
        ds = data.toy_dataset(task, 32, seed=1)
        assert "{}" in ds.template and max(int(ds[i][1]) for i in range(32)) < len(ds.classnames)
        assert not set(ds.classnames) & set(data.toy_dataset(data.TOY_TRAIN, 1, seed=0).classnames)


# ----------------------------------------------------------------------------- DDP on CPU (gloo)


def test_ddp_two_processes_end_identical(tiny_ckpt, tiny_folder, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(f"""import os, sys, torch
sys.path.insert(0, {ROOT!r})
import evaluate, tecoa
final = evaluate.final_evaluation
def save_weights_then_evaluate(encoder, args, run):  # every rank writes its own weights
    torch.save(encoder.visual.state_dict(), os.path.join(args.out_dir, f"weights_rank{{run.rank}}.pt"))
    return final(encoder, args, run)
evaluate.final_evaluation = save_weights_then_evaluate
tecoa.main(sys.argv[1:])
""")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *tecoa_args(tiny_ckpt, tiny_folder, out, "--no-eval-baseline")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    weights = [torch.load(out / f"weights_rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------- bad input: one line, no traceback


def one_line_error(capsys, main, argv):
    """Run a script's main the way the command line does; return its stderr, checking it is one 'error:' line."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and "Traceback" not in err
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_give_one_line(capsys, tiny_ckpt, tiny_folder, tmp_path):
    import tecoa
    base = tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "run")
    cases = [
        (["--model", "ViT-X/99"], "ViT-B/32"),  # unknown model: lists the known ones
        (["--eps", "4"], "did you mean 4/255"),
        (["--eps=-1/255"], "negative"),
        (["--eps", "2"], "above 1"),
        (["--eps", "1/255", "--step-size", "4/255"], "larger than eps"),
        (["--data-root", str(tmp_path / "nowhere")], "nowhere"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cpu", "--model", "nope.pt"], "cuda"),
        (["--resume"], "no checkpoint"),
        (["--batch-size", "64"], "fewer than one batch"),
    ]
    for extra, words in cases:
        assert words.lower() in one_line_error(capsys, tecoa.main, base + extra).lower(), (extra, words)
    empty = tmp_path / "empty"
    (empty / "some_class").mkdir(parents=True)
    assert "found no valid file" in one_line_error(capsys, tecoa.main, base + ["--data-root", str(empty)]).lower()


def test_bad_checkpoints_give_one_line(capsys, tiny_ckpt, tiny_folder, tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"foo": torch.zeros(1)}, junk)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pt"  # an image encoder of another width than the tiny CLIP's
    torch.save({"visual": tiny_clip(vision_width=128).visual.state_dict(), "model": "other"}, other)
    ev = ["--model", tiny_ckpt, "--datasets", "imagefolder", "--data-root", tiny_folder, "--device", "cpu",
          "--out-dir", str(tmp_path / "eval")]
    assert "foo" in one_line_error(capsys, evaluate.main, ev + ["--checkpoint", str(junk)])
    assert "notes.txt" in one_line_error(capsys, evaluate.main, ev + ["--checkpoint", str(text)])
    assert "pass --model" in one_line_error(capsys, evaluate.main, ev + ["--checkpoint", str(other)])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(capsys, tiny_ckpt, tiny_folder, tmp_path, monkeypatch):
    import tecoa
    loss_fn = tecoa.loss_fn

    def nan_at_step_3(f, x, x_adv, y, m, args, calls=[]):
        calls.append(1)
        loss, terms = loss_fn(f, x, x_adv, y, m, args)
        return (loss * float("nan"), terms) if len(calls) == 3 else (loss, terms)
    monkeypatch.setattr(tecoa, "loss_fn", nan_at_step_3)
    err = one_line_error(capsys, tecoa.main, tecoa_args(tiny_ckpt, tiny_folder, tmp_path / "run", "--max-steps", "4",
                                                         "--save-every", "1"))
    assert "nan at step 2" in err.lower() and "ce" in err
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------- evaluation sanity checks


def test_sanity_checks_flag_a_broken_attack(tiny_ckpt, tiny_folder, tmp_path):
    model = clip.load(tiny_ckpt)
    run = evaluate.Run(torch.device("cpu"), torch.float32)
    sets = evaluate.eval_datasets(["imagefolder"], tiny_folder, 32)
    enc = clip.ImageEncoder(model.visual)
    broken = lambda m, x, y: x.clone()  # noqa: E731  "attacks" by returning the clean images
    res = evaluate.evaluate(enc, model, sets, broken, run, attack0=broken)
    assert any("returned the clean images" in msg for msg in evaluate.sanity_checks(res, 8 / 255))
    shifted = lambda m, x, y: (x + 0.5).clamp(0, 1)  # noqa: E731  moves the images even at eps 0
    res = evaluate.evaluate(enc, model, sets, evaluate.make_attack("pgd", 8 / 255, 2 / 255, 5), run, attack0=shifted)
    assert any("at eps 0 changed" in msg for msg in evaluate.sanity_checks(res, 8 / 255)) or res["imagefolder"]["eps0_changed"] == 0
    good = evaluate.evaluate(enc, model, sets, evaluate.make_attack("pgd", 8 / 255, 2 / 255, 5), run,
                             attack0=evaluate.make_attack("pgd", 0.0, 2 / 255, 5))
    assert evaluate.sanity_checks(good, 8 / 255) == []
