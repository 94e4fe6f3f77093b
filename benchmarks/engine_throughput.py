"""Throughput of pctune's engine against the straightforward implementation of the spec's pseudocode.

One run measures, on identical weights and inputs, ``benchmarks/reference_impl.straightforward_run``
(fp32, ``torch.autograd.grad`` per pcoder, nothing skipped) and ``PredictiveNet.run`` for each model,
in the paper's search regime (alpha = 0: the tuned beta and lambda of paper Table S2/S3 with alpha set
to 0) and in the general regime (alpha > 0: the same with alpha = 0.01 and gradient scaling on, so
the error term actually moves the representations). It reports images per second for T timesteps,
the engine/reference ratio, the largest relative difference of their logits, the FLOPs each one
executes (``torch.utils.flop_counter``) and the achieved FLOP/s (against the device's peak on a GPU).

The two implementations are timed interleaved (reference, engine, reference, engine, ...) so that a
shared machine's changing load hits both alike; the ratio reported is the median of the per-pair
ratios. Example::

    python benchmarks/engine_throughput.py                      # the full default run, JSON in results/
    python benchmarks/engine_throughput.py --models pvgg16 --sweep none --repeats 3
    python benchmarks/engine_throughput.py --device cuda --batch-size 64 --image-size 224

Random weights (pretrained weights are not needed to measure speed; the numbers the dynamics compute
do not change the work done).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_impl import straightforward_run

import pctune
from pctune import Hyperparameters

RESULTS = Path(__file__).resolve().parent / "results"

#: Dense peak throughput (TFLOP/s) of known GPUs: fp32 without tensor cores, and bf16/fp16 tensor cores.
GPU_PEAKS = {
    "H100 SXM": {"fp32": 66.9, "bf16": 989.4}, "H100 PCIe": {"fp32": 51.2, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "bf16": 835.0}, "H200": {"fp32": 66.9, "bf16": 989.4},
    "A100": {"fp32": 19.5, "bf16": 312.0}, "L4": {"fp32": 30.3, "bf16": 121.0},
}


# -- set-up ---------------------------------------------------------------------------------------
def build(model: str, device: torch.device) -> pctune.PredictiveNet:
    torch.manual_seed(0)
    net = pctune.create_model(model)
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():  # fresh BatchNorm statistics are the identity: make them non-trivial
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return net.to(device)


def regime(net: pctune.PredictiveNet, name: str) -> tuple[Hyperparameters, bool]:
    """(coefficients, gradient scaling) of a regime: ``alpha0`` or ``alpha>0``."""
    preset = net.hyperparameters("tuned" if "tuned" in net.presets else "default")
    if name == "alpha0":
        return Hyperparameters(preset.beta, preset.lambda_, 0.0), False
    return Hyperparameters(preset.beta, preset.lambda_, 0.01), True


def images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """A batch of 'noisy images' (standard normal), resident on the device for the whole measurement."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size * 1000 + batch))
    return x.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- measurement ----------------------------------------------------------------------------------
