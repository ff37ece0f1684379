"""Zero-shot clean and robust accuracy of CLIP: the evaluation command, and all the evaluation the training scripts
share: protocols, attacks table, result tables, checkpoint formats, pictures, the evaluation at the end of training.

    python evaluate.py --toy --checkpoint runs/tecoa-toy/ckpt.pt     # toy world, offline
    python evaluate.py --model ViT-B/32 --checkpoint runs/tecoa/ckpt.pt --data-root /data --datasets cifar10,stl10
    torchrun --standalone --nproc_per_node 8 evaluate.py ...         # data-parallel evaluation
    python evaluate.py --model ViT-L/14 --checkpoint fare_eps_2.pt   # others' released encoders (CHECKPOINT_FORMATS)
    python evaluate.py --toy --save-examples 8                       # + examples_<set>.png: clean, adversarial, delta

Clean accuracy is top-1 accuracy on the originals; robust accuracy the share of images classified right both clean and
attacked (AutoAttack's count). The AGFT code scores the adversarial images alone, which differs only where an attack
makes a clean-wrong image right, as targeted attacks can; results.json counts those images as "raised".

Attacks (`--attack`, see attack_table): pgd, cw, fgsm, apgd_ce, apgd_dlr, apgd_t, fab_t, square, autoattack
(`--aa seed`: APGD-CE + APGD-DLR as the seed papers run it, default; `--aa standard`: APGD-CE, APGD-T, FAB-T, Square), mifgsm,
difgsm, tifgsm, nifgsm, pifgsm, pifgsm++, and targeted pgd/mifgsm/difgsm/tifgsm/nifgsm with suffix _t_rand (random
target) or _t_least (least-likely target), always scored against the true label. `--steps` and `--step-size` drive the
iterative attacks, `--apgd-steps` (default 100) APGD, FAB-T and AutoAttack. `--attack all` runs AGFT's 15-attack table (its
Table 6, AGFT_ATTACKS); a comma-separated list runs those; `--attack none` measures clean accuracy alone. With more than one attack, results.json holds
{"model", "attacks": {attack: config}, "clean": {dataset: acc}, "robust": {dataset: {attack: acc}},
"average": {"clean": acc, "robust": {attack: acc}}, "n": {dataset: images}, "raised": {dataset: {attack: images}},
"checks"}.
"""
import argparse
import contextlib
import hashlib
import json
import os
import time

import numpy as np
import torch

import attacks
import attention
import clip
import data
import harness
import pictures
import prompts
import published
import toy
from harness import UsageError, fmt_eps

# ----------------------------------------------------------------------------- zero-shot evaluation


def text_head(model, dataset, name="", template=None):
    """Normalised text features, one per class, encoded once: of the dataset's prompts (or `template`'s), or for a
    tuple of templates (an ensemble) the mean of their normalised features, renormalised. Classes the model cannot
    tell apart are refused, or warned of in a paper's own class names (clip.check_distinct)."""
    if template is None and isinstance(dataset.template, str):
        heads = [data.prompts(dataset)]
    else:
        heads = [[t.format(c) for c in dataset.classnames] for t in ([template] if template else dataset.template)]
    clip.check_distinct(heads, dataset.classnames, model.context_length, name or "the text head",
                        paper=bool(getattr(dataset, "convention", None)))
    features = [clip.encode_text(model, head) for head in heads]
    return features[0] if isinstance(template or dataset.template, str) else torch.nn.functional.normalize(torch.stack(features).mean(0), dim=-1)


EPS0_IMAGES = 8  # images of the eps-0 sanity check: the attack must leave them exactly as they are


