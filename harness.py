"""The run harness of the seven training scripts, evaluate.py and bench.py: errors and flags (one-line errors, ranges,
eps), the run (processes, device, precision, progress lines), files (locks, atomic writes, the cache), loading the
model (the toy CLIP from its cache), the checks before the run; and for training: the flags' defaults, the output
folder, the learning-rate schedule, the training log and its curves, checkpoints, the pre-trained encoder's cached
results.

A script holds its method and its paper's setting (PAPER, at its top); everything here is the plumbing around them:

    p = harness.training_parser(__doc__)                  # the flags every script shares
    add_method_args(p)                                    # the method's own
    args = harness.parse_args(p, argv, "agft", PAPER, TOY)  # defaults: PAPER, or the toy world's preset with --toy
    run = harness.setup(args)                             # processes, device, precision; the output folder, locked
    model = harness.load_model(args.model, run)           # clip.load, or the toy CLIP from its cache
    ckpt = harness.Checkpoint(args, run, model, opt, scaler); step = ckpt.resume(total)
    log = harness.TrainLog(..., evaluate.held_out_probe); log.check_finite(...); log.step(...); log.close()
    evaluate.final_evaluation(encoder, model, args, run)  # PGD-20 before and after, results.json

Evaluation itself (zero-shot heads, attacks, tables, pictures) is evaluate.py's, which imports this module; where the
harness needs it (the held-out accuracy of the training log), the script hands it over.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import clip
import data
import pictures
import prompts
import toy

# ----------------------------------------------------------------------------- errors, flags, checks before the run


class UsageError(Exception):
    """Bad flags or input; the message is one line saying what is wrong and how to fix it."""


def cli(main):
    """Run main(); a known failure prints one line (no traceback) and exits with status 1."""
    try:
        main()
    except (UsageError, clip.CLIPError, data.DataError) as e:
        give_back_folders()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        give_back_folders()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'error: argument --eps: ... (see --help)'. A flag whose type is a Range gets
    its range appended to its help."""

    def __init__(self, doc, formatter_class=argparse.RawDescriptionHelpFormatter):
        super().__init__(description=doc, formatter_class=formatter_class)

    def add_argument(self, *flags, **kw):
        if isinstance(kw.get("type"), Range) and kw.get("help") != argparse.SUPPRESS:
            kw["help"] = f"{kw['help']}; {kw['type'].text}" if kw.get("help") else kw["type"].text
        return super().add_argument(*flags, **kw)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class Range:
    """An argparse type: an int or float within [lo, hi] (None: no bound; lo_open/hi_open: bound excluded). NaN and
    inf are refused; the message says the range: "argument --batch-size: 0 is out of range (an integer >= 1)"."""

    def __init__(self, kind, lo=None, hi=None, lo_open=False, hi_open=False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        what = "an integer" if kind is int else "a number"
        lo_, hi_ = (f"{v:g}" if isinstance(v, float) else str(v) for v in (lo, hi))  # 2 ** 32 - 1 in full
        if lo is not None and hi is not None:
            self.text = f"{what} in {'(' if lo_open else '['}{lo_}, {hi_}{')' if hi_open else ']'}"
        elif lo is not None:
            self.text = f"{what} {'>' if lo_open else '>='} {lo_}"
        else:
            self.text = what if hi is None else f"{what} {'<' if hi_open else '<='} {hi_}"
        self.__name__ = what  # argparse's fallback messages name the type

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {self.text}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not a finite number ({self.text})")
        if (self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo))) or (
                self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi))):
            raise argparse.ArgumentTypeError(f"{text} is out of range ({self.text})")
        return value


# the ranges the flags of evaluate.py, bench.py and the training scripts use
COUNT, POSITIVE, SEED = Range(int, 0), Range(int, 1), Range(int, 0, 2 ** 32 - 1)  # >= 0, >= 1, numpy's seed range
POSITIVE_REAL, NON_NEGATIVE, UNIT_INTERVAL = Range(float, 0, lo_open=True), Range(float, 0), Range(float, 0, 1, lo_open=True)