class _FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of the matrix products and convolutions executed (torch's own formulas;
    ``FlopCounterMode`` itself cannot be used: its module hooks break ``autograd.grad`` on leaves)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn) -> int:
    with _FlopCounter() as counter:
        fn()
    return counter.total


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads)."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def measure(net, hp, scaling, x, timesteps, repeats, device, *, with_reference=True, engine_kwargs=None,
            warmup=1, flops=True) -> dict:
    """Interleaved timings of the reference and the engine on the same net and input."""
    engine_kwargs = dict(engine_kwargs or {})
    net.gradient_scaling = scaling
    scales = net.gradient_scales(tuple(x.shape[1:]))

    def reference():
        return straightforward_run(net, x, timesteps, hp.beta, hp.lambda_, hp.alpha, scales)

    def engine():
        return net.run(x, timesteps, hp, **engine_kwargs)

    impls = {"engine": engine}
    if with_reference:
        impls = {"reference": reference, "engine": engine}
    out: dict = {"batch_size": x.shape[0], "image_size": x.shape[-1], "timesteps": timesteps,
                 "beta": list(hp.beta), "lambda": list(hp.lambda_), "alpha": list(hp.alpha),
                 "gradient_scaling": scaling, "engine_options": {k: str(v) for k, v in engine_kwargs.items()}}
    if with_reference:
        expected, got = reference(), engine()
        scale = expected.abs().max().clamp_min(1e-30)
        out["max_rel_diff_logits"] = ((got.float() - expected).abs().max() / scale).item()
        out["dynamics_move_logits"] = bool(not torch.equal(expected[-1], expected[0]))
        warmup = max(warmup - 1, 0)  # that was a warm-up run already
    for _ in range(warmup):
        for fn in impls.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in impls}
    cpu: dict[str, list[float]] = {k: [] for k in impls}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, fn in impls.items():
            w, c = timed(fn, device)
            wall[name].append(w)
            cpu[name].append(c)
    out["load_average_1min"] = [load_before, os.getloadavg()[0]]
    batch = x.shape[0]
    for name in impls:
        med = statistics.median(wall[name])
        out[name] = {"seconds": wall[name], "cpu_seconds": cpu[name], "median_seconds": med,
                     "min_seconds": min(wall[name]), "median_cpu_seconds": statistics.median(cpu[name]),
                     "images_per_second": batch / med, "images_per_second_best": batch / min(wall[name])}
    if with_reference:
        pair_ratios = [r / e for r, e in zip(wall["reference"], wall["engine"], strict=True)]
        out["speedup_median_of_pairs"] = statistics.median(pair_ratios)
        out["speedup_of_best"] = min(wall["reference"]) / min(wall["engine"])
        out["speedup_cpu_time"] = out["reference"]["median_cpu_seconds"] / out["engine"]["median_cpu_seconds"]
    if flops:
        for name, fn in impls.items():
            count = count_flops(fn)
            out[name]["flops"] = count
            out[name]["achieved_tflops"] = count / out[name]["median_seconds"] / 1e12
    return out


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "processor": _cpu_name()}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info["gpu"] = name
        info["peak_tflops"] = next((v for k, v in GPU_PEAKS.items() if k.split()[0] in name
                                    and all(w in name for w in k.split()[1:])), None)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def add_peak_fraction(entry: dict, peak: dict | None, precision: str) -> None:
    if not peak:
        return
    for name in ("reference", "engine"):
        if name in entry and "achieved_tflops" in entry[name]:
            entry[name]["fraction_of_peak"] = entry[name]["achieved_tflops"] / peak[precision]


