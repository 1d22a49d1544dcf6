"""Speed benchmark: explain and training throughput, against their floor and a naive MONAI loop.

    python benchmarks/speed.py                 # 64x64 (whole volume) and 128x128 (32 slices)
    python benchmarks/speed.py --sizes 64 --quick

Prints, for a fixed model (the UNet and classifier of configs/brats64.yaml, one channel, weights
randomised so no output is trivially zero) and a synthetic 155-slice head volume:

- explain slices/s for the whole volume (`explain_scan`: preprocessing, encode, guided decode,
  p(healthy), mapping back), L = 500 with strided steps (K = 50) and full steps (K = L, on a
  subset of slices: it is 10x the work);
- the floor: the number of UNet and classifier evaluations times their measured cost at the
  same batch sizes, and wall time / floor;
- a naive reference written here as MONAI's classifier-guidance tutorial does it (one slice at
  a time, `DDIMScheduler.reversed_step` to encode and `step` with the guidance term to decode),
  at the same timesteps, on a few slices; the speed-up of adiff over it and the largest
  difference between their outputs (MONAI's scheduler ends at alpha_bar_0 instead of the clean
  level 1, which is the only intended difference);
- training images/s of adiff's DDPM loop in fp32 and in the mixed precision this machine does
  natively (bf16 on CPUs with AMX or AVX512-BF16), at 1 and 2 threads, against a plain MONAI loop
  (DDPMScheduler.add_noise, MSE, AdamW) on the same UNet and batch;
- the demo's phases (`adiff demo`, its own config): dataset build, seconds per DDPM and classifier
  step (timed over `--demo-steps` steps), the rest of training, explaining its two held-out
  subjects, and the full demo's projected time, in fp32 and in mixed precision;
- peak memory of each measurement: each runs in its own process (peak RSS on CPU, peak CUDA
  memory on a GPU).
Nothing here is a test: numbers vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _bundle(size: int, method: str = "classifier") -> Any:
    """The fixed model: brats64's networks, 1 channel, at `size`, with randomised output layers.

    `method="classifier_free"`: the same UNet, label-conditional (configs/brats64_cfg.yaml), no classifier.
    """
    from pathlib import Path

    from anomaly_diffusion.config import config_from_dict, load_config
    from anomaly_diffusion.diffusion.schedule import make_schedule
    from anomaly_diffusion.models.bundle import ModelBundle
    from anomaly_diffusion.models.networks import build_classifier, build_unet

    root = Path(__file__).resolve().parent.parent
    base = load_config(root / "configs" / "brats64.yaml").model_dump(mode="json")
    base["data"]["image_channels"] = 1
    base["data"]["image_size"] = size
    conditional = method == "classifier_free"
    if conditional:
        base["method"] = method
        base["explain"].update(guidance="cfg", scale=CFG_W)
    cfg = config_from_dict(base)
    torch.manual_seed(0)
    unet = build_unet(cfg.unet, 1, conditional=conditional)
    out = unet.unet.out if conditional else unet.out
    for parameter in out.parameters():  # MONAI zero-initialises it: eps = 0 would make DDIM trivial
        torch.nn.init.normal_(parameter, std=0.05)
    classifier = None if conditional else build_classifier(cfg.classifier, 1)
    device = _device()
    for module in (unet, classifier):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    schedule = make_schedule(cfg.schedule.kind, cfg.schedule.num_timesteps)
    return ModelBundle(cfg, schedule, unet, classifier, "bench", None, {})


def _head_scan(slices: int = 155) -> Any:
    """A synthetic 240x240xN head (ellipsoid brain with texture, zero background) as a `Scan`."""
    from pathlib import Path

    from anomaly_diffusion.data.io import Scan

    rng = np.random.default_rng(0)
    shape = (240, 240, slices)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (grid[0] ** 2 / 0.6 + grid[1] ** 2 / 0.75 + grid[2] ** 2 / 0.9) < 1
    data = np.where(brain, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)[None]
    return Scan(data, np.eye(4), shape, None, (Path("synthetic.nii.gz"),))


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _settings(bundle: Any, noise_level: int, scale: float, steps: int | None, batch_size: int, amp: bool) -> Any:
    """Explain settings of the benchmark's method, with mixed precision on or off."""
    from dataclasses import replace

    from anomaly_diffusion.counterfactual.settings import explain_settings

    settings = explain_settings(
        bundle, noise_level=noise_level, steps=steps, steps_given=True, scale=scale, batch_size=batch_size
    )
    return replace(settings, amp=amp)


