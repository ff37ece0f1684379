"""The README's toy table: every method's default `--toy` run and each method's ablation, over three seeds.

    python toy_table.py                               # the whole table: 13 runs x 3 seeds, two at a time
    python toy_table.py --seeds 0 --runs tecoa,agft   # a subset
    python toy_table.py --jobs 1                      # one run at a time (each on one CPU thread)
    python toy_table.py --out-dir runs/toy-table      # where the runs go (default); finished runs are reused

Each run is `python SCRIPT.py --toy --seed S [flags]` in its own process (one CPU thread, as every toy run) and
writes OUT_DIR/NAME-sS/results.json; the table reads those files, so an interrupted table picks up where it stopped.
A run's time is its process's wall time (training and final evaluation) less the evaluation of the pre-trained
encoder, which the first run of each seed does once and caches for the others: that evaluation is the pre-trained
row's time. Pre-training the toy CLIP is timed alone first (stderr) when it is not cached. Cells are mean +- std over the seeds of clean / robust top-1 (%), PGD-20 at the toy
eps, 300 fixed images per task.
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import toy

RUNS = {  # name -> (script, extra flags): the seven methods' defaults, then the ablations
    "tecoa": ("tecoa.py", []),
    "pmg_aft": ("pmg_aft.py", []),
    "tga_zsr": ("tga_zsr.py", []),
    "comp_tga": ("comp_tga.py", []),
    "saft": ("saft.py", []),
    "agft": ("agft.py", []),
    "fare": ("fare.py", []),
    "agft_uncalibrated": ("agft.py", ["--gamma", "1", "--inv-tau", "100"]),
    "pmg_aft_no_kl": ("pmg_aft.py", ["--alpha", "0", "--beta", "0"]),
    "tga_zsr_no_maps": ("tga_zsr.py", ["--alpha", "0", "--beta", "0"]),
    "tga_zsr_comp_weights": ("tga_zsr.py", ["--alpha", "0.7", "--beta", "0.7"]),  # Comp-TGA's weights, TGA-ZSR's map
    "saft_k1": ("saft.py", ["--k", "1"]),
    "fare_clean_weight": ("fare.py", ["--clean-weight", "0.5"]),  # half the loss on the clean image
}
TASKS = toy.HELDOUT + [toy.TRAIN]


def run_one(name, seed, out_dir, log):
    """Run one training script to the end (or reuse a finished run); returns its results and wall time."""
    script, flags = RUNS[name]
    out = os.path.join(out_dir, f"{name}-s{seed}")
    done = os.path.join(out, "table.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts again
    cmd = [sys.executable, script, "--toy", "--seed", str(seed), "--out-dir", out] + flags
    log(f"{' '.join(cmd[1:])}")
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"toy_table: {' '.join(cmd[1:])} failed: {proc.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    baseline = res.get("baseline", {})
    seconds = time.time() - t0 - (baseline.get("seconds") or 0)  # the run's own time: training and final evaluation
    row = {"seconds": seconds, "results": res["results"], "baseline": baseline.get("results"),
           "baseline_seconds": baseline.get("seconds")}
    with open(done, "w") as f:
        json.dump(row, f)
    return row


def mean_std(values, digits=1):
    """'m +- s' over the seeds ('m' alone for one seed)."""
    m = statistics.fmean(values)
    return f"{m:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def line(label, rows, seconds=None):
    heldout = [mean_std([statistics.fmean(r[t][metric] for t in toy.HELDOUT) for r in rows])
               for metric in ("clean", "robust")]
    tasks = [f"{mean_std([r[t]['clean'] for r in rows])} / {mean_std([r[t]['robust'] for r in rows])}" for t in TASKS]
    return "| " + " | ".join([label] + heldout + tasks + [f"{mean_std(seconds, 0)} s" if seconds else ""]) + " |"


def pretrain(log):
    """Pre-train the toy CLIP (or find it cached) in a process of its own, so that its time is measured alone."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", "import harness; harness.load_model('toy', harness.Run('cpu', None))"], stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"toy_table: pre-training the toy CLIP failed: {proc.stderr.strip().splitlines()[-1:]}")
    cached = "pre-training" not in proc.stderr
    log("toy CLIP: " + ("cached" if cached else f"pre-trained in {time.time() - t0:.0f} s"))


def table(runs, seeds, out_dir, jobs=2, log=print):
    pretrain(log)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # each run is a process with one CPU thread
        futures = {(name, s): pool.submit(run_one, name, s, out_dir, log) for name in runs for s in seeds}
        results = {name: [futures[name, s].result() for s in seeds] for name in runs}
    names = {t: toy.TASKS[t][1] for t in TASKS}
    chance = {t: {"clean": 100 / len(names[t]), "robust": 100 / len(names[t])} for t in TASKS}
    heads = ["model", "held-out clean", "held-out robust"] + [
        f"{t.replace('toy_', '')} ({len(names[t])})" if t != toy.TRAIN else f"fine-tuning task ({len(names[t])})"
        for t in TASKS] + ["run time"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads),
             line("chance (1 / classes)", [chance])]
    first = next(iter(results.values()))
    # evaluated once per seed (by whichever run came first), then read from the cache by the others
    evaluation = [max(results[name][i]["baseline_seconds"] or 0 for name in runs) for i in range(len(seeds))]
    lines.append(line("pre-trained toy CLIP", [r["baseline"] for r in first], evaluation))
    for name, rows in results.items():
        script, flags = RUNS[name]
        lines.append(line(f"`{' '.join([script, '--toy'] + flags)}`", [r["results"] for r in rows],
                          [r["seconds"] for r in rows]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds (default 0,1,2)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated runs (default all: {', '.join(RUNS)})")
    p.add_argument("--out-dir", default=os.path.join("runs", "toy-table"))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2, for 2 cores)")
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        p.error(f"unknown run(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(RUNS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got '{args.seeds}'")
    t0 = time.time()
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    log = lambda s: print(f"[{time.time() - t0:5.0f}s] {s}", file=sys.stderr)  # noqa: E731
    print(table(runs, seeds, args.out_dir, args.jobs, log))
    print(f"\n{len(runs) * len(seeds)} runs, seeds {args.seeds}, {time.time() - t0:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