def parse_device(text):
    """auto | cpu | cuda | cuda:N | mps, checked when parsed (cuda:N against the GPUs here, when CUDA is)."""
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
        if index and torch.cuda.is_available() and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"'{text}': this machine has {torch.cuda.device_count()} CUDA device(s), "
                                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return text
    raise argparse.ArgumentTypeError(f"unknown device '{text}' (auto, cpu, cuda, cuda:N or mps)")


def parse_names(text):
    """A comma-separated list of names, unchanged; an empty name (a stray or trailing comma) is refused."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"'{text}' has an empty name (a stray comma?); write e.g. cifar10,stl10")
    return text


def parse_eps(text):
    """'1/255' or a float in [0, 1]. A bare number > 1 such as '4' is refused: it almost surely meant 4/255."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (write e.g. 1/255 or 0.0039)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number (write e.g. 1/255 or 0.0039)")
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is negative")
    if value > 1:
        raise argparse.ArgumentTypeError(f"'{text}' is above 1 in [0,1] pixel units: did you mean {text}/255?")
    return value


def fmt_eps(value):
    return f"{value * 255:g}/255"


def check_out_dir(p, out_dir):
    """p.error (one line) for an --out-dir that cannot hold the run's files: empty, or a file."""
    if not out_dir:
        p.error("--out-dir is empty: name the folder this run writes into")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        p.error(f"--out-dir {out_dir} is a file, not a folder: choose another --out-dir")


def check_request(args):
    """UsageError (one line), before any work, for a run this machine or these processes cannot honour: a device
    (CUDA, MPS) that is not here, --dtype fp16 off CUDA (its loss scaler runs on CUDA only: a CPU run would go
    unscaled), bf16 on a GPU without it, a global --batch-size that does not divide by the processes under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must divide by the {world} "
                         "processes (each takes an equal share)")
    cuda = torch.cuda.is_available()
    if args.device.startswith("cuda") and not cuda:
        raise UsageError(f"--device {args.device} but CUDA is not available here; use --device cpu")
    if args.device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps but MPS (Apple's GPU) is not available here; use --device cpu")
    on = "cuda" if args.device.startswith("cuda") or (args.device == "auto" and cuda) else args.device.replace("auto", "cpu")
    if args.dtype == "fp16" and on != "cuda":
        raise UsageError(f"--dtype fp16 needs CUDA (its loss scaler runs there only), and this run is on {on}; use "
                         "--dtype fp32 or bf16")
    if args.dtype == "bf16" and on == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--dtype bf16: this GPU does not support bf16; use --dtype fp16 (with loss scaling) or fp32")


def no_effect(what, why):
    """The UsageError for an input the user gave that the run would not use at all (accepted, it changes nothing)."""
    return UsageError(f"{what} would change nothing: {why}")


def check_attack_flags(eps, step_size, steps):
    """UsageError (one line) for attack flags that cannot work: steps below 0, a step larger than eps."""
    if steps < 0:
        raise UsageError(f"attack steps must be >= 0, got {steps}")
    if step_size > eps > 0:
        raise UsageError(f"step size {fmt_eps(step_size)} is larger than eps {fmt_eps(eps)}: every step would be "
                         "cut back by the projection; use a step size <= eps")


def require_vit(model_name, method, visual=None):
    """UsageError (one line) when the image tower is a ResNet: TGA-ZSR, Comp-TGA and SAFT build their attention maps
    from ViT patch tokens. Without `visual`, judged from the model's name or file alone (clip.vision_kind): their
    get_args call it so, and the refusal comes before any download, data scan or pre-training; their setup_method
    calls it again with the built model's `visual`, for the files that cannot be told without building them."""
    if visual is not None:
        resnet = not isinstance(visual, clip.model.VisionTransformer)
    else:
        resnet = model_name != "toy" and clip.vision_kind(model_name) == "resnet"
    if resnet:
        raise UsageError(f"{method} needs a ViT image encoder: its attention maps are made of patch tokens, which "
                         f"{model_name} (a ResNet) does not have; use e.g. --model ViT-B/32")


# ----------------------------------------------------------------------------- the run: device, precision, processes