def accuracy(classifier, dataset, attack, run, batch_size, workers=0, name="", attack0=None):
    """Clean and robust top-1 accuracy (%) of `classifier` on `dataset` (robust: right on the clean image and on the
    attacked one; attack None: clean accuracy and n alone), how many images the attack moved, how many clean-wrong images it made right (targeted attacks
    can; they do not count), and (with attack0, the same attack at eps 0, run by rank 0 on the first EPS0_IMAGES
    images) on how many images eps 0 changed the prediction (should be none). batch_size: the global batch, split
    across processes."""
    shard = torch.utils.data.Subset(dataset, range(run.rank, len(dataset), run.world))
    loader = data.make_loader(shard, batch_size // run.world, workers=workers, pin=run.device.type == "cuda")
    progress = harness.Progress(run, f"  {name}", len(dataset))
    clean = robust = raised = moved = n = eps0_changed = eps0_checked = 0
    for x, y in loader:
        x, y = data.to_device(x, run.device, dataset.resize_to), y.to(run.device)
        with torch.no_grad(), run.autocast():
            pred = classifier(x).argmax(-1)
        clean += (pred == y).sum().item()
        n += len(y)
        progress.update(len(y) * run.world)
        if attack is None:  # --attack none: clean accuracy alone
            continue
        if attack0 is not None and n == len(y) and run.is_main:  # the first batch's first EPS0_IMAGES, one process
            k = eps0_checked = min(EPS0_IMAGES, len(y))
            x0 = attack0(classifier, x[:k], y[:k])
            with torch.no_grad(), run.autocast():
                eps0_changed = (classifier(x0).argmax(-1) != classifier(x[:k]).argmax(-1)).sum().item()
        x_adv = attack(classifier, x, y)  # in fp32 under --dtype bf16 too: a bf16 attack is weaker (performance.md)
        with torch.no_grad(), run.autocast():
            pred_adv = classifier(x_adv).argmax(-1)
        robust += ((pred == y) & (pred_adv == y)).sum().item()  # x is in its own eps-ball: clean-wrong is never robust
        raised += ((pred != y) & (pred_adv == y)).sum().item()
        moved += (x_adv != x).flatten(1).any(1).sum().item()
    clean, robust, raised, moved, n, eps0_changed, eps0_checked = run.all_sum(
        [clean, robust, raised, moved, n, eps0_changed, eps0_checked])
    if attack is None:
        return {"clean": 100 * clean / max(n, 1), "n": int(n)}
    out = {"clean": 100 * clean / max(n, 1), "robust": 100 * robust / max(n, 1), "n": int(n), "perturbed": int(moved),
           "raised": int(raised)}
    if attack0 is not None:
        out.update(eps0_changed=int(eps0_changed), eps0_checked=int(eps0_checked))
    return out


TARGETABLE = ["pgd", "mifgsm", "difgsm", "tifgsm", "nifgsm"]
APGD_BASED = ["apgd_ce", "apgd_dlr", "apgd_t", "autoattack"]
# AGFT's Table 6, in its column order: PGD, MI, DI2, TI, NI, PI, PI++, C&W, AA, PGDT, PGDTL, MIT, DI2T, TIT, NIT.
# AGFT's own "AA" is 10-step APGD with EOT 20; ours is the seed papers' 100-step AutoAttack.
AGFT_ATTACKS = ["pgd", "mifgsm", "difgsm", "tifgsm", "nifgsm", "pifgsm", "pifgsm++", "cw", "autoattack", "pgd_t_rand",
                "pgd_t_least", "mifgsm_t_rand", "difgsm_t_rand", "tifgsm_t_rand", "nifgsm_t_rand"]


def attack_table(eps, step_size, steps, apgd_steps=100, aa="seed"):
    """{name: lambda model, x, y: x_adv} for every attack of attacks.py."""
    A = attacks
    iterative = {name: getattr(A, name) for name in TARGETABLE}  # (model, x, y, eps, alpha, steps, targeted=...)
    table = {"pgd": lambda m, x, y: A.pgd(m, x, y, eps, step_size, steps),
             "cw": lambda m, x, y: A.cw(m, x, y, eps, step_size, steps),
             "fgsm": lambda m, x, y: A.fgsm(m, x, y, eps)}
    for name, f in iterative.items():
        table[name] = lambda m, x, y, f=f: f(m, x, y, eps, step_size, steps)
    table.update({
        "pifgsm": lambda m, x, y: A.pifgsm(m, x, y, eps, steps),
        "pifgsm++": lambda m, x, y: A.pifgsmpp(m, x, y, eps, steps),
        "apgd_ce": lambda m, x, y: A.apgd_ce(m, x, y, eps, apgd_steps),
        "apgd_dlr": lambda m, x, y: A.apgd_dlr(m, x, y, eps, apgd_steps),
        "apgd_t": lambda m, x, y: A.apgd_t(m, x, y, eps, apgd_steps),
        "fab_t": lambda m, x, y: A.fab_t(m, x, y, eps, apgd_steps),
        "square": lambda m, x, y: A.square(m, x, y, eps),
        "autoattack": lambda m, x, y: A.autoattack(m, x, y, eps, aa, apgd_steps),
    })
    for name, f in iterative.items():  # targeted: aim at a random or the least likely other class
        for suffix, pick in (("_t_rand", A.random_target), ("_t_least", A.least_likely_target)):
            table[name + suffix] = lambda m, x, y, f=f, pick=pick: f(m, x, pick(m, x, y), eps, step_size, steps,
                                                                      targeted=True)
    return table


ATTACKS = list(attack_table(0, 0, 0))


def attack_names(text):
    """'all' (AGFT's table), one name, or a comma-separated list -> [names]; unknown names are a UsageError."""
    names = AGFT_ATTACKS if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if "none" in names and len(names) > 1:
        raise UsageError(f"--attack {text}: 'none' (clean accuracy alone) goes alone; every attack's table has a "
                         "clean column already")
    if names == ["none"]:
        return names
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise UsageError(f"unknown attack '{','.join(unknown) or text}' (known: {', '.join(ATTACKS)}, all, none)")
    return names


def make_attack(name, eps, step_size, steps, apgd_steps=100, aa="seed"):
    """`lambda model, x, y: x_adv` for the attack `name` (see attack_table)."""
    return attack_table(eps, step_size, steps, apgd_steps, aa)[attack_names(name)[0]]


def attack_config(name, eps, step_size, steps, apgd_steps=100, aa="seed"):
    """What the attack `name` runs with, for the logs and results.json (steps: those that apply to it)."""
    cfg = {"name": name, "eps": eps, "step_size": step_size, "steps": steps}
    if name == "fgsm":
        cfg.update(step_size=eps, steps=1)
    elif name.startswith("pifgsm"):
        cfg.update(step_size=eps / steps * 10)  # PI's amplified step, 10 eps / steps
    elif name == "fab_t":
        cfg.update(step_size=eps, steps=apgd_steps)  # FAB has no step size: each step is a projection
    elif name in APGD_BASED:
        cfg.update(step_size=2 * eps, steps=apgd_steps)  # APGD's initial step; it adapts from there
        if name == "autoattack":
            cfg["aa"] = aa
    elif name == "square":
        cfg.update(step_size=eps, steps=5000)  # queries
    return cfg


def evaluate(encoder, model, datasets, attack, run, batch_size=128, workers=0, attack0=None):
    """{dataset: {clean, robust, n, ...}} for the image encoder `encoder` (pixel space) and CLIP text tower `model`;
    attack0 (the attack at eps 0) is checked on a few images of the first set (accuracy's eps0_changed)."""
    results = {}
    encoder.eval()
    for i, (name, ds) in enumerate(datasets.items()):
        classifier = clip.ZeroShotClassifier(encoder, text_head(model, ds, name).to(run.device))
        results[name] = accuracy(classifier, ds, attack, run, batch_size, workers, name, None if i else attack0)
    return results


def evaluate_attacks(encoder, model, datasets, names, run, batch_size=128, workers=0, **attack_args):
    """{attack: evaluate(...) results} for several attacks; attack_args: those of attack_table."""
    table, table0, out = attack_table(**attack_args), attack_table(**{**attack_args, "eps": 0.0}), {}
    for name in names:
        run.log(f"attack {name}")
        out[name] = evaluate(encoder, model, datasets, table[name], run, batch_size, workers, table0[name])
    return out


def report_attacks(run, model_name, configs, per_attack, over=None, protocol=None):
    """One row per dataset and the average (over `over`, default all), a clean column and one robust column per
    attack; results.json as in the module docstring."""
    first = next(iter(per_attack.values()))
    names = [n for n in first if not n.startswith("_")]
    over = [n for n in names if over is None or n in over]
    mean = lambda vals: sum(vals) / max(len(vals), 1)  # noqa: E731
    clean = {n: first[n]["clean"] for n in names}
    robust = {n: {a: per_attack[a][n]["robust"] for a in per_attack} for n in names}
    avg = {"clean": mean([clean[n] for n in over]), "robust": {a: mean([robust[n][a] for n in over]) for a in per_attack}}
    rows = [("clean", [clean[n] for n in names] + [avg["clean"]])]
    rows += [(a, [robust[n][a] for n in names] + [avg["robust"][a]]) for a in per_attack]
    eps = next(iter(configs.values()))["eps"]
    run.log("\n".join([f"\nzero-shot top-1 (%) at eps {fmt_eps(eps)}: clean, then under each attack (scored on the "
                       "true label)", *grid(names, rows)]))
    failed = [f"{a}: {msg}" for a, res in per_attack.items() for msg in sanity_checks(res, configs[a]["eps"])]
    if "autoattack" in per_attack and "pgd" in per_attack:  # AutoAttack is the stronger attack
        failed += [f"{n}: AutoAttack {robust[n]['autoattack']:.2f} > PGD {robust[n]['pgd']:.2f}" for n in names
                   if robust[n]["autoattack"] > robust[n]["pgd"] + 100 / max(first[n]["n"], 1)]
    out = {"model": model_name, "attacks": configs, "clean": clean, "robust": robust, "average": avg,
           "average_over": over, "n": {n: first[n]["n"] for n in names},
           "raised": {n: {a: per_attack[a][n]["raised"] for a in per_attack} for n in names}}
    return save_results(run, out, failed, per_attack, protocol)


def sanity_checks(results, eps):
    """Failed checks (RobustBench / Carlini et al. checklist) as short strings; empty when all pass."""
    failed = []
    for name, r in results.items():
        if r["robust"] > r["clean"]:
            failed.append(f"{name}: robust {r['robust']:.2f} > clean {r['clean']:.2f}")
        if eps > 0 and r["perturbed"] == 0:
            failed.append(f"{name}: the attack at eps {fmt_eps(eps)} returned the clean images (broken attack?)")
        if eps == 0 and r["robust"] != r["clean"]:
            failed.append(f"{name}: at eps 0 robust {r['robust']:.2f} != clean {r['clean']:.2f}")
        if r.get("eps0_changed"):
            failed.append(f"{name}: the attack at eps 0 changed {r['eps0_changed']} of {r['eps0_checked']} predictions")
    return failed


def eps_sweep(encoder, model, datasets, name, attack_args, run, batch_size=128, workers=0, n=200):
    """--check: robust accuracy of attack `name` at eps/2, eps, 2 eps on the same n images of each set; a larger eps
    must never give a higher robust accuracy (one image of slack for random starts). Returns (sweep, failed)."""
    eps = attack_args["eps"]
    sets = {k: data.eval_subset(ds, n, seed=1) for k, ds in datasets.items()}
    sweep = {}
    for e in (eps / 2, eps, min(2 * eps, 1.0)):
        torch.manual_seed(0)
        args = {**attack_args, "eps": e, "step_size": min(attack_args["step_size"], e)}
        res = evaluate(encoder, model, sets, make_attack(name, **args), run, batch_size, workers)
        sweep[fmt_eps(e)] = {k: r["robust"] for k, r in res.items()}
    failed, epss = [], list(sweep)
    for k in sets:
        for lo, hi in zip(epss, epss[1:]):
            if sweep[hi][k] > sweep[lo][k] + 100 / max(len(sets[k]), 1):
                failed.append(f"{k}: robust {sweep[hi][k]:.2f} at eps {hi} > {sweep[lo][k]:.2f} at eps {lo}")
    run.log("eps sweep (robust %): " + "; ".join(f"{e}: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items())
                                                for e, s in sweep.items()))
    return sweep, failed


def averaged(results, over=None):
    """The names the average covers: those of `over` (default: all) that were evaluated."""
    return [n for n in results if not n.startswith("_") and (over is None or n in over)]


def average(results, over=None):
    names = averaged(results, over)
    return {k: sum(results[n][k] for n in names) / max(len(names), 1) for k in ("clean", "robust")}


# The three papers' evaluation protocols: PGD steps and step size (eps 1/255 in all), whether CIFAR-10/100 and
# STL-10 are resized to the model resolution before the attack, the sets in the order of the paper's table columns,
# the sets the average covers, and the class names and prompt templates (prompts.PROMPTS).
TGA_SETS = ["tinyimagenet", "cifar10", "cifar100", "stl10", "sun397", "food101", "oxford_pets", "flowers102", "dtd",
            "eurosat", "fgvc_aircraft", "imagenet", "caltech101", "caltech256", "stanford_cars", "pcam"]
SAFT_SETS = ["tinyimagenet", "cifar10", "cifar100", "food101", "stl10", "oxford_pets", "flowers102", "dtd", "eurosat",
             "fgvc_aircraft", "caltech101", "caltech256", "stanford_cars", "pcam", "imagenet", "sun397"]
ROBUSTVLM_SETS = ["cifar10", "stl10", "cifar100", "stanford_cars", "caltech101", "oxford_pets", "flowers102", "dtd",
                  "eurosat", "fgvc_aircraft", "pcam", "imagenet-r", "imagenet-sketch"]
PROTOCOLS = {
    # AGFT Tables 1-2: PGD-20, CIFAR/STL attacked at native resolution, the 15 zero-shot sets and their mean
    "agft": dict(steps=20, step_size=1 / 255, resize_before_attack=False, datasets=data.ZERO_SHOT_SETS,
                 average=data.ZERO_SHOT_SETS, prompts="agft"),
    # TGA-ZSR / Comp-TGA Tables I-II: PGD-100, everything at 224 px, 16 sets with TinyImageNet, mean over all 16
    "tga": dict(steps=100, step_size=1 / 255, resize_before_attack=True, datasets=TGA_SETS, average=TGA_SETS,
                prompts="tga"),
    # SAFT Table 1: as TGA, but TinyImageNet (the training source) is reported apart from the 15-set "zero-shot average"
    "saft": dict(steps=100, step_size=1 / 255, resize_before_attack=True, datasets=SAFT_SETS, average=SAFT_SETS[1:],
                 prompts="saft"),
    # RobustVLM (FARE, Schlarmann et al., ICML 2024), its CLIP_benchmark evaluation: AutoAttack's custom version,
    # APGD-CE (5 restarts) then APGD-T, 100 iterations each (APGD-CE alone on PCAM's 2 classes), at eps 2/255 (run
    # again with --eps 4/255), on 1000 images per set (bash/run_benchmark_adv.sh); CIFAR/STL attacked at native
    # resolution (clip_benchmark/cli.py); its 13 sets (benchmark/datasets.txt) with OpenAI's template lists.
    "robustvlm": dict(steps=100, step_size=2 / 255, resize_before_attack=False, datasets=ROBUSTVLM_SETS,
                      average=ROBUSTVLM_SETS, prompts="openai", attack="autoattack", aa="robustvlm", eps=2 / 255,
                      max_per_dataset=1000),
}
SHORT = {"caltech101": "Cal101", "caltech256": "Cal256", "cifar10": "CIFAR10", "cifar100": "CIFAR100",
         "eurosat": "EuroSAT", "fgvc_aircraft": "FGVC", "flowers102": "Flowers", "food101": "Food101",
         "imagenet": "ImageNet", "oxford_pets": "Pets", "stanford_cars": "Cars", "sun397": "SUN397",
         "tinyimagenet": "TinyIN", "country211": "Country", "imagenet-r": "IN-R", "imagenet-sketch": "IN-Sketch"}


def grid(names, rows):
    """Text table lines: a header of the dataset columns and "avg", then one line per (label, cells)."""
    heads = [SHORT.get(n, n.upper() if len(n) <= 5 else n) for n in names] + ["avg"]
    widths = [max(len(h), 6) + 2 for h in heads]
    label_w = max(len(label) for label, _ in rows) + 2
    return [" " * label_w + "".join(f"{h:>{w}}" for h, w in zip(heads, widths))] + [  # a None cell: blank
        f"{label:<{label_w}}" + "".join(f"{'' if c is None else f'{c:.2f}':>{w}}" for c, w in zip(cells, widths))
        for label, cells in rows]


def table(models, names=None, over=None, paper=None):
    """Zero-shot accuracy table: one column per dataset (in `names` order, default the evaluated order) and the
    average over `over` (default all); one row per model and metric, {label: results} -> clean rows, robust rows;
    with `paper` (results.json's "paper") its row and the last model's difference to it after each metric's rows
    (blank where the paper has no number, and the average unless it covers the paper's sets)."""
    first = next(iter(models.values()))
    names = names or [n for n in first if not n.startswith("_")]
    over = averaged(first, over)
    rows, last = [], list(models.values())[-1]
    for metric in ("clean", "robust"):
        rows += [(f"{label} {metric}", [res[n][metric] if n in res else float("nan") for n in names]
                  + [average(res, over)[metric]]) for label, res in models.items()]
        if paper and paper["row"]:
            same = set(over) == set(published.PUBLISHED[paper["protocol"]]["average_over"])
            pub = [paper[metric].get(n) for n in names] + [paper[metric].get("average") if same else None]
            ours = [last[n][metric] if n in last else None for n in names] + [average(last, over)[metric]]
            rows += [(f"paper {metric}", pub), (f"ours - paper {metric}",
                                                [None if p is None or o is None else o - p for o, p in zip(ours, pub)])]
    apart = [n for n in names if n not in over]
    return "\n".join(grid(names, rows) + ([f"avg: mean over the {len(over)} sets other than {', '.join(apart)}"]
                                          if apart else []))


def save_results(run, out, failed, per_attack, protocol=None):
    """Log the failed sanity checks and the attacks that made clean-wrong images right, record the checks (and the
    protocol) in `out`, and write it as results.json. per_attack: {attack: evaluate(...) results}."""
    for a, res in per_attack.items():
        raised = {n: r["raised"] for n, r in res.items() if not n.startswith("_") and r.get("raised")}
        if raised:
            run.log(f"note: {a} made clean-wrong images right ({', '.join(f'{n} {k}' for n, k in raised.items())}); "
                    "not counted as robust")
    for msg in failed:
        run.log(f"SANITY CHECK FAILED: {msg}")
    out["checks"] = {"passed": not failed, "failed": failed, **out.get("checks", {})}
    if protocol:
        out["protocol"] = protocol
    if run.is_main and run.out_dir:
        harness.write_json(os.path.join(run.out_dir, "results.json"), out)
    return out


def report_clean(run, model_name, results, names=None, over=None, protocol=None):
    """--attack none: the clean accuracy row and results.json {"model", "attack": null, "clean": {dataset: acc},
    "average": {"clean": acc}, "average_over", "n": {dataset: images}, "checks"}."""
    names = names or averaged(results)
    over = averaged(results, over)
    avg = sum(results[n]["clean"] for n in over) / max(len(over), 1)
    run.log("\n".join(["\nzero-shot top-1 (%), clean images only (--attack none)",
                       *grid(names, [("clean", [results[n]["clean"] for n in names] + [avg])])]))
    out = {"model": model_name, "attack": None, "clean": {n: results[n]["clean"] for n in names},
           "average": {"clean": avg}, "average_over": over, "n": {n: results[n]["n"] for n in names}}
    return save_results(run, out, [], {}, protocol)


def report(run, model_name, attack_cfg, results, baseline=None, names=None, over=None, protocol=None, sweep=None,
           baseline_seconds=None, paper=None):
    """Print the table (baseline rows above the fine-tuned ones when given) and write results.json.

    names: the column order; over: the sets the average covers (default all); protocol: recorded in the JSON;
    sweep: eps_sweep's (sweep, failed); baseline_seconds: the time the baseline took (evaluated, or read from the cache);
    paper: published.comparison's, its rows printed beside ours (or why there are none)."""
    models = {"before": baseline, "after": results} if baseline else {"model": results}
    run.log(f"\nzero-shot top-1 (%), {attack_cfg['name']}-{attack_cfg['steps']} at eps {fmt_eps(attack_cfg['eps'])}, "
            f"step {fmt_eps(attack_cfg['step_size'])}\n{table(models, names, over, paper)}")
    if paper:
        run.log(paper.get("why") or f"paper: {paper['source']}, row {paper['row']}")
    out = {"model": model_name, "attack": attack_cfg, "results": results, "average": average(results, over),
           "average_over": averaged(results, over)}
    if baseline:
        out["baseline"] = {"results": baseline, "average": average(baseline, over), "seconds": baseline_seconds}
    if sweep:
        out["checks"] = {"eps_sweep": sweep[0]}
    if paper:
        out["paper"] = paper
    failed = sanity_checks(results, attack_cfg["eps"]) + (sweep[1] if sweep else [])
    return save_results(run, out, failed, {attack_cfg["name"]: results}, protocol)


# ----------------------------------------------------------------------------- the evaluation at the end of training


def held_out_probe(model, args, run, n):
    """harness.TrainLog's held-out accuracy (--eval-every): a function encoder -> {set: zero-shot clean accuracy (%)}
    on n fixed images of each --eval-sets set, in eval mode, with the text features of `model`'s text tower."""
    sets = data.eval_datasets(args.eval_sets.split(","), args.data_root, model.visual.input_resolution, n,
                              prompts=getattr(args, "prompts", None))
    heads = {name: (ds, text_head(model, ds, name).to(run.device)) for name, ds in sets.items()}

    @torch.no_grad()
    def probe(encoder):
        training = encoder.training
        encoder.eval()
        acc = {}
        for name, (ds, text) in heads.items():
            right = 0
            for x, y in data.make_loader(ds, args.batch_size):
                with run.autocast():
                    pred = clip.cosine_logits(encoder(data.to_device(x, run.device, ds.resize_to)), text, 1.0).argmax(-1)
                right += (pred.cpu() == y).sum().item()
            acc[name] = 100 * right / len(ds)
        encoder.train(training)
        return acc
    return probe


def code_digest():
    """A digest of the source that computes an evaluation (this file, the attacks, the data, the model and its text
    features, the toy world): results cached by other code, whose attacks may draw other random starts, are not
    reused."""
    h = hashlib.sha1()
    for path in (attacks.__file__, data.__file__, clip.__file__, clip.model.__file__, clip.tokenizer.__file__,
                 toy.__file__, __file__):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def fingerprint(ds):
    """A digest of what a dataset holds, for keying caches on content rather than on a folder's path: its classes,
    template and resizing, which samples (a Subset's indices), and its images: in-memory arrays and labels by their
    bytes, image files by path relative to their common folder, size and modification time (a file that changes
    changes the digest; the same files elsewhere do not)."""
    h = hashlib.sha1()

    def add(*parts):
        for part in parts:
            if isinstance(part, torch.Tensor):
                part = part.detach().cpu().contiguous().numpy()
            if isinstance(part, np.ndarray):
                h.update(f"{part.dtype} {part.shape}".encode())
                h.update(np.ascontiguousarray(part).tobytes())
            else:
                h.update(repr(part).encode())
            h.update(b"\0")
    add(list(ds.classnames), ds.template, getattr(ds, "resize_to", None), len(ds))
    while isinstance(ds, torch.utils.data.Subset):
        add("subset", list(ds.indices))
        ds = ds.dataset
    for attr in ("tensors", "data", "targets", "labels", "_labels"):  # in-memory images, and labels
        value = getattr(ds, attr, None)
        if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            add(attr, *value)
        elif isinstance(value, (np.ndarray, torch.Tensor, list)):
            add(attr, value)
    samples = getattr(ds, "samples", None) or getattr(ds, "_samples", None)
    if isinstance(samples, list):
        add("labels", [t[1] for t in samples if isinstance(t, tuple) and len(t) > 1])
    files = data.image_files(ds)
    folder = getattr(ds, "_base_folder", None)
    if not files and folder is not None and os.path.isdir(folder):  # e.g. PCAM's .h5 files, read lazily
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    if files:
        base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        for f in files:
            st = os.stat(f)
            add(os.path.relpath(os.path.abspath(f), base), st.st_size, st.st_mtime_ns)
    return h.hexdigest()


def weights_digest(module):
    """SHA-1 of a module's parameters and buffers (names, dtypes, shapes and bytes): what it computes, not where it
    was read from."""
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def read_cached_results(path, key, names):
    """(results, None) from a cache file written by baseline_results for this key, else (None, why not) where the
    file exists but cannot be used (unreadable, not ours, another key, sets missing)."""
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path) as f:
            cached = json.load(f)
        results = cached["results"]
        if cached["key"] != key:
            return None, "it was written for other settings"
        if sorted(results) != sorted(names) or not all(
                isinstance(results[n][m], (int, float)) for n in names for m in ("clean", "robust", "n")):
            return None, "its results do not cover the sets"
        return results, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:80]})"


