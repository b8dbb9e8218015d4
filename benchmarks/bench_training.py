"""Seconds per training iteration and peak memory: MedFlowSegTrainer vs nnUNetTrainer on the same plans.

Both trainers get the same MedFlowSegPlans (patch size, batch size, stages, features); ``nnUNetTrainer`` trains
nnU-Net's ``PlainConvUNet`` built from a copy with the network class switched (``common.plain_unet_plans``), with
its usual deep supervision.

Timing (one subprocess per configuration, both trainers in it): nnU-Net's ``on_train_start`` (network, optimiser,
dataloaders) for each, ``--batches`` batches drawn up front (data augmentation stays outside the timed region),
then ``trainer.train_step`` (forward, loss, backward, clip, SGD step) alternating ABBA between the two trainers
for ``--warmup`` + ``--iters`` iterations; medians of wall and process-CPU seconds of the timed steps, and the
median of the per-pair wall ratios (pairs run back to back, so load from other processes hits both alike).
Memory (one subprocess per trainer, so the numbers are that trainer's alone): ``--mem_steps`` steps; CPU — peak
RSS (``resource.getrusage``) and its increase over the RSS just before the first step; CUDA —
``torch.cuda.max_memory_allocated`` over those steps.

    python benchmarks/bench_training.py -c 3d_fullres --warmup 1 --iters 4
    python benchmarks/bench_training.py -c 2d 3d_fullres -device cuda --warmup 5 --iters 20
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.training")
METHODS = ("ours", "nnunet")


def start_trainer(method: str, args: argparse.Namespace):
    """A trainer after nnU-Net's ``on_train_start``, and ``--batches`` batches drawn from its dataloader."""
    import torch
    name = C.resolve_dataset_name(args.d)
    plans, dataset_json = C.load_plans(name)
    trainer = C.trainer_for(method, plans, dataset_json, args.configuration, 0, torch.device(args.device),
                            args.ours_trainer)
    trainer.disable_checkpointing = True
    torch.manual_seed(0)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    batches = [next(trainer.dataloader_train) for _ in range(args.batches)]
    return trainer, batches


def timed_step(trainer, batch, device_type: str) -> tuple[float, float, float]:
    """(wall s, process CPU s, loss) of one ``train_step``; its loss comes back to the CPU, which synchronises."""
    import torch
    w0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train_step(batch)
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0, float(out["loss"])