@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1
    out_dir: str = None
    held: list = None  # log lines kept back until begin(): a refused run writes nothing into its folder

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def attack_autocast(self):
        """The training attack's input gradients in bf16 or fp32, never fp16 (fp16 gradients underflow and mask the
        attack). Evaluation attacks run in fp32 always: in bf16 PGD-20 leaves robust accuracy some points higher."""
        return self.autocast() if self.dtype == torch.bfloat16 else contextlib.nullcontext()

    def log(self, msg):
        if not self.is_main:
            return
        print(msg, flush=True)
        if self.held is not None:
            self.held.append(msg)
        elif self.out_dir:
            with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
                print(msg, file=f)

    def all_sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()


def setup_run(args):
    """Processes (torchrun sets RANK/WORLD_SIZE), device, precision, seed (check_request first); the output folder,
    if the command has one: locked by rank 0 (lock_folder: a second run into it is refused). Nothing is written into
    it until begin()."""
    check_request(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and world > 1:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(args.device)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    if dtype is None:  # auto
        dtype = torch.float32 if device.type == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    torch.manual_seed(args.seed + rank)
    run = Run(device, dtype, rank, world, getattr(args, "out_dir", None), [])
    if run.out_dir and run.is_main:
        lock_folder(run.out_dir)
    return run


def begin(args, run):
    """The run is accepted (every check before the work has passed): args.json and the log lines so far are written
    into the output folder, which is now the run's. Until then a refusal leaves the folder as it was (cli)."""
    held, run.held = run.held, None
    if run.out_dir and run.is_main and held is not None:
        UNTOUCHED.pop(os.path.abspath(run.out_dir), None)
        write_json(os.path.join(run.out_dir, "args.json"), vars(args))
        with open(os.path.join(run.out_dir, "log.txt"), "a") as f:  # printed already
            f.writelines(msg + "\n" for msg in held)


class Progress:
    """Prints 'what i/n | rate unit/s | ETA' at most every `every` seconds."""

    def __init__(self, run, what, total, unit="img", every=10.0):
        self.run, self.what, self.total, self.unit, self.every = run, what, total, unit, every
        self.t0 = self.last = time.time()
        self.done = 0

    def update(self, n, extra=""):
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.run.log(f"{self.what} {self.done}/{self.total}{extra} | {rate:.1f} {self.unit}/s | ETA {fmt_time(eta)}")


def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------- files: locks, atomic writes, caches


@contextlib.contextmanager
def file_lock(path, log=print, wait=True):
    """An exclusive lock on the file `path` for the duration (flock: the kernel releases it when the process dies).
    Says so when it has to wait for another process; with wait=False, raises BlockingIOError instead. Without fcntl
    (Windows) it does not lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            log(f"waiting for another process that holds {path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_atomically(path, write, mode="w"):
    """write(f) into a temporary file in the same folder, flushed to disk, then renamed over `path`: a reader never
    sees half a file, and a crash mid-write leaves the old one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    write_atomically(path, lambda f: json.dump(obj, f, indent=2))


cache_dir = toy.cache_dir  # $NANOZSAR_CACHE: the toy CLIP's weights and the pre-trained encoders' results
toy_cache_path = toy.cache_path  # the toy CLIP's weights, in cache_dir()


def load_model(name, run):
    """The CLIP called `name` (clip.load's names and files, or "toy") on the run's device, eval mode, fp32.

    "toy": the toy CLIP from the cache (toy_cache_path), pre-trained there once under a lock while any other process
    waits, and again if the file is unreadable. A released model's download runs under a lock too (clip-download.lock
    in cache_dir). Under torchrun rank 0 loads first (a download, a pre-training) while the others wait, then they
    read its file."""
    def load():
        log = lambda s: print(s, file=sys.stderr)  # noqa: E731
        if name in clip.available_models():  # a download: one process at a time, the others then read its file
            with file_lock(os.path.join(cache_dir(), "clip-download.lock"), log):
                return clip.load(name)
        if name != "toy":
            return clip.load(name)
        toy.threads()
        path = toy_cache_path()
        model = toy.read_cache(path, log) if os.path.exists(path) else None
        if model is None:
            with file_lock(path + ".lock", log):
                model = toy.read_cache(path, lambda s: None) if os.path.exists(path) else None
                if model is None:
                    log(f"toy CLIP: no weights at {path}; pre-training them once (a few minutes on one CPU thread)")
                    model = toy.pretrain(log=log)
                    write_atomically(path, lambda f: torch.save(model.state_dict(), f), "wb")
        model.provenance = dict(source=f"toy CLIP {path}", activation="OpenAI's", normalisation="OpenAI's")
        log(f"clip: {clip.describe(model)}")
        return model

    if run.world > 1 and not run.is_main:
        dist.barrier()  # rank 0 first
    try:
        model = load()
    finally:
        if run.world > 1 and run.is_main:
            dist.barrier()
    return model.to(run.device).eval()


# ----------------------------------------------------------------------------- training: the flags' defaults

# The toy world's preset (--toy), shared by the seven scripts; each script's TOY adds its own (lr, max_steps, ...).
# The toy step size is half the toy eps; like the papers' step = eps, it follows --eps when only --eps is given.
TOY_WORLD = dict(model="toy", train_set=toy.TRAIN, eval_sets=",".join(toy.HELDOUT + [toy.TRAIN]),
                 epochs=1, batch_size=64, warmup_steps=20, eps=toy.EPS, step_size=toy.EPS,
                 attack_steps=2, workers=0, eval_baseline=True, eval_every=50, prompts=None, eval_eps=toy.EPS)
# Flags that change how a run runs or is evaluated, not what it trains: --resume may change them freely.
RUN_ONLY = {"typed", "resume", "allow_changed_flags", "out_dir", "data_root", "workers", "device", "dtype", "compile",
            "log_every", "save_every", "eval_every", "eval_baseline", "eval_sets", "eval_eps", "save_attention"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default (eps-like values as k/255); a number's range is in its help already
    (Parser adds a Range's)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "default" in text:
            return text
        value = action.default
        if action.type is parse_eps and isinstance(value, float):
            value = fmt_eps(value)
        elif isinstance(value, bool) or action.nargs == 0:
            value = "on" if value else "off"
        elif value is None:
            value = "none"
        return f"{text} (default: {str(value).replace('%', '%%')})"


def training_parser(doc):
    """The flags every training script shares, each with its range; their defaults come in parse_args."""
    p = Parser(doc, formatter_class=HelpFormatter)
    add = p.add_argument
    add("--toy", action="store_true", help="offline preset: toy CLIP, toy data and eps, a few minutes on a CPU "
                                           "(--toy --help shows its values); a flag given beside it wins")
    add("--model", help="CLIP name (see clip.available_models()), a checkpoint path, an open_clip or transformers "
                        "model folder, or 'toy'")
    add("--train-set", help="imagenet | tinyimagenet | cifar10 | cifar100 | imagefolder | toy")
    add("--data-root", help="folder holding the datasets (or the <class>/<images> tree for --train-set imagefolder)")
    add("--eval-sets", type=parse_names, help="comma-separated zero-shot evaluation sets for the evaluation "
                                                        "at the end")
    add("--prompts", choices=[c for c in prompts.PROMPTS if c not in prompts.ENSEMBLES],
        help="class names and prompt templates of the training and evaluation "
        "sets, as in the code of agft (AGFT), tga (TeCoA, PMG-AFT, TGA-ZSR, Comp-TGA) or saft (SAFT); the script's "
        "paper's, or none under --toy, whose world has its own")
    add("--eval-baseline", action=argparse.BooleanOptionalAction, help="also evaluate the pre-trained encoder")
    add("--eval-eps", type=parse_eps, help="L-inf radius of the evaluation at the end, whatever --eps trains at "
                                           "(every paper's protocol: 1/255; the toy world's: 16/255)")
    add("--epochs", type=POSITIVE, help="passes over the training set")
    add("--max-steps", type=POSITIVE, help="stop after this many steps instead (overrides --epochs)")
    add("--batch-size", type=POSITIVE, help="global batch size (split across processes under torchrun; "
                                                     "must divide by their number)")
    add("--lr", type=POSITIVE_REAL, help="peak learning rate")
    add("--optimizer", choices=["sgd", "adamw"], default="sgd", help="SGD with momentum 0.9, or AdamW")
    add("--weight-decay", type=NON_NEGATIVE, default=0.0, help="the optimizer's weight decay")
    add("--warmup-steps", type=COUNT, help="linear warm-up steps, then cosine decay to 0 at the last step")
    add("--eps", type=parse_eps, help="L-inf radius of the training attack, in [0, 1], e.g. 1/255")
    add("--step-size", type=parse_eps, help="training attack step size, in [0, 1]; left out, it follows "
                                                     "--eps (step = eps, as every paper trains)")
    add("--attack-steps", type=COUNT, help="training attack (PGD) steps")
    add("--out-dir", help="the folder of this run: checkpoint, log, arguments, curves, results (one run per folder)")
    add("--save-every", type=POSITIVE, default=1000, help="checkpoint every N steps (and at the end)")
    add("--log-every", type=POSITIVE, default=10, help="a progress line every N steps")
    add("--eval-every", type=COUNT, help="every N steps, zero-shot clean accuracy on 100 fixed images of each "
                                                  "eval set, for curve.png (0: off)")
    add("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    add("--allow-changed-flags", action="store_true", help="with --resume, continue although flags that change "
                                                           "training differ from the stored run's")
    add("--workers", type=COUNT, help="data-loading processes")
    add("--device", type=parse_device, default="auto", help="auto | cpu | cuda | cuda:N | mps")
    add("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA, fp32 on CPU")
    add("--compile", action="store_true", help="torch.compile the image encoder")
    add("--seed", type=SEED, default=0, help="seed of the data order and the attacks' random starts")
    return p


def default_workers():
    """Data-loading processes per training or evaluation process: up to 8, the CPUs shared by the processes here."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def parse_args(p, argv, method, paper, toy):
    """The flags of `p`, their defaults the paper's setting `paper` (with --toy: the toy world's preset and the
    script's `toy`); a flag given on the command line always wins over either. Rules between flags are checked here,
    each failure one line. `--help` prints the defaults that apply (`--toy --help`: the toy preset's)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--toy", action="store_true")
    toy_run = pre.parse_known_args(argv)[0].toy
    preset = {**paper, **TOY_WORLD, **toy} if toy_run else dict(paper, eval_sets=",".join(data.ZERO_SHOT_SETS),
                                                                eval_baseline=False, eval_every=0, workers=default_workers(),
                                                                eval_eps=1 / 255)
    preset["out_dir"] = os.path.join("runs", method + ("-toy" if toy_run else ""))
    actions = [a for a in p._actions if a.default is not argparse.SUPPRESS]  # all but --help
    p.set_defaults(**{k: v for k, v in preset.items() if k in {a.dest for a in actions}})
    unset = object()  # argparse leaves this in place of each flag not given
    args = p.parse_args(argv, namespace=argparse.Namespace(**{a.dest: unset for a in actions}))
    given = {a.dest for a in actions if getattr(args, a.dest) is not unset}
    for a in actions:
        if a.dest not in given:
            setattr(args, a.dest, a.default)
    args.typed = sorted(f"--{d.replace('_', '-')}" for d in given)  # what errors may name; not a training flag
    if "epochs" in given and "max_steps" not in given:
        args.max_steps = None  # an explicit --epochs wins over a preset's --max-steps
    if "step_size" not in given and "eps" in given:  # step = eps, as the papers train
        args.step_size = args.eps * preset["step_size"] / preset["eps"] if preset["eps"] else args.eps
    args.method = method
    if args.attack_steps and args.eps and not args.step_size:
        p.error(f"--step-size is 0 with --attack-steps {args.attack_steps}: the attack would not move; give a step "
                "> 0, or --attack-steps 0 for no attack")
    try:
        check_attack_flags(args.eps, args.step_size, args.attack_steps)
    except UsageError as e:
        p.error(str(e))
    check_out_dir(p, args.out_dir)
    if args.allow_changed_flags and not args.resume:
        p.error("--allow-changed-flags only applies with --resume")
    args.train_set = data.canonical_name(args.train_set) or args.train_set  # 'Toy', 'CIFAR10': as check_dataset reads
    args.eval_sets = ",".join(data.canonical_name(n.strip()) or n.strip() for n in args.eval_sets.split(","))
    own = data.unprompted([args.train_set, *args.eval_sets.split(",")])
    if "prompts" in given and own:
        raise no_effect(f"--prompts {args.prompts}", f"the training and evaluation sets ({', '.join(dict.fromkeys(own))})"
                        " have their own class names and template; drop --prompts")
    check_request(args)
    return args


def untyped(args, key, sep):
    """How an error says that the command line did not give a flag (args.typed): sep and whose value it is, else ''."""
    typed = getattr(args, "typed", None)
    if typed is None or f"--{key.replace('_', '-')}" in typed:
        return ""
    if key == "max_steps" and "--epochs" in typed:
        return f"{sep}not typed: the --epochs you typed replaces it"
    return f"{sep}not typed: the {'--toy preset' if args.toy else 'default'}'s"


def length_flag(args):
    """The flag that sets the run's length, with its value, for errors to name (saying so if it was not typed)."""
    key = "max_steps" if args.max_steps else "epochs"
    return f"--{key.replace('_', '-')} {getattr(args, key)}{untyped(args, key, ', ')}"


# ----------------------------------------------------------------------------- training: the run's output folder


def setup(args):
    """Processes, device, precision and seed, and the output folder (setup_run), which holds one run: a checkpoint
    there needs --resume, --resume refuses changed flags without --allow-changed-flags, then a lock keeps a second run
    out; args.json is written when the run begins (begin)."""
    accept(args)
    return setup_run(args)


def accept(args):
    """Refuse (one line, nothing written) a run that would overwrite another, or resume one with other flags."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not args.resume:
        if os.path.exists(path):
            raise UsageError(f"{path} exists: pass --resume to continue that run, or choose another --out-dir")
        return
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}; start without --resume")
    ckpt = peek(path)
    stored = ckpt.get("args", {})
    if stored.get("method", args.method) != args.method:
        raise UsageError(f"--resume: {path} was written by {stored['method']}, not {args.method}")
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (stored: {stored[k]}{untyped(args, k, '; ')})"
               for k in vars(args) if k in stored and k not in RUN_ONLY and stored[k] != getattr(args, k)]
    if changed and not args.allow_changed_flags:
        raise UsageError(f"--resume: flags differ from the run stored in {args.out_dir}: {', '.join(changed)}; pass "
                         "them as stored, or add --allow-changed-flags to continue with the new values")
    if not changed and ckpt.get("step", 0) >= ckpt.get("total", math.inf):
        raise UsageError(f"--resume: the run in {args.out_dir} is finished (step {ckpt['step']} of {ckpt['total']}): "
                         f"nothing to train at {length_flag(args)}; raise it, with --allow-changed-flags")


def peek(path):
    """The checkpoint at `path`, memory-mapped: its step and flags are read without reading the weights."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UsageError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}); start without --resume "
                         "in another --out-dir") from None


def lock_folder(out_dir):
    """Hold out_dir/lock (file_lock, with this process's id in it) while the run writes there: a second run is refused,
    naming the first's process id. Released by unlock_folder at the end of the run, and by the kernel when the process
    ends, however it ends."""
    key = os.path.abspath(out_dir)
    created = key  # the topmost folder this call creates, if any
    while not os.path.isdir(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.isdir(key) else created
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out-dir {out_dir}: cannot create it ({e.strerror})") from None
    path = os.path.join(out_dir, "lock")
    unlock_folder(out_dir)  # a run of this process that ended there without releasing it
    old = open(path, "rb").read() if os.path.isfile(path) else None
    lock = file_lock(path, wait=False)
    try:
        f = lock.__enter__()
    except BlockingIOError:
        with open(path) as f:
            pid = f.read().strip() or "?"
        raise UsageError(f"another run (pid {pid}) is writing to {out_dir}: wait for it to end, or choose another "
                         "--out-dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    HELD_LOCKS[key] = lock
    UNTOUCHED[key] = (created, old)


def unlock_folder(out_dir):
    lock = HELD_LOCKS.pop(os.path.abspath(out_dir), None)
    if lock is not None:
        lock.__exit__(None, None, None)


def give_back_folders():
    """A refused or interrupted run takes back what it made in the output folders it has not begun writing (begin):
    the lock file as it was (removed while still held, so no other run locks a file about to go), and the folders
    it created, if empty."""
    for key, (created, old) in list(UNTOUCHED.items()):
        with contextlib.suppress(OSError):
            path = os.path.join(key, "lock")
            if old is None:
                os.remove(path)
            else:
                with open(path, "wb") as f:
                    f.write(old)
        unlock_folder(key)
        folder = key
        while created and folder.startswith(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
            folder = os.path.dirname(folder)
    UNTOUCHED.clear()


HELD_LOCKS = {}  # out_dir -> its lock, held by this process
UNTOUCHED = {}  # out_dir -> (the topmost folder locking it created, the lock file's bytes before): not yet begun


@contextlib.contextmanager
def input_grad_only(module):
    """The training attack's scope: `module`'s parameters need no gradient (eager autograd skips their matmuls anyway,
    but a compiled backward computes every gradient it was traced with), restored afterwards. Under --compile the
    attack and the loss get one compiled graph each."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def ddp(module, run):
    """The module wrapped for data parallelism under torchrun (gradients all-reduced in backward). Under --compile it
    wraps the compiled module, the order torch's guide "Where to apply torch.compile?" gives; DDP runs it inside its
    forward, where dynamo splits the compiled graph at DDP's gradient buckets (its DDPOptimizer), so the all-reduce
    still overlaps the backward."""
    if run.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[run.device.index] if run.device.type == "cuda" else None)


# ----------------------------------------------------------------------------- training: learning rate, log, curves


def lr_at(step, total, warmup, lr):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def make_optimizer(params, args):
    """The paper's optimizer: SGD with momentum 0.9 (every script but FARE's), or AdamW with torch's betas."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


def set_lr(opt, step, total, args):
    lr = lr_at(step, total, args.warmup_steps, args.lr)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def fmt_terms(terms):
    return " ".join(f"{k} {float(v):.4f}" for k, v in terms.items())


PROBE_N = 100  # images per evaluation set in TrainLog's held-out accuracy curve


class TrainLog:
    """Progress lines (loss terms, lr, images/s, ETA) every --log-every steps, the NaN guard, and the curves.

    With --eval-every N, rank 0 also measures zero-shot clean accuracy on a fixed subset of PROBE_N images of each
    evaluation set at the start and every N steps, with the probe make_probe(model, args, run, PROBE_N) builds
    (evaluate.held_out_probe). close() writes curve.json and curve.png (loss, and that accuracy, over steps)."""

    def __init__(self, args, run, model, train_set, total, step, encoder, resumed=None, make_probe=None):
        """resumed: the curves stored in the checkpoint a run resumes from, kept up to its step; make_probe: see
        above, needed with --eval-every."""
        self.args, self.run, self.total, self.start, self.encoder = args, run, total, step, encoder
        begin(args, run)  # every check before training has passed
        resumed = resumed or {}
        self.history = [tuple(p) for p in resumed.get("step_loss", []) if p[0] <= step]
        self.accuracy = [tuple(p) for p in resumed.get("clean_accuracy", []) if p[0] < step]
        self.pending = []  # (step, loss, terms) on the device since the last check_finite
        self.t0 = time.time()
        run.log(f"{args.method}: {args.model} on {args.train_set} ({len(train_set)} images, {len(train_set.classnames)} "
                f"classes), steps {step}->{total} of {args.batch_size} images, eps {fmt_eps(args.eps)}, "
                f"{run.world} process(es) on {run.device}, {str(run.dtype).replace('torch.', '')}")
        self.probe = make_probe(model, args, run, PROBE_N) if getattr(args, "eval_every", 0) and run.is_main else None
        if self.probe:
            self.measure(step)

    def measure(self, step):
        acc = self.probe(self.encoder)
        self.accuracy.append((step, acc))
        self.run.log(f"step {step}: held-out clean accuracy (%, {PROBE_N} images each) " +
                     " ".join(f"{k} {v:.1f}" for k, v in acc.items()))

    def check_finite(self):
        """The losses since the last check, read from the device at once (the training step itself never waits for
        the device): stop (one line) if any process had a NaN/inf loss, naming its step. The updates after it are
        never saved: Checkpoint.save checks first, so the checkpoint kept is the last one before that step."""
        if not self.pending:
            return
        steps, losses, terms = zip(*self.pending)
        self.pending = []
        values = torch.stack([loss.float() for loss in losses]).tolist()
        bad = self.run.all_sum([float(not math.isfinite(v)) for v in values])
        if any(bad):
            i = next(i for i, b in enumerate(bad) if b)
            where = "" if not math.isfinite(values[i]) else " in another process"
            raise UsageError(f"loss is {'not finite' if where else values[i]} at step {steps[i] - 1}{where} "
                             f"({fmt_terms(terms[i])}); stopped, the last checkpoint in {self.args.out_dir} (saved "
                             "before that step) is kept; try a lower --lr")
        self.history += zip(steps, values)

    def curves(self):
        return {"step_loss": self.history, "eval_every": self.args.eval_every, "clean_accuracy": self.accuracy}

    def step(self, step, loss, terms, lr):
        """After `step` steps: the loss stays on the device until a log or held-out step (check_finite)."""
        self.pending.append((step, loss.detach(), {k: torch.as_tensor(v).detach() for k, v in terms.items()}))
        probe = self.probe and (step % self.args.eval_every == 0 or step == self.total)
        if step % self.args.log_every and step != self.total and not probe:
            return
        self.check_finite()
        if probe:
            self.measure(step)
        if step % self.args.log_every and step != self.total:
            return
        rate = (step - self.start) * self.args.batch_size / (time.time() - self.t0)
        self.run.log(f"step {step}/{self.total} | loss {self.history[-1][1]:.4f} ({fmt_terms(terms)}) | lr {lr:.2e} | "
                     f"{rate:.1f} img/s | ETA {fmt_time((self.total - step) * self.args.batch_size / rate)}")

    def close(self):
        if not (self.run.is_main and self.run.out_dir):
            return
        with open(os.path.join(self.run.out_dir, "curve.json"), "w") as f:
            json.dump(self.curves(), f)
        names = list(self.accuracy[0][1]) if self.accuracy else []
        acc = {n: [(s, a[n]) for s, a in self.accuracy] for n in names}
        if len(names) > 1:
            acc["mean"] = [(s, sum(a.values()) / len(a)) for s, a in self.accuracy]
        panels = [(f"{self.args.method}: training loss", {"loss": self.history})]
        if acc:
            panels.append((f"held-out zero-shot clean accuracy (%), {PROBE_N} images each", acc))
        path = os.path.join(self.run.out_dir, "curve.png")
        pictures.plot_curves(path, panels)
        self.run.log(f"wrote {path}")


# ----------------------------------------------------------------------------- training: checkpoints


def save_checkpoint(path, obj):
    """torch.save, atomically (write_atomically): a crash mid-write leaves the previous checkpoint."""
    write_atomically(path, lambda f: torch.save(obj, f), "wb")


class Checkpoint:
    """--out-dir/ckpt.pt: image encoder, optimizer, loss scaler, step and curves, written atomically by rank 0."""

    def __init__(self, args, run, model, opt, scaler):
        self.path, self.args, self.run, self.model, self.opt, self.scaler = (
            os.path.join(args.out_dir, "ckpt.pt"), args, run, model, opt, scaler)
        self.curves = None

    def resume(self, total):
        """The step to start from: 0, or with --resume the checkpoint's (setup has accepted it), whose weights,
        optimizer, loss scaler and curves are restored. A run with no step left to train is refused."""
        if not self.args.resume:
            return 0
        at = peek(self.path)["step"]
        if at >= total:
            raise UsageError(f"{self.path} is at step {at} and this run ends at step {total} "
                             f"({length_flag(self.args)}): nothing to train; raise it")
        ckpt = clip.load_visual(self.model, self.path, self.args.model)
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.curves = ckpt.get("curves")
        self.run.log(f"resuming {self.path} at step {ckpt['step']}")
        return ckpt["step"]

    def save(self, step, log):
        """Checkpoint after `step` steps, refusing (one line) a NaN/inf loss since the last check (log.check_finite)
        and an encoder that computes no finite features (clip.encoder_fault): the one kept is good."""
        log.check_finite()
        fault = clip.encoder_fault(self.model.visual)
        if fault:
            raise UsageError(f"the weights after step {step} {fault}; stopped, the last checkpoint in "
                             f"{self.args.out_dir} is kept; try a lower --lr")
        if self.run.is_main:
            save_checkpoint(self.path, {"visual": self.model.visual.state_dict(), "optimizer": self.opt.state_dict(),
                                        "scaler": self.scaler.state_dict(), "step": step, "total": log.total,
                                        "model": self.args.model, "method": self.args.method, "args": vars(self.args),
                                        "curves": log.curves()})