# -- accuracy of reduced precision ------------------------------------------------------------------
def autocast_accuracy(device: torch.device, dtype: torch.dtype, image_size: int, timesteps: int) -> dict:
    """Score (mean cross-entropy over t = 1..T) in fp32 and under autocast, on random-weight PVGG16
    and on the embedded demo."""
    from pctune.search.objective import score

    results = {}
    net = build("pvgg16", device)
    hp = net.hyperparameters("tuned")
    x = images(16, image_size, device)
    labels = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(2)).to(device)
    results["pvgg16_random_weights"] = _score_pair(net, x, labels, hp, timesteps, dtype, score)
    try:
        from pctune.data.demo import digits, load_demo_model

        demo = load_demo_model(log=lambda _m: None).to(device)
        xd, yd = digits("test")
        xd = xd + 0.5 * torch.randn(xd.shape, generator=torch.Generator().manual_seed(0))
        results["demo"] = _score_pair(demo, xd.to(device), yd.to(device), demo.hyperparameters("default"),
                                      timesteps, dtype, score)
    except Exception as exc:  # the demo needs scikit-learn; report rather than fail the benchmark
        results["demo"] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def _score_pair(net, x, y, hp, timesteps, dtype, score) -> dict:
    net.optimize(autocast=None)
    full = score(net, x, y, hp, timesteps=timesteps)
    net.optimize(autocast=dtype)
    try:
        reduced = score(net, x, y, hp, timesteps=timesteps)
        logits_full = net.run(x, timesteps, hp, autocast=None)
        logits_red = net.run(x, timesteps, hp)
    finally:
        net.optimize(autocast=None)
    rel = ((logits_red - logits_full).abs().max() / logits_full.abs().max()).item()
    acc = [f"accuracy_t{t}" for t in range(timesteps + 1)]
    return {"mean_ce_fp32": full["mean_ce"], f"mean_ce_{_name(dtype)}": reduced["mean_ce"],
            "mean_ce_difference": reduced["mean_ce"] - full["mean_ce"],
            "accuracy_difference_per_t": [reduced[k] - full[k] for k in acc],
            "max_rel_diff_logits": rel, "images": int(x.shape[0])}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["pvgg16", "peffnetb0"])
    p.add_argument("--regimes", nargs="+", default=["alpha0", "alpha>0"], choices=["alpha0", "alpha>0"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on a CPU, 64 on a GPU")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--variants", nargs="*", default=["return_states", "channels_last", "autocast"],
                   choices=["return_states", "channels_last", "autocast", "compile"],
                   help="engine options also measured on the first model (alpha0 and alpha>0)")
    p.add_argument("--variant-repeats", type=int, default=3)
    p.add_argument("--skip-default", action="store_true", help="measure only the variants and sweeps")
    p.add_argument("--autocast-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--sweep", nargs="*", default=["batch", "image", "timesteps"],
                   choices=["none", "batch", "image", "timesteps"],
                   help="engine scaling (with the reference, fewer repeats) on the first model")
    p.add_argument("--sweep-repeats", type=int, default=2)
    p.add_argument("--sweep-reference", nargs="*", default=["timesteps"], choices=["batch", "image", "timesteps"],
                   help="sweeps that also time the reference (the others time the engine only)")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the autocast score difference (demo and random-weight PVGG16)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.batch_size is None:
        args.batch_size = 64 if device.type == "cuda" else 8
    autocast_dtype = getattr(torch, args.autocast_dtype)
    info = device_info(device)
    peak = info.get("peak_tflops")
    report: dict = {"benchmark": "engine_throughput", "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": info, "arguments": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()}, "results": []}

    def log(msg: str) -> None:
        print(msg, flush=True)

    def record(entry: dict, precision: str = "fp32") -> None:
        add_peak_fraction(entry, peak, precision)
        report["results"].append(entry)
        ref = entry.get("reference", {}).get("images_per_second")
        line = (f"{entry['model']:<10} {entry['regime']:<8} {entry['variant']:<14} B={entry['batch_size']:<3} "
                f"S={entry['image_size']:<4} T={entry['timesteps']}: engine "
                f"{entry['engine']['images_per_second']:8.2f} img/s")
        if ref is not None:
            line += (f", reference {ref:8.2f} img/s; speed-up x{entry['speedup_median_of_pairs']:.2f} "
                     f"(pairs) x{entry['speedup_of_best']:.2f} (best) x{entry['speedup_cpu_time']:.2f} (CPU "
                     f"time); max rel diff {entry['max_rel_diff_logits']:.1e}")
        log(line)

    for model in args.models:
        net = build(model, device)
        net.optimize(channels_last=False, cudnn_benchmark=device.type == "cuda")
        x = images(args.batch_size, args.image_size, device)
        for reg in args.regimes:
            hp, scaling = regime(net, reg)
            net.gradient_scaling = scaling
            if not args.skip_default:
                entry = measure(net, hp, scaling, x, args.timesteps, args.repeats, device)
                record({"model": model, "regime": reg, "variant": "default", **entry})
            if model != args.models[0]:
                continue
            default_logits = net.run(x, args.timesteps, hp)
            for variant in args.variants:
                kwargs: dict = {}
                precision = "fp32"
                if variant == "return_states":
                    kwargs = {"return_states": True}
                elif variant == "channels_last":
                    net.optimize(channels_last=True, cudnn_benchmark=device.type == "cuda")
                elif variant == "autocast":
                    kwargs = {"autocast": autocast_dtype}
                    precision = "bf16"
                elif variant == "compile":
                    net.optimize(channels_last=device.type == "cuda", compile=True)
                try:
                    # Variants time the engine alone (the reference's figure is in the default row)
                    # and compare its logits with the default engine's.
                    entry = measure(net, hp, scaling, x, args.timesteps, args.variant_repeats, device,
                                    with_reference=False, engine_kwargs=kwargs,
                                    warmup=2 if variant == "compile" else 1)
                    got = net.run(x, args.timesteps, hp, **kwargs)
                    got = got.logits if isinstance(got, pctune.RunResult) else got
                    entry["max_rel_diff_logits_vs_default_engine"] = (
                        (got.float() - default_logits).abs().max() / default_logits.abs().max()).item()
                    record({"model": model, "regime": reg, "variant": variant, **entry}, precision)
                except Exception as exc:  # an optional variant may be unsupported here: report it
                    report["results"].append({"model": model, "regime": reg, "variant": variant,
                                              "error": f"{type(exc).__name__}: {exc}"})
                    log(f"{model} {reg} {variant}: {type(exc).__name__}: {exc}")
                finally:
                    net.optimize(channels_last=False, cudnn_benchmark=device.type == "cuda")
        sweeps = [s for s in args.sweep if s != "none"]
        if model == args.models[0] and sweeps:
            b, s, t = args.batch_size, args.image_size, args.timesteps
            grid = []
            if "batch" in sweeps:
                grid += [("batch", bb, s, t) for bb in sorted({1, 4, b, 2 * b})]
            if "image" in sweeps:
                grid += [("image", b, ss, t) for ss in sorted({32, s, 3 * s // 2})]
            if "timesteps" in sweeps:
                grid += [("timesteps", b, s, tt) for tt in sorted({1, 2, t, 2 * t})]
            for reg in args.regimes:
                hp, scaling = regime(net, reg)
                for axis, bb, ss, tt in grid:
                    entry = measure(net, hp, scaling, images(bb, ss, device), tt, args.sweep_repeats, device,
                                    with_reference=axis in args.sweep_reference, flops=False)
                    record({"model": model, "regime": reg, "variant": f"sweep-{axis}", **entry})
        del net
    if args.accuracy:
        try:
            report["autocast_accuracy"] = {"dtype": args.autocast_dtype, **autocast_accuracy(
                device, autocast_dtype, args.image_size, args.timesteps)}
            log(f"autocast accuracy: {json.dumps(report['autocast_accuracy'])}")
        except Exception as exc:
            report["autocast_accuracy"] = {"error": f"{type(exc).__name__}: {exc}"}
    report["criteria"] = criteria(report, device)
    log(f"criteria: {json.dumps(report['criteria'])}")
    out = args.out or RESULTS / f"engine_throughput_{device.type}_{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {out}")
    return report


def criteria(report: dict, device: torch.device) -> dict:
    """Issue 5's acceptance on a CPU: PVGG16 at 64x64, engine >= 2x (alpha = 0) and >= 1.3x (alpha > 0)
    the reference, logits equal within 1e-5 relative. Three estimators of the speed-up are given
    (median of interleaved pairs, best of each, CPU time), because a shared machine's load varies."""
    found = {}
    for entry in report["results"]:
        if (entry.get("model") == "pvgg16" and entry.get("variant") == "default" and entry.get("image_size") == 64
                and "speedup_median_of_pairs" in entry):
            need = 2.0 if entry["regime"] == "alpha0" else 1.3
            diff = entry["max_rel_diff_logits"]
            equal = bool(math.isfinite(diff) and diff <= 1e-5)
            estimates = {k: entry[k] for k in ("speedup_median_of_pairs", "speedup_of_best", "speedup_cpu_time")}
            found[entry["regime"]] = {
                **estimates, "required": need, "max_rel_diff_logits": diff, "outputs_equal": equal,
                "passed_by": {k: bool(v >= need and equal) for k, v in estimates.items()},
            }
    return {"device": device.type, **found}


if __name__ == "__main__":
    main()