def phase_times(trainer, batches: list, steps: int, device_type: str) -> dict:
    """Where one ``train_step`` goes: medians over ``steps`` steps of the network forward with gradient, the
    no-gradient network forwards (``estimate``: ours' own-estimate pass), the loss modules' forward
    (``trainer.loss``, and ours' ``aux_seg_loss``), the optimiser step, and the rest of the step (backward,
    gradient clipping, target encoding, x_t; by difference), each summed over its calls within a step, from forward
    hooks and a wrapped ``optimizer.step``; plus torch.profiler's operators by self CPU time over the same steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    spans: dict[str, list[float]] = {"forward": [], "estimate": [], "loss": [], "optimizer": []}
    starts: dict[str, float] = {}

    def hooks(module, phase: str) -> list:
        def which() -> str:  # a network call without gradient is the own-estimate pass
            return phase if phase != "forward" or torch.is_grad_enabled() else "estimate"
        pre = module.register_forward_pre_hook(lambda *_: starts.__setitem__(which(), time.perf_counter()))
        post = module.register_forward_hook(lambda *_: spans[which()].append(time.perf_counter() - starts[which()]))
        return [pre, post]

    handles = hooks(trainer.network, "forward") + [h for name in ("loss", "aux_seg_loss")
                                                   if isinstance(getattr(trainer, name, None), torch.nn.Module)
                                                   for h in hooks(getattr(trainer, name), "loss")]
    step = trainer.optimizer.step

    def timed_optimizer_step(*a, **k):
        t0 = time.perf_counter()
        out = step(*a, **k)
        spans["optimizer"].append(time.perf_counter() - t0)
        return out

    trainer.optimizer.step = timed_optimizer_step
    per_step: dict[str, list[float]] = {k: [] for k in ("step", *spans)}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            marks = {k: len(v) for k, v in spans.items()}
            per_step["step"].append(timed_step(trainer, batches[i % len(batches)], device_type)[0])
            for k, v in spans.items():  # a module can run more than once per step (ours: two forwards, two losses)
                per_step[k].append(sum(v[marks[k]:]))
    trainer.optimizer.step = step
    for h in handles:
        h.remove()
    res = {f"{k}_s": statistics.median(v) for k, v in per_step.items()}
    res["rest_s"] = res["step_s"] - sum(res[f"{k}_s"] for k in spans)
    res["operators"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return res


def finish(trainer) -> None:
    for dl in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(dl, "_finish"):
            dl._finish()


def describe(trainer) -> dict:
    return {"trainer": type(trainer).__name__, "network": type(trainer.network).__name__,
            "deep_supervision": bool(trainer.enable_deep_supervision),
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "patch_size": trainer.configuration_manager.patch_size, "batch_size": trainer.batch_size}


def worker_time(args: argparse.Namespace) -> dict:
    """Both trainers in one process, steps alternating ABBA (ours, nnunet, nnunet, ours, ...), so that load from
    other processes hits both alike. Warm-up steps are not timed."""
    trainers = {m: start_trainer(m, args) for m in METHODS}
    res = {m: describe(trainers[m][0]) | {"iter_s": [], "iter_cpu_s": [], "losses": []} for m in METHODS}
    for i in range(args.warmup + args.iters):
        for m in (METHODS if i % 2 == 0 else METHODS[::-1]):
            trainer, batches = trainers[m]
            wall, cpu, loss = timed_step(trainer, batches[i % len(batches)], args.device)
            logger.info("%s %s iteration %d: %.2f s wall, %.2f s CPU%s", m, args.configuration, i, wall, cpu,
                        " (warm-up)" if i < args.warmup else "")
            res[m]["losses"].append(loss)
            if i >= args.warmup:
                res[m]["iter_s"].append(wall)
                res[m]["iter_cpu_s"].append(cpu)
    for m in METHODS:
        if args.profile > 0:
            res[m]["phases"] = phase_times(*trainers[m], args.profile, args.device)
        finish(trainers[m][0])
    return res


def worker_memory(args: argparse.Namespace) -> dict:
    """One trainer alone in this process: peak RSS (CPU) or max allocated (CUDA) over ``--mem_steps`` steps."""
    import torch
    trainer, batches = start_trainer(args.method, args)
    rss_before = C.current_rss_mb()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = [timed_step(trainer, batches[i % len(batches)], args.device) for i in range(args.mem_steps)]
    res = describe(trainer) | {"rss_before_steps_mb": rss_before, "peak_rss_mb": C.peak_rss_mb(),
                               "step_rss_increase_mb": C.peak_rss_mb() - rss_before,
                               "mem_run_iter_s": [s[0] for s in steps]}
    if args.device == "cuda":
        res["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    finish(trainer)
    return res


def run_subprocess(kind: str, configuration: str, method: Optional[str], args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "-c", configuration, "-d", args.d,
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--batches", str(args.batches),
           "--mem_steps", str(args.mem_steps), "--profile", str(args.profile), "-device", args.device,
           "--work", str(args.work), "--threads", str(args.threads), "--ours_trainer", args.ours_trainer,
           "--n_proc_da", args.n_proc_da, "--_result", str(out)] + (["--method", method] if method else []) + (
           ["--tune_malloc"] if args.tune_malloc else [])
    logger.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    out.unlink()
    return res


def summarize(configuration: str, timing: dict, memory: dict) -> dict:
    row: dict = {"configuration": configuration, "patch": "x".join(map(str, timing["ours"]["patch_size"])),
                 "batch": timing["ours"]["batch_size"]}
    for m in METHODS:
        row[f"{m}_s_per_it"] = statistics.median(timing[m]["iter_s"])
        row[f"{m}_cpu_s_per_it"] = statistics.median(timing[m]["iter_cpu_s"])
        row[f"{m}_min_s_per_it"] = min(timing[m]["iter_s"])
        if m in memory:
            row[f"{m}_peak_rss_mb"] = memory[m]["peak_rss_mb"]
            row[f"{m}_step_rss_increase_mb"] = memory[m]["step_rss_increase_mb"]
            if "max_memory_allocated_mb" in memory[m]:
                row[f"{m}_max_cuda_mb"] = memory[m]["max_memory_allocated_mb"]
    row["ratio_wall"] = row["ours_s_per_it"] / row["nnunet_s_per_it"]
    row["ratio_cpu"] = row["ours_cpu_s_per_it"] / row["nnunet_cpu_s_per_it"]
    row["ratio_min"] = row["ours_min_s_per_it"] / row["nnunet_min_s_per_it"]  # other load only adds time
    # per-iteration pairs run back to back: the median of their ratios is the least load-sensitive number
    row["ratio_median_pair"] = statistics.median(a / b for a, b in zip(timing["ours"]["iter_s"],
                                                                       timing["nnunet"]["iter_s"]))
    if memory:
        row["ratio_peak_rss"] = row["ours_peak_rss_mb"] / row["nnunet_peak_rss_mb"]
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", default="4", help="dataset id or name (default 4 = Dataset004_Hippocampus)")
    p.add_argument("-c", "--configurations", nargs="+", default=["2d", "3d_fullres"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per worker (median reported)")
    p.add_argument("--batches", type=int, default=2, help="distinct batches drawn before timing, cycled")
    p.add_argument("--profile", type=int, default=0, help="after timing, profile this many more steps per trainer "
                   "(forward / loss / optimiser / rest, and torch.profiler's top operators)")
    p.add_argument("--mem_steps", type=int, default=2, help="steps of each memory worker (0 = skip memory)")
    p.add_argument("-device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0 = all cores); 1 makes "
                   "process CPU time a load-independent measure of work (no OpenMP spin-waiting)")
    p.add_argument("--nnunet_compile", action="store_true", help="let nnUNetTrainer torch.compile on CUDA "
                   "(default: nnUNet_compile=f, since ours never compiles)")
    p.add_argument("--n_proc_da", default="0", help="nnUNet_n_proc_DA for the workers (default 0: batches are "
                                                    "drawn before timing anyway)")
    C.add_output_args(p, "bench_training.json")
    p.add_argument("--ours_trainer", default="MedFlowSegTrainer", help="our trainer class: MedFlowSegTrainer or a "
                   "one-concern variant (e.g. MedFlowSegTrainer_labelPath: no own-estimate pass)")
    p.add_argument("--tune_malloc", action="store_true", help="raise glibc's malloc thresholds in the workers, as "
                   "mfs_train does (medflowseg_nn.cpu_allocator); both trainers of a worker get it")
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--_worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging(args.verbose)
    C.setup_env(args.work, n_proc_da=args.n_proc_da)
    if not args.nnunet_compile:
        os.environ["nnUNet_compile"] = "f"
    if args._worker:
        if args.tune_malloc:  # before the first large allocation; both trainers of the worker share it
            from medflowseg_nn.cpu_allocator import tune_cpu_allocator
            logger.info("glibc malloc thresholds raised: %s", tune_cpu_allocator())
        import torch
        if args.device == "cpu":
            torch.set_num_threads(args.threads or os.cpu_count() or 1)
        else:
            torch.backends.cudnn.benchmark = True
        args.configuration = args.configurations[0]
        res = worker_time(args) if args._worker == "time" else worker_memory(args)
        args._result.write_text(json.dumps(res, default=float))
        return 0
    name = C.resolve_dataset_name(args.d)
    C.ensure_planned(name, args.configurations, preprocess=True)
    info = C.machine_info()
    rows, runs_all = [], {}
    for cfg in args.configurations:
        timing = run_subprocess("time", cfg, None, args)
        memory = {m: run_subprocess("memory", cfg, m, args) for m in METHODS} if args.mem_steps > 0 else {}
        runs_all[cfg] = {"timing": timing, "memory": memory}
        rows.append(summarize(cfg, timing, memory))
    cols = ["configuration", "patch", "batch", "ours_s_per_it", "nnunet_s_per_it", "ratio_wall", "ratio_median_pair",
            "ratio_min", "ours_cpu_s_per_it", "nnunet_cpu_s_per_it", "ratio_cpu"]
    if args.mem_steps > 0:
        cols += ["ours_peak_rss_mb", "nnunet_peak_rss_mb", "ours_step_rss_increase_mb", "nnunet_step_rss_increase_mb"]
    if args.device == "cuda" and args.mem_steps > 0:
        cols += ["ours_max_cuda_mb", "nnunet_max_cuda_mb"]
    table = C.markdown_table(rows, cols)
    if args.profile > 0:
        phases = [{"configuration": cfg, "trainer": m, **{k: round(v, 3) for k, v in
                                                          runs_all[cfg]["timing"][m]["phases"].items()
                                                          if k.endswith("_s")}}
                  for cfg in args.configurations for m in METHODS]
        table += "\n\nPhases of train_step (median s over the profiled steps)\n" + C.markdown_table(
            phases, ["configuration", "trainer", "step_s", "forward_s", "estimate_s", "loss_s", "optimizer_s",
                     "rest_s"])
        for cfg in args.configurations:
            for m in METHODS:
                logger.info("%s %s operators by self CPU time:\n%s", cfg, m,
                            runs_all[cfg]["timing"][m]["phases"]["operators"])
    threads = args.threads or os.cpu_count()
    print(f"\n{name}, ours = {args.ours_trainer}, {args.device}, {threads} torch thread(s), median of {args.iters} "
          f"timed iterations after {args.warmup} warm-up (ABBA-interleaved in one process); memory: separate "
          f"process per trainer, {args.mem_steps} steps\n{table}")
    C.write_json(args.out, {"benchmark": "training", "machine": info, "args": {k: str(v) for k, v in
                                                                                vars(args).items()},
                            "runs": runs_all, "summary": rows, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
