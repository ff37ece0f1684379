"""Speed of one training step of each method, and of PGD-20 evaluation, on synthetic data (random weights).

    python bench.py --device cpu --model toy
    python bench.py --device cpu --model ViT-B/32 --batch-size 8
    python bench.py --model ViT-B/32 --batch-size 256                    # CUDA, bf16 autocast
    python bench.py --model ViT-B/32 --batch-size 256 --compile --method agft

Each step is exactly the loop body of the training scripts (targets, attack, loss, backward, optimizer step). Warm-up
steps are not timed. Passes count image-encoder passes over the batch (fine-tuned and frozen): the training
attack's, and all others (per-batch targets and the loss), which the AGFT paper's Table 10 counts.
"""
import importlib
import math
import os
import resource
import time
import warnings
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import attacks
import clip
import harness
import toy

METHODS = ["tecoa", "pmg_aft", "tga_zsr", "comp_tga", "saft", "agft", "fare"]
# OpenAI's architectures (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
# context_length, vocab_size, transformer_width, transformer_heads, transformer_layers), built with random weights
CONFIGS = {
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
}
BF16_PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10": 125, "4090": 165}  # dense


class PassCounter:
    """Counts passes of image encoders over a batch: a call on 2B images (two inputs fused) counts as 2."""

    def __init__(self, batch_size, *visuals):
        self.batch_size, self.forward, self.backward = batch_size, 0, 0
        for visual in visuals:
            visual.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        passes = output.shape[0] / self.batch_size
        self.forward += passes
        if output.requires_grad:
            output.register_hook(lambda grad: self.count_backward(passes))

    def count_backward(self, passes):
        self.backward += passes

    def take(self):
        counts = (self.forward, self.backward)
        self.forward = self.backward = 0
        return counts


class FlopCount(TorchDispatchMode):
    """Matrix-multiply and convolution FLOPs of every op run inside it (torch's own per-op formulas).

    torch's FlopCounterMode tracks modules with hooks that torch.autograd.grad (used by the attacks) rejects.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        count = flop_registry.get(func._overloadpacket)
        if count:
            self.total += count(*args, **(kwargs or {}), out_val=out)
        return out


def build(name, device):
    if name == "toy":
        return clip.CLIP(**toy.CONFIG).to(device).eval()
    if name not in CONFIGS:
        raise harness.UsageError(f"unknown --model {name} (known: toy, {', '.join(CONFIGS)})")
    return clip.CLIP(*CONFIGS[name]).to(device).eval()


def sync(device):
    """Wait for the device's queued work, then the time: every timer starts and stops on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def peak_tflops(device):
    if device.type != "cuda":
        return None
    gpu = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu), None)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (KiB -> GiB)