CFG_W = 3.0  # the classifier-free rows' guidance weight w (any w other than 0 and 1 costs the same)


def measure_explain(
    size: int,
    steps: int | None,
    max_slices: int | None,
    batch_size: int,
    amp: bool,
    threads: int | None = None,
    method: str = "classifier",
) -> dict[str, Any]:
    """Explain the synthetic volume (or its first max_slices kept slices); wall time vs floor.

    Classifier guidance (s = 100) or, with `method="classifier_free"`, classifier-free guidance
    (w = CFG_W: the conditional and null passes of each step batched into one UNet forward of 2B).
    """
    from anomaly_diffusion.counterfactual.denoisers import denoiser, guided_denoiser
    from anomaly_diffusion.counterfactual.scan import explain_slices
    from anomaly_diffusion.counterfactual.slices import p_healthy
    from anomaly_diffusion.runtime import precision_name, prepare_for_inference, set_threads
    from anomaly_diffusion.scans import assemble_scan, prepare_scan

    set_threads(threads)
    bundle = prepare_for_inference(_bundle(size, method))
    conditional = method == "classifier_free"
    scale = CFG_W if conditional else 100.0
    scan = _head_scan()
    noise_level = 500
    k = steps or noise_level
    device = _device()
    started = time.perf_counter()
    prepared = prepare_scan(bundle.config.data, scan)
    x = prepared.x if max_slices is None else prepared.x[:max_slices]
    result = explain_slices(bundle, x, _settings(bundle, noise_level, scale, steps, batch_size, amp))
    if max_slices is None:
        assemble_scan(scan, prepared, result)
    _sync()
    wall = time.perf_counter() - started
    # the floor: the network evaluations this run needs, at its batch sizes, precision and memory format
    unet = denoiser(bundle, amp)
    guided = guided_denoiser(bundle, 100.0, amp, "slice") if not conditional else None
    sizes = [min(batch_size, len(x) - s) for s in range(0, len(x), batch_size)]
    floor = 0.0
    for b in sorted(set(sizes)):
        xb = torch.randn(b, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
        tb = torch.full((b,), 250, device=device, dtype=torch.long)

        def unet_eval(xb: torch.Tensor = xb, tb: torch.Tensor = tb) -> None:
            with torch.inference_mode():
                unet(xb, tb)

        def guided_eval(xb: torch.Tensor = xb, tb: torch.Tensor = tb) -> None:
            if guided is None:  # classifier-free: one UNet forward of the stacked conditional + null batch
                with torch.inference_mode():
                    unet(torch.cat([xb, xb]), torch.cat([tb, tb]))
                return
            with torch.no_grad():
                guided(xb, tb)

        def classify(xb: torch.Tensor = xb) -> None:
            p_healthy(bundle, xb)

        classify_s = 0.0 if conditional else 2 * _median_time(classify, 3)
        cost = k * _median_time(unet_eval, 3) + k * _median_time(guided_eval, 3) + classify_s
        floor += cost * sizes.count(b)
    return {
        "size": size,
        "steps": k,
        "method": "classifier-free, w=3" if conditional else "classifier, s=100",
        "precision": precision_name(device, amp),
        "slices": len(x),
        "volume_slices": scan.data.shape[-1],
        "wall_s": wall,
        "slices_per_s": len(x) / wall,
        "floor_s": floor,
        "ratio": wall / floor,
        "peak_mb": _peak_memory_mb(),
    }


def measure_naive(size: int, steps: int | None, n_slices: int, batch_size: int) -> dict[str, Any]:
    """MONAI-tutorial loop, one slice at a time, against adiff on the same slices and timesteps."""
    from monai.networks.schedulers import DDIMScheduler

    from anomaly_diffusion.counterfactual.scan import explain_slices
    from anomaly_diffusion.labels import HEALTHY
    from anomaly_diffusion.runtime import precision_name, prepare_for_inference
    from anomaly_diffusion.scans import prepare_scan

    bundle = _bundle(size)
    prepared = prepare_scan(bundle.config.data, _head_scan())
    middle = len(prepared.x) // 2
    # adiff explains one full batch around the middle; the naive loop the first n_slices of it
    batch = prepared.x[max(middle - batch_size // 2, 0) :][:batch_size]
    x = batch[:n_slices]
    noise_level, scale = 500, 100.0
    k = steps or noise_level
    stride = noise_level // k
    scheduler = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    scheduler.set_timesteps(1000 // stride)
    unet, classifier = bundle.unet, bundle.classifier
    device = _device()
    started = time.perf_counter()
    outputs = []
    for i in range(len(x)):
        current = x[i : i + 1].to(device)
        for t in range(0, noise_level, stride):  # encode: level t -> t + stride
            with torch.no_grad():
                eps = unet(current, torch.tensor([t], device=device))
            current, _ = scheduler.reversed_step(eps, t, current)
        for t in range(noise_level, 0, -stride):  # decode with guidance: t -> t - stride
            with torch.no_grad():
                eps = unet(current, torch.tensor([t], device=device))
            with torch.enable_grad():
                x_in = current.detach().requires_grad_(True)
                log_p = torch.log_softmax(classifier(x_in, torch.tensor([t], device=device)), dim=-1)[:, HEALTHY]
                grad = torch.autograd.grad(log_p.sum(), x_in)[0]
            alpha_bar = scheduler.alphas_cumprod[t].to(device)
            current, _ = scheduler.step(eps - scale * (1 - alpha_bar).sqrt() * grad, t, current)
        outputs.append(current.detach().cpu())
    _sync()
    naive_wall = time.perf_counter() - started
    naive = torch.cat(outputs)
    bundle = prepare_for_inference(bundle)  # after the naive loop, which keeps MONAI's defaults
    result: dict[str, Any] = {
        "size": size,
        "steps": k,
        "slices": len(x),
        "naive_s_per_slice": naive_wall / len(x),
    }
    for amp in (False, True):
        started = time.perf_counter()
        settings = _settings(bundle, noise_level, scale, steps, batch_size, amp)
        ours = explain_slices(bundle, batch, settings).x_healthy[:n_slices]
        _sync()
        per_slice = (time.perf_counter() - started) / len(batch)
        result[f"precision_{amp}"] = precision_name(device, amp)
        result[f"adiff_s_per_slice_{amp}"] = per_slice
        result[f"speedup_{amp}"] = result["naive_s_per_slice"] / per_slice
        result[f"max_abs_diff_{amp}"] = float((naive - ours).abs().max())
    result["peak_mb"] = _peak_memory_mb()
    return result


def measure_training(
    size: int, batch_size: int, n_steps: int, plain: bool, amp: bool = False, threads: int | None = None
) -> dict[str, Any]:
    """Images/s of adiff's DDPM training step (in the precision `amp` gives on this machine), or of a plain
    MONAI loop (fp32) on the same UNet, with `threads` torch threads."""
    from anomaly_diffusion.runtime import precision_name, set_threads

    set_threads(threads)
    import torch.nn.functional as F
    from monai.networks.schedulers import DDPMScheduler

    from anomaly_diffusion.config import config_from_dict
    from anomaly_diffusion.data.datasets import SliceDataset
    from anomaly_diffusion.training.loops import ddpm_phase, train_ddpm

    bundle = _bundle(size)
    device = _device()
    images = torch.randn(512, 1, size, size)
    data = SliceDataset(
        images,
        torch.zeros(512, dtype=torch.long),
        torch.zeros(512, size, size, dtype=torch.bool),
        np.array(["s"] * 512),
    )
    base = bundle.config.model_dump(mode="json")
    base["train"]["batch_size"] = batch_size
    base["train"]["amp"] = amp
    warm = config_from_dict(base, ["train.ddpm_steps=3", "train.log_every=1000"])
    timed = config_from_dict(base, [f"train.ddpm_steps={3 + n_steps}", "train.log_every=1000"])
    phase = ddpm_phase(warm, device)
    unet, optimiser = phase.model, phase.optimiser
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta")

    def adiff_run(cfg: Any) -> None:
        train_ddpm(cfg, bundle.schedule, data, device, phase)  # the real loop: AdamW, clipping, EMA, AMP on CUDA

    def plain_step() -> None:
        x_0 = images[torch.randint(0, len(images), (batch_size,))].to(device)
        noise = torch.randn_like(x_0)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        loss = F.mse_loss(unet(scheduler.add_noise(x_0, noise, t), t), noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    unet.train()
    if plain:
        for _ in range(3):
            plain_step()
    else:
        adiff_run(warm)
    _sync()
    started = time.perf_counter()
    if plain:
        for _ in range(n_steps):
            plain_step()
    else:
        adiff_run(timed)
    _sync()
    wall = time.perf_counter() - started
    return {
        "size": size,
        "loop": "plain MONAI" if plain else "adiff",
        "precision": "float32" if plain else precision_name(device, amp),
        "threads": torch.get_num_threads(),
        "img_per_s": n_steps * batch_size / wall,
        "peak_mb": _peak_memory_mb(),
    }


def measure_demo(amp: bool, threads: int | None, steps: int, work: str) -> dict[str, Any]:
    """The demo's phases with its own config (`adiff demo`), each DDPM/classifier phase cut to `steps`
    steps, timed; the full demo's time is projected from the seconds per step."""
    from pathlib import Path

    from anomaly_diffusion.data.synthetic import build_demo_dataset
    from anomaly_diffusion.runtime import choose_precision, set_threads
    from anomaly_diffusion.usecases.demo import DEMO_LESION_KINDS, demo_config, held_out_cases
    from anomaly_diffusion.usecases.explain import ExplainRequest, run_explain
    from anomaly_diffusion.usecases.train import run_train

    set_threads(threads)
    root = Path(work) / f"demo-{'bf16' if amp else 'fp32'}-{torch.get_num_threads()}"
    started = time.perf_counter()
    manifest = build_demo_dataset(root / "data", lesion_kinds=DEMO_LESION_KINDS)
    build_s = time.perf_counter() - started
    full = demo_config(manifest, root / "runs")
    overrides = [f"train.ddpm_steps={steps}", f"train.classifier_steps={steps}", f"train.amp={str(amp).lower()}"]
    overrides += [f"train.checkpoint_every={10 * steps}"]  # no snapshot figures inside the timed steps
    cfg = demo_config(manifest, root / "runs", overrides)
    marks: dict[str, list[float]] = {}

    def progress(phase: str, step: int, total: int, metrics: dict[str, float]) -> None:
        marks.setdefault(phase, []).append(time.perf_counter())

    uri = f"sqlite:///{root / 'mlruns.db'}"
    train_started = time.perf_counter()
    trained = run_train(cfg, uri, None, "demo-speed", progress)
    train_s = time.perf_counter() - train_started
    # seconds per step from the second step on (the first carries one-off set-up)
    per_step = {p: (t[-1] - t[0]) / max(len(t) - 1, 1) for p, t in marks.items()}
    explain_s = []
    for _, row in held_out_cases(manifest):
        request = ExplainRequest(
            scans=list(row.images),
            out_dir=root / "explain",
            tracking_uri=uri,
            model=trained.result.bundle_path,
            mask=row.mask,
            overwrite=True,
        )
        explain_s.append(run_explain(request).seconds)
    other_s = train_s - sum(per_step[p] * steps for p in per_step)  # data loading, snapshots, bundle, MLflow
    projected = (
        build_s
        + per_step["ddpm"] * full.train.ddpm_steps
        + per_step["classifier"] * full.train.classifier_steps
        + other_s
        + sum(explain_s)
    )
    return {
        "precision": str(choose_precision(torch.device("cpu"), amp)),
        "threads": torch.get_num_threads(),
        "build_s": build_s,
        "ddpm_s_per_step": per_step["ddpm"],
        "ddpm_steps": full.train.ddpm_steps,
        "classifier_s_per_step": per_step["classifier"],
        "classifier_steps": full.train.classifier_steps,
        "other_train_s": other_s,
        "explain_s": sum(explain_s),
        "explained": len(explain_s),
        "projected_s": projected,
    }


def _isolated(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one measurement in a fresh process, so its peak memory is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--strided-steps", type=int, default=50)
    parser.add_argument("--full-slices", type=int, default=16, help="Slices explained with full steps (K = L).")
    parser.add_argument("--large-slices", type=int, default=32, help="Slices explained at the larger sizes.")
    parser.add_argument("--naive-slices", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="Skip the full-step and the larger-size explain runs.")
    parser.add_argument("--demo-steps", type=int, default=20, help="Steps per timed demo phase (0 = skip the demo).")
    parser.add_argument("--work", default="adiff_bench_speed", help="Folder for the demo phases' data and runs.")
    parser.add_argument("--explain-only", action="store_true", help="Only the explain table (both guidance methods).")
    args = parser.parse_args()
    memory = "peak CUDA MB" if torch.cuda.is_available() else "peak RSS MB"
    print(f"device: {_device()}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    print(
        f"\n| explain (L=500) | guidance | size | K | precision | slices | wall s | slices/s | floor s | wall/floor "
        f"| {memory} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    volume: dict[str, Any] = {}
    for index, size in enumerate(sizes):
        if index == 0:
            runs: list[tuple[str, int | None, int | None, bool, str]] = [
                ("whole volume", args.strided_steps, None, True, "classifier"),
                ("whole volume", args.strided_steps, None, False, "classifier"),
                ("whole volume", args.strided_steps, None, True, "classifier_free"),
                ("whole volume", args.strided_steps, None, False, "classifier_free"),
            ]
            if not args.quick:
                runs.append((f"first {args.full_slices} slices", None, args.full_slices, True, "classifier"))
        elif args.quick:
            continue
        else:
            runs = [(f"first {args.large_slices} slices", args.strided_steps, args.large_slices, True, "classifier")]
        for label, steps, limit, amp, method in runs:
            r = _isolated(measure_explain, size, steps, limit, args.batch_size, amp, None, method)
            volume = volume or r
            print(
                f"| {label} ({r['volume_slices']}-slice volume) | {r['method']} | {size} | {r['steps']} | "
                f"{r['precision']} | "
                f"{r['slices']} | {r['wall_s']:.1f} | {r['slices_per_s']:.2f} | {r['floor_s']:.1f} | "
                f"{r['ratio']:.2f} | {r['peak_mb']:.0f} |",
                flush=True,
            )
    if args.explain_only:
        return
    print(
        f"\n| naive MONAI loop (batch 1, fp32) vs adiff (batch {args.batch_size}) | size | K | slices compared | "
        f"naive s/slice | adiff s/slice | speed-up | max abs diff | {memory} (naive+adiff) |"
    )
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for size in sizes[:1]:
        r = _isolated(measure_naive, size, args.strided_steps, args.naive_slices, args.batch_size)
        for amp in (False, True):
            print(
                f"| adiff {r[f'precision_{amp}']}, same timesteps | {size} | {r['steps']} | {r['slices']} | "
                f"{r['naive_s_per_slice']:.2f} | {r[f'adiff_s_per_slice_{amp}']:.3f} | {r[f'speedup_{amp}']:.1f}x | "
                f"{r[f'max_abs_diff_{amp}']:.2e} | {r['peak_mb']:.0f} |",
                flush=True,
            )
        n, kept = volume["volume_slices"], volume["slices"]
        naive_volume = r["naive_s_per_slice"] * n
        print(
            f"\nwhole {n}-slice volume at {size}x{size}, K={r['steps']}: naive loop (every slice, extrapolated) "
            f"{naive_volume:.0f} s; adiff ({volume['precision']}, skips the {n - kept} slices without foreground) "
            f"{volume['wall_s']:.0f} s: {naive_volume / volume['wall_s']:.1f}x",
            flush=True,
        )
    print(f"\n| training (DDPM step, batch {args.batch_size // 2}) | size | precision | threads | img/s | {memory} |")
    print("|---|---|---|---|---|---|", flush=True)
    for size in sizes[:1]:
        runs = [(False, amp, threads) for amp in (False, True) for threads in (1, 2)] + [(True, False, 2)]
        for plain, amp, threads in runs:
            r = _isolated(measure_training, size, args.batch_size // 2, args.train_steps, plain, amp, threads)
            print(
                f"| {r['loop']} | {size} | {r['precision']} | {r['threads']} | {r['img_per_s']:.1f} | "
                f"{r['peak_mb']:.0f} |",
                flush=True,
            )
    if args.demo_steps:
        print(
            f"\n| demo phases (`adiff demo`, each training phase timed over {args.demo_steps} steps) | threads | "
            "build s | DDPM s/step x steps | classifier s/step x steps | other train s | explain s | projected s |"
        )
        print("|---|---|---|---|---|---|---|---|", flush=True)
        for amp in (False, True):
            r = _isolated(measure_demo, amp, None, args.demo_steps, args.work)
            print(
                f"| {r['precision']} | {r['threads']} | {r['build_s']:.0f} | "
                f"{r['ddpm_s_per_step']:.2f} x {r['ddpm_steps']} | "
                f"{r['classifier_s_per_step']:.2f} x {r['classifier_steps']} | {r['other_train_s']:.0f} | "
                f"{r['explain_s']:.0f} ({r['explained']} subjects) | {r['projected_s']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