def baseline_results(model, sets, cfg, args, run, evaluate_f0):
    """The pre-trained encoder's results, evaluate_f0() (evaluate.final_evaluation's evaluation of the encoder of
    `model` on `sets` under the attack `cfg`): the same for every method run with these settings, so cached on disk
    ($NANOZSAR_CACHE/baselines, default ~/.cache/nanozsar, beside the toy CLIP) under a key of the contents of what
    they depend on: the model's weights (weights_digest: a released CLIP, a --model file or the toy CLIP alike), each
    set's data.fingerprint (its class names and prompt template, so --prompts too, and its images' files by size and
    modification time, or its in-memory arrays), the attack, seed and precision, and the code that computes them
    (code_digest). The file is written atomically; a
    single-process run holds a lock while it evaluates, so a second run started meanwhile waits and reads the
    result; an unreadable or mismatching file is evaluated again and replaced (one line says so)."""
    key = {"code": code_digest(), "model": weights_digest(model), "sets": {n: fingerprint(ds) for n, ds in sets.items()},
           "attack": cfg, "seed": args.seed, "dtype": str(run.dtype)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(harness.cache_dir(), "baselines", digest + ".json")
    key = json.loads(json.dumps(key))  # as it reads back from JSON
    with harness.file_lock(path + ".lock", run.log) if run.world == 1 else contextlib.nullcontext():
        cached, why = read_cached_results(path, key, list(sets))
        if why:
            run.log(f"the cached results of the pre-trained encoder in {path} are not usable ({why}); evaluating "
                    "it again")
        if run.all_sum([cached is not None])[0] == run.world:  # under torchrun, every rank must agree
            run.log(f"the pre-trained encoder's results: {path} (cached)")
            return cached
        run.log("evaluating the pre-trained encoder")
        results = evaluate_f0()
        if run.is_main:
            harness.write_json(path, {"key": key, "results": results})
    return results


def final_evaluation(encoder, model, args, run):
    """End of training: PGD-20 at --eval-eps (the protocol's, not the training eps: a clean run, --eps 0, is still
    attacked; step 1/255, or eps/4 in the toy world) on the evaluation sets, before and after, with the training
    run's prompt convention (--prompts) and `model`'s text tower (training leaves it as loaded). The pre-trained
    encoder, for the rows before and the attention pictures, is loaded again."""
    eps = args.eval_eps
    cfg = {"name": "pgd", "eps": eps, "step_size": min(eps / 4 if args.toy else 1 / 255, eps), "steps": 20}
    attack = make_attack(cfg["name"], cfg["eps"], cfg["step_size"], cfg["steps"])
    attack0 = make_attack(cfg["name"], 0.0, cfg["step_size"], cfg["steps"])  # sanity check: eps 0 changes nothing
    prompts = getattr(args, "prompts", None)
    sets = data.eval_datasets(args.eval_sets.split(","), args.data_root, model.visual.input_resolution, prompts=prompts)
    baseline = baseline_seconds = f0 = None
    if args.eval_baseline or getattr(args, "save_attention", 0):
        pretrained = harness.load_model(args.model, run)  # the cache key's weights: not `model`, trained in place
        f0 = clip.ImageEncoder(pretrained.visual).to(run.device)
    if args.eval_baseline:
        t0 = time.time()
        baseline = baseline_results(pretrained, sets, cfg, args, run, lambda: evaluate(
            f0, model, sets, attack, run, args.batch_size, args.workers, attack0))
        baseline_seconds = time.time() - t0  # ~0 when cached: the first run with these settings pays it
    run.log("evaluating the fine-tuned encoder")
    results = evaluate(encoder, model, sets, attack, run, args.batch_size, args.workers, attack0)
    over = toy.HELDOUT if args.toy else None  # the toy average: held-out tasks only, not the fine-tuning task
    paper = None if args.toy else published.training_comparison(
        {"model": args.model, "attack": "pgd", "steps": 20, "step_size": cfg["step_size"], "eps": args.eps,
         "resize_before_attack": False, "prompts": prompts}, {"method": getattr(args, "method", None),
                                                               "args": vars(args)})
    out = report(run, args.model, cfg, results, baseline, over=over, protocol={"prompts": prompts} if prompts else None,
                 baseline_seconds=baseline_seconds, paper=paper)
    if getattr(args, "save_attention", 0) and run.is_main and run.out_dir:  # tga_zsr.py, comp_tga.py, saft.py
        save_attention(encoder, f0, model, attack, args, run)
    harness.unlock_folder(args.out_dir)  # the run is over: another may resume it
    return out


# ----------------------------------------------------------------------------- pictures


def save_examples(encoder, model, datasets, attack, eps, n, run, out_dir):
    """examples_<dataset>.png: n fixed (seeded) images of each set, clean, adversarial and the perturbation magnified
    to fill [0,1] (0.5 + delta / 2 eps: grey is no change), with the true class and the clean and adversarial
    predictions."""
    encoder.eval()
    for name, ds in datasets.items():
        classifier = clip.ZeroShotClassifier(encoder, text_head(model, ds, name).to(run.device))
        x, y = next(iter(data.make_loader(data.eval_subset(ds, n, seed=1), n)))
        x, y = data.to_device(x, run.device, ds.resize_to), y.to(run.device)
        x_adv = attack(classifier, x, y)
        with torch.no_grad(), run.autocast():
            pred, pred_adv = classifier(x).argmax(-1), classifier(x_adv).argmax(-1)
        delta = 0.5 + (x_adv - x) / (2 * eps) if eps > 0 else torch.full_like(x, 0.5)
        c = ds.classnames
        notes = [[(f"true: {c[y[i]]}", "black"), (f"clean: {c[pred[i]]}", pictures.GOOD if pred[i] == y[i] else pictures.BAD),
                  (f"adversarial: {c[pred_adv[i]]}", pictures.GOOD if pred_adv[i] == y[i] else pictures.BAD)] for i in range(len(y))]
        path = os.path.join(out_dir, f"examples_{name}.png")
        pictures.save_grid(path, [[x[i], x_adv[i], delta[i]] for i in range(len(y))],
                  ["clean", f"adversarial, eps {fmt_eps(eps)}", "perturbation (scaled)"], notes, name)
        wrong, wrong_adv = (pred != y).sum().item(), (pred_adv != y).sum().item()
        run.log(f"wrote {path}: red (wrong) predictions, clean {wrong}/{len(y)}, adversarial {wrong_adv}/{len(y)}")


# The text-guided attention map each method trains with, from the ground-truth class text: TGA-ZSR's A(x, t_y) with the
# set's prompt (SAFT too, whose own maps average its K description heads instead), Comp-TGA's A_cls * (1 - A_non).
ATTENTION = {"tga_zsr": ("TGA-ZSR map", None), "saft": ("TGA map (class prompt)", None),
             "comp_tga": ("Comp-TGA map", ("This is a photo of a {}", "This is not a photo of a {}"))}


def attention_images(args, resolution, n):
    """n held-out images of the training classes (the training set's evaluation split, else its training split)."""
    prompts = getattr(args, "prompts", None)
    try:
        ds = data.load_dataset(args.train_set, args.data_root, resolution, prompts=prompts)
    except data.DataError:
        ds = data.load_dataset(args.train_set, args.data_root, resolution, train=True, prompts=prompts)
    return data.eval_subset(ds, n)


def save_attention(encoder, f0, model, attack, args, run):
    """attention.png: for --save-attention N images, the method's text-guided attention map (clip/model.py) of the
    pre-trained encoder f0 and the fine-tuned encoder, on the clean image and on the attack's image against that
    encoder, overlaid on the image; the notes give each encoder's clean and adversarial prediction."""
    title, prompts = ATTENTION.get(args.method, ATTENTION["tga_zsr"])
    ds = attention_images(args, model.visual.input_resolution, args.save_attention)
    x, y = next(iter(data.make_loader(ds, len(ds))))
    x, y = data.to_device(x, run.device, ds.resize_to), y.to(run.device)
    head = text_head(model, ds, args.train_set).to(run.device)
    if prompts:
        cls, non = (text_head(model, ds, args.train_set, p).to(run.device) for p in prompts)
    columns, preds = [x], []
    for f in (f0, encoder):
        f.eval()
        classifier = clip.ZeroShotClassifier(f, head)
        x_adv = attack(classifier, x, y)
        for img in (x, x_adv):
            with torch.no_grad(), run.autocast():
                tokens = f(img, all_tokens=True)
            if prompts:
                maps = attention.complementary(tokens, cls[y], non[y], img.shape[-2:])
            else:
                maps = attention.text_guided(tokens, head[y], img.shape[-2:])
            columns.append(torch.stack([pictures.overlay(img[i], maps[i]) for i in range(len(y))]))
            preds.append(clip.cosine_logits(tokens[:, 0], head, 1.0).argmax(-1))
    c = ds.classnames
    notes = [[(f"true: {c[y[i]]}", "black")] + [(f"{who} {what}: {c[p[i]]}", pictures.GOOD if p[i] == y[i] else pictures.BAD)
             for (who, what), p in zip([("pre-trained", "clean"), ("pre-trained", "adv"), ("fine-tuned", "clean"),
                                        ("fine-tuned", "adv")], preds)] for i in range(len(y))]
    path = os.path.join(run.out_dir, "attention.png")
    pictures.save_grid(path, [[col[i] for col in columns] for i in range(len(y))],
              ["image", "pre-trained, clean", "pre-trained, adv", "fine-tuned, clean", "fine-tuned, adv"], notes,
              f"{title}, true class")
    run.log(f"wrote {path}")


# ----------------------------------------------------------------------------- command line


def parser():
    """evaluate.py's flags; every number has a range, checked (one line) when parsed."""
    p = harness.Parser(__doc__)
    add = p.add_argument
    add("--toy", action="store_true", help="toy CLIP and the toy world's held-out tasks at the toy eps")
    add("--model", help="CLIP name, checkpoint file, or open_clip / transformers model folder (docs/checkpoints.md; "
                        "default: the checkpoint's own, else ViT-B/32)")
    add("--checkpoint", help="image-encoder checkpoint: ours, or one released with TeCoA / PMG-AFT / TGA-ZSR / SAFT / "
                             "AGFT / FARE (open_clip), see CHECKPOINT_FORMATS")
    add("--protocol", default="agft", choices=list(PROTOCOLS),
        help="a paper's evaluation: agft (PGD-20, native-resolution CIFAR/STL, 15 sets), tga (PGD-100, resized, 16 "
             "sets with TinyImageNet), saft (as tga, TinyImageNet apart from the 15-set average), each with its "
             "paper's class names and prompts; robustvlm (APGD-CE + APGD-T at eps 2/255, 1000 images of 13 sets, "
             "OpenAI's template ensembles); default agft")
    add("--paper-row", help="the published row of the protocol's table to print beside ours (default: CLIP for "
                            "OpenAI's weights, the method's row for a checkpoint of ours)")
    add("--datasets", type=harness.parse_names, help="comma-separated dataset names (default: the protocol's; 'all' adds "
                           f"{', '.join(data.EXTRA_SETS)})")
    add("--data-root", help="folder holding the datasets (layouts: README)")
    add("--download", action="store_true", help="let torchvision download the sets it can")
    add("--resize-before-attack", action=argparse.BooleanOptionalAction,
        help="resize CIFAR-10/100 and STL-10 to the model resolution before the attack (default: the protocol's)")
    add("--prompts", choices=list(prompts.PROMPTS), help="class names and prompt templates of the sets, as in the code of "
        "agft (AGFT), tga (TeCoA, PMG-AFT, TGA-ZSR, Comp-TGA) or saft (SAFT), or openai (OpenAI's template lists, "
        "averaged) (default: the protocol's)")
    add("--attack", type=harness.parse_names,
        help=f"{', '.join(ATTACKS)}; 'all' for AGFT's 15-attack table; a comma-separated list; or 'none' for clean "
             "accuracy alone (default: the protocol's, pgd but for robustvlm)")
    add("--aa", choices=["seed", "standard", "robustvlm"], help="AutoAttack version: seed = APGD-CE + APGD-DLR (the "
        "default but for --protocol robustvlm), standard = APGD-CE + APGD-T + FAB-T + Square, robustvlm = APGD-CE "
        "(5 restarts) + APGD-T")
    add("--apgd-steps", type=harness.POSITIVE, default=100, help="iterations of each APGD and FAB-T run (also inside AutoAttack; default 100)")
    add("--eps", "--eval-eps", type=harness.parse_eps, help="L-inf radius in [0, 1], e.g. 1/255 (default 1/255, "
        "every protocol's; 16/255 with --toy)")
    add("--step-size", type=harness.parse_eps, help="attack step size in [0, eps], e.g. 1/255 (default: the protocol's)")
    add("--steps", type=harness.COUNT, help="attack steps (default: the protocol's)")
    add("--max-per-dataset", type=harness.POSITIVE, help="evaluate a fixed, seeded subset of N images per dataset")
    add("--batch-size", type=harness.POSITIVE, default=128, help="global batch, split across processes (must divide by them)")
    add("--workers", type=harness.COUNT, help="data-loading processes (default: up to 8, the CPUs per process less one; 0 with --toy, "
        "whose sets live in memory)")
    add("--out-dir", default="runs/eval")
    add("--save-examples", type=harness.COUNT, default=0, metavar="N", help="write examples_<dataset>.png into --out-dir: N images "
        "of each set, clean, adversarial (the first attack) and the perturbation, with the predictions")
    add("--device", default="auto", type=harness.parse_device, help="auto | cpu | cuda | cuda:N | mps")
    add("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    add("--check", action="store_true", help="also run an eps sweep (eps/2, eps, 2 eps) on 200 images per set and "
                                             "check that robust accuracy never rises with eps")
    add("--seed", type=harness.SEED, default=0)
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    harness.check_out_dir(p, args.out_dir)
    harness.check_request(args)
    proto = PROTOCOLS[args.protocol]
    ckpt = ckpt_model = trained = source = None  # trained: how a checkpoint of ours was trained, {} for anyone else's
    if args.checkpoint:  # its layout and weights are checked here, before any model is loaded or downloaded
        ckpt = clip.read_checkpoint(args.checkpoint)
        ckpt_model = ckpt.get("model") if isinstance(ckpt, dict) else None
        ours = isinstance(ckpt, dict) and isinstance(ckpt.get("method"), str) and isinstance(ckpt.get("args"), dict)
        trained = {"method": ckpt["method"], "args": ckpt["args"]} if ours else {}
        _, encoder_sd = clip.checkpoint_encoder(ckpt, args.checkpoint)
    if not args.model:  # errors name where the model came from, not a --model that was not typed
        args.model = ckpt_model or ("toy" if args.toy else "ViT-B/32")
        source = (f"the \"model\" field of {args.checkpoint}" if ckpt_model else
                  "the --toy default" if args.toy else "the default; --model not given")
    if ckpt_model and source and not (args.model in clip.available_models() + ["toy"] or os.path.exists(args.model)):
        raise UsageError(f"{args.checkpoint} names the model it was trained from {args.model!r} (its \"model\" "
                         "field), which is neither a CLIP name nor a file here; pass --model with that model's name or file")
    if args.checkpoint:
        clip.loader.check_encoder_fits(encoder_sd, args.checkpoint, args.model, ckpt_model, source)
        del encoder_sd
    if args.workers is None:
        args.workers = 0 if args.toy else harness.default_workers()
    if args.paper_row and args.paper_row not in published.PUBLISHED.get(args.protocol, {"rows": []})["rows"]:
        rows = published.PUBLISHED.get(args.protocol, {"rows": {}})["rows"]
        raise UsageError(f"--paper-row {args.paper_row}: no such row for --protocol {args.protocol} (rows: "
                         f"{', '.join(rows) or 'none'})")
    aa = args.aa  # as typed: None unless given
    for key, toy_value, default in (("eps", toy.EPS, 1 / 255), ("attack", "pgd", "pgd"), ("aa", "seed", "seed"),
                                    ("max_per_dataset", None, None)):
        if getattr(args, key) is None:
            setattr(args, key, toy_value if args.toy else proto.get(key, default))
    chosen = attack_names(args.attack)
    if args.step_size is None:
        args.step_size = min(args.eps / 4 if args.toy else proto["step_size"], args.eps)
    if args.steps is None:
        args.steps = 20 if args.toy else proto["steps"]
    harness.check_attack_flags(args.eps, args.step_size, args.steps)
    if chosen == ["none"] and (args.check or args.save_examples):
        raise UsageError(f"--attack none measures clean accuracy alone; {'--check' if args.check else '--save-examples'}"
                         " needs an attack")
    if args.datasets == "all":
        names = data.ZERO_SHOT_SETS + data.EXTRA_SETS
    elif args.datasets:
        names = [data.canonical_name(n.strip()) or n.strip() for n in args.datasets.split(",")]
    else:
        names = toy.HELDOUT if args.toy else proto["datasets"]
    for flag, unused, why in [  # flags given for what this evaluation does not run
            (f"--aa {aa}", aa and "autoattack" not in chosen, f"it picks AutoAttack's version, and the attacks ({','.join(chosen)}) hold none"),
            (f"--prompts {args.prompts}", args.prompts and data.unprompted(names), f"the sets {', '.join(names)} have "
             "their own class names and template"),
            (f"--{'' if args.resize_before_attack else 'no-'}resize-before-attack", args.resize_before_attack is not
             None and not data.SMALL_SETS & set(names), f"it applies to {', '.join(sorted(data.SMALL_SETS))} only")]:
        if unused:
            raise harness.no_effect(flag, f"{why}; drop it")
    if args.resize_before_attack is None:
        args.resize_before_attack = proto["resize_before_attack"] and not args.toy
    args.prompts = args.prompts or proto["prompts"]
    if not args.download:  # missing sets fail here, in one line, before minutes of model loading
        data.check_datasets(names, args.data_root)
    run = harness.setup_run(args)
    model = harness.load_model(args.model, run)
    if args.checkpoint:
        clip.load_visual(model, args.checkpoint, args.model, ckpt, source)
    sets = data.eval_datasets(names, args.data_root, model.visual.input_resolution, args.max_per_dataset,
                              args.download, args.resize_before_attack, args.prompts)
    over = [n for n in sets if n in proto["average"]] or None  # the protocol's average, else all (toy, imagefolder)
    protocol = {"name": "toy" if args.toy else args.protocol, "resize_before_attack": args.resize_before_attack,
                "max_per_dataset": args.max_per_dataset, "prompts": None if args.toy else args.prompts}
    attack_args = dict(eps=args.eps, step_size=args.step_size, steps=args.steps, apgd_steps=args.apgd_steps, aa=args.aa)
    harness.begin(args, run)  # every check has passed: args.json, and the log from here on, into --out-dir
    encoder = clip.ImageEncoder(model.visual).to(run.device)  # its normalisation buffers too
    if args.save_examples and run.is_main:  # first: seconds, and they show what the attack does
        save_examples(encoder, model, sets, make_attack(chosen[0], **attack_args), args.eps,
                      args.save_examples, run, args.out_dir)
    if chosen == ["none"]:
        results = evaluate(encoder, model, sets, None, run, args.batch_size, args.workers)
        report_clean(run, args.checkpoint or args.model, results, list(sets), over, protocol)
        return
    if len(chosen) > 1:  # one robust column per attack
        per_attack = evaluate_attacks(encoder, model, sets, chosen, run, args.batch_size, args.workers, **attack_args)
        configs = {a: attack_config(a, **attack_args) for a in chosen}
        report_attacks(run, args.checkpoint or args.model, configs, per_attack, over, protocol)
        return
    cfg = attack_config(args.attack, **attack_args)
    paper = None if args.toy else published.comparison(args.protocol, {
        "model": args.model, "attack": args.attack, "steps": args.steps, "step_size": args.step_size, "eps": args.eps,
        "resize_before_attack": args.resize_before_attack, "prompts": args.prompts}, trained, args.paper_row)
    results = evaluate(encoder, model, sets, make_attack(args.attack, **attack_args), run, args.batch_size, args.workers,
                       make_attack(args.attack, **{**attack_args, "eps": 0.0}))
    sweep = eps_sweep(encoder, model, sets, args.attack, attack_args, run, args.batch_size, args.workers) if args.check else None
    report(run, args.checkpoint or args.model, cfg, results, names=list(sets), over=over, protocol=protocol, sweep=sweep,
           paper=paper)


if __name__ == "__main__":
    harness.cli(main)