def bench_method(method, args, run):
    mod = importlib.import_module(method)
    margs = mod.get_args((["--toy"] if args.model == "toy" else []) + ["--batch-size", str(args.batch_size)])
    margs.train_set = "synthetic"  # random images of made-up classes (so SAFT uses its template heads, writes nothing)
    model = build(args.model, run.device)
    encoder = clip.ImageEncoder(model.visual).to(run.device)
    train_set = SimpleNamespace(classnames=[f"class {i}" for i in range(args.classes)], template="a photo of a {}.")
    m = mod.setup_method(model, train_set, encoder, margs, run)
    counter = PassCounter(args.batch_size, model.visual, *([m.f0.visual] if hasattr(m, "f0") else []))
    f = torch.compile(encoder) if args.compile else encoder
    opt = harness.make_optimizer(encoder.parameters(), margs)  # the script's own: SGD, or AdamW for FARE
    r = model.visual.input_resolution
    x = torch.rand(args.batch_size, 3, r, r, device=run.device)
    y = torch.randint(args.classes, (args.batch_size,), device=run.device)

    attack_seconds = []

    def step():  # the training scripts' loop body
        encoder.eval()
        with torch.no_grad(), run.autocast():
            t = mod.training_targets(x, y, m, margs)
        target_passes = counter.take()
        t0 = sync(run.device)
        with run.attack_autocast(), harness.input_grad_only(encoder):
            x_adv = mod.train_attack(f, x, t, m, margs)
        attack_seconds.append(sync(run.device) - t0)
        attack_passes = counter.take()
        encoder.train()
        with run.autocast():
            loss, _ = mod.loss_fn(f, x, x_adv, t, m, margs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_passes = counter.take()
        return attack_passes, (target_passes[0] + loss_passes[0], target_passes[1] + loss_passes[1])

    for _ in range(args.warmup):
        step()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    del attack_seconds[:]
    t0 = sync(run.device)
    for _ in range(args.steps):
        attack_passes, passes = step()
    ms = 1000 * (sync(run.device) - t0) / args.steps
    attack_ms = 1000 * sum(attack_seconds) / len(attack_seconds)
    with FlopCount() as flops:
        step()
    tflops = flops.total / 1e12 / (ms / 1000)
    return {"method": method, "ms/step": ms, "attack ms": attack_ms, "img/s": args.batch_size / (ms / 1000), "peak GiB": peak_memory_gib(run.device),
            "fwd/bwd after attack": f"{passes[0]:g}/{passes[1]:g}", "attack fwd/bwd": f"{attack_passes[0]:g}/{attack_passes[1]:g}",
            "TFLOP/s": tflops}


def bench_eval(args, run):
    """PGD-20 (step 1/255) evaluation throughput on one batch."""
    model = build(args.model, run.device)
    text = torch.nn.functional.normalize(torch.randn(args.classes, model.text_projection.shape[1], device=run.device), dim=-1)
    classifier = clip.ZeroShotClassifier(clip.ImageEncoder(model.visual).to(run.device), text)
    r = model.visual.input_resolution
    x = torch.rand(args.batch_size, 3, r, r, device=run.device)
    y = torch.randint(args.classes, (args.batch_size,), device=run.device)
    attacks.pgd(classifier, x, y, 1 / 255, 1 / 255, 2)  # warm-up; fp32, as evaluate.py attacks
    t0 = sync(run.device)
    attacks.pgd(classifier, x, y, 1 / 255, 1 / 255, 20)
    return args.batch_size / (sync(run.device) - t0)


def attack_dtypes(name="ViT-B/32", n=64, eps=(1 / 255,), steps=10, seeds=(0, 1), classes=100, batch=32):
    """Robust accuracy (%) under PGD-`steps` (step eps/4) run in fp32 and under CPU bf16 autocast, on a random-weight
    model: n uniform-noise images, a random text head of `classes` classes, labels the fp32 model's own clean
    predictions (clean accuracy 100% by construction); the adversarial images are judged by the fp32 model.
    Returns {(eps, seed, dtype): robust %}."""
    torch.manual_seed(0)
    model = build(name, torch.device("cpu"))
    text = torch.nn.functional.normalize(torch.randn(classes, model.text_projection.shape[1]), dim=-1)
    classifier = clip.ZeroShotClassifier(clip.ImageEncoder(model.visual), text)
    r = model.visual.input_resolution
    x = torch.rand(n, 3, r, r, generator=torch.Generator().manual_seed(0))
    parts = [slice(i, i + batch) for i in range(0, n, batch)]
    y = torch.cat([attacks.predict(classifier, x[p]).argmax(1) for p in parts])
    out = {}
    for e in eps:
        for seed in seeds:
            for dtype in ("fp32", "bf16"):
                torch.manual_seed(seed)
                robust = 0
                for p in parts:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                        x_adv = attacks.pgd(classifier, x[p], y[p], e, e / 4, steps)
                    robust += (attacks.predict(classifier, x_adv).argmax(1) == y[p]).sum().item()
                out[(e, seed, dtype)] = 100 * robust / n
    return out


def square_compaction(every=(1, 10, 50, 300), queries=300, eps=16 / 255, n=64, tasks=("toy_size", "toy_colour"),
                      seeds=(0, 1, 2)):
    """Square (`queries` queries) on n images of each toy task with the pre-trained toy CLIP, the batch cut to the
    points still correct every k queries for k in `every`: per task and k, the best time over the seeds (run
    interleaved) and the robust accuracy (%) per seed. Returns {(task, k): (seconds, [robust %])}."""
    import evaluate
    run = harness.Run(torch.device("cpu"), torch.float32)
    model = harness.load_model("toy", run)
    out = {}
    for task in tasks:
        ds = toy.dataset(task, n, 0)
        x, y = ds.tensors[0].float() / 255, ds.tensors[1]
        classifier = clip.ZeroShotClassifier(clip.ImageEncoder(model.visual), evaluate.text_head(model, ds))
        times, robust = {k: math.inf for k in every}, {k: [] for k in every}
        for seed in seeds:
            for k in every:
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                x_adv = attacks.square(classifier, x, y, eps, queries, compact_every=k)
                times[k] = min(times[k], time.perf_counter() - t0)
                robust[k].append(100 * (attacks.predict(classifier, x_adv).argmax(1) == y).float().mean().item())
        out.update({(task, k): (times[k], robust[k]) for k in every})
    return out


def bench_pipeline(resolution, n=64, size=(500, 375), repeats=3):
    """Images/s of one data-loading worker: decode a size[0] x size[1] JPEG (ImageNet's typical size), bicubic resize,
    centre crop, to a tensor; the uint8 path the loaders use (data.image_transform), the float ToTensor one, and two
    other decoders before the same uint8 transform: PIL's draft mode (libjpeg's DCT scaling to the largest 1/2^k
    scale with both sides still >= resolution) and torchvision.io.decode_jpeg on the CPU. "<decoder> max diff" is
    the largest |pixel difference| over the n images against the loaders' uint8 output."""
    import tempfile

    import numpy as np
    from PIL import Image
    from torchvision import io
    from torchvision import transforms as T

    import data
    rng = np.random.default_rng(0)
    uint8 = data.image_transform(resolution)
    as_float = T.Compose([*uint8.transforms[:-1], T.ToTensor()])

    def draft(path):
        with Image.open(path) as img:
            img.draft("RGB", (resolution, resolution))
            return data.to_rgb(img)

    def torchvision_decode(path):
        pixels = io.decode_jpeg(io.read_file(path), mode=io.ImageReadMode.RGB)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())

    decoders = {"float": (data.load_image, as_float), "uint8": (data.load_image, uint8), "draft": (draft, uint8),
                "torchvision": (torchvision_decode, uint8)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):  # smooth noise: JPEG-compresses like a photo, not like white noise
            small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            path = os.path.join(tmp, f"{i}.jpg")
            Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=90)
            paths.append(path)
        rates = dict.fromkeys(decoders, 0.0)
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)  # torchvision >= 0.29 on its io
        for _ in range(repeats):  # interleaved, the best of `repeats`: fair on a machine shared with other work
            for name, (load, tf) in decoders.items():
                tf(load(paths[0]))
                t0 = time.perf_counter()
                for path in paths:
                    tf(load(path))
                rates[name] = max(rates[name], n / (time.perf_counter() - t0))
        reference = [uint8(data.load_image(path)) for path in paths]
        for name in ("draft", "torchvision"):
            load, tf = decoders[name]
            rates[f"{name} max diff"] = max((tf(load(p)).int() - ref.int()).abs().max().item()
                                            for p, ref in zip(paths, reference))
    return rates


def parser():
    """bench.py's flags; every number has a range, checked (one line) when parsed."""
    p = harness.Parser(__doc__)
    p.add_argument("--model", default="ViT-B/32", choices=["toy", *CONFIGS], help=f"toy | {' | '.join(CONFIGS)}")
    p.add_argument("--method", choices=METHODS, help="one method (default: all seven)")
    p.add_argument("--batch-size", type=harness.POSITIVE, default=128)
    p.add_argument("--classes", type=harness.Range(int, 2), default=100, help="classes of the synthetic training set")
    p.add_argument("--steps", type=harness.POSITIVE, default=5, help="timed steps")
    p.add_argument("--warmup", type=harness.COUNT, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", type=harness.parse_device, help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    args.seed, args.out_dir = 0, None
    run = harness.setup_run(args)
    peak = peak_tflops(run.device)
    rows = [bench_method(mth, args, run) for mth in ([args.method] if args.method else METHODS)]
    print(f"\n{args.model}, batch {args.batch_size}, {run.device} ({torch.cuda.get_device_name(run.device) if run.device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{str(run.dtype).replace('torch.', '')}{', compiled' if args.compile else ''}; training attack PGD-2")
    cols = ["method", "ms/step", "attack ms", "img/s", "peak GiB", "attack fwd/bwd", "fwd/bwd after attack", "TFLOP/s"]
    print("| " + " | ".join(cols) + (" | % of bf16 peak |" if peak else " |"))
    print("|" + "---|" * (len(cols) + bool(peak)))
    for r in rows:
        cells = [r["method"], f"{r['ms/step']:.1f}", f"{r['attack ms']:.1f}", f"{r['img/s']:.1f}", f"{r['peak GiB']:.2f}", r["attack fwd/bwd"],
                 r["fwd/bwd after attack"], f"{r['TFLOP/s']:.2f}"] + ([f"{100 * r['TFLOP/s'] / peak:.1f}"] if peak else [])
        print("| " + " | ".join(cells) + " |")
    print(f"\nPGD-20 evaluation: {bench_eval(args, run):.1f} img/s")
    r = build(args.model, "cpu").visual.input_resolution
    rates = bench_pipeline(r)
    fastest = max(row["img/s"] for row in rows)
    print(f"input pipeline, one worker (one process, {torch.get_num_threads()} threads), 500x375 JPEG -> {r}x{r}: "
          f"{rates['uint8']:.0f} img/s as uint8 (the loaders'), {rates['float']:.0f} img/s as float; the fastest step "
          f"above ({fastest:.1f} img/s) needs {math.ceil(fastest / rates['uint8'])} worker(s) per process")
    print(f"other decoders before the same resize: PIL draft mode {rates['draft']:.0f} img/s (max |pixel diff| "
          f"{rates['draft max diff']}), torchvision.io.decode_jpeg on the CPU {rates['torchvision']:.0f} img/s (max |pixel "
          f"diff| {rates['torchvision max diff']})")


if __name__ == "__main__":
    harness.cli(main)
