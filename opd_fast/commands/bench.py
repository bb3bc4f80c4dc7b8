"""``opd-fast bench loss|memory|report|e2e``: measure backends and peers on your shapes, and the runner vs TRL.

The defaults finish in about a minute on a 2-core CPU (``--shapes small``, fp32, peers that need no
compile step); ``--shapes large`` is the headline set (tens of minutes there). Shapes are
``N x H x V`` everywhere (see ``opd_fast.benchmarking.shapes``).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..cli import HelpFormatter as _Formatter

_DEFAULT_PEERS = "naive,trl,trl-full-logits,liger-eager"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", type=_csv, default=None,
                   help="opd-fast backends (default: every one available on the device)")
    p.add_argument("--peers", type=_csv, default=_DEFAULT_PEERS,
                   help="comma-separated peers, empty for none: naive, trl (DistillationTrainer's chunked "
                        "divergence), trl-full-logits (GKDTrainer's generalized_jsd_loss), liger (compiled: "
                        "a compile step of tens of seconds per process), liger-eager")
    p.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd", "tvd"),
                   help="divergence every implementation computes")
    p.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (divergence=jsd)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random operands")
    p.add_argument("--device", default="cpu", help="torch device to run on")
    p.add_argument("--max-case-seconds", type=float, default=240.0,
                   help="time budget per case: fewer timed rounds beyond it; an implementation whose "
                        "first call exceeds it is reported too-slow")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="do not measure the bare-GEMM floor (no x-floor ratios)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the correctness check against the reference (not recommended)")
    _outputs(p)


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="write results + metadata (command line, machine, load) as JSON")
    p.add_argument("--csv", help="write results as CSV")
    p.add_argument("--plot", help="write a PNG plot")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")


def _config(args: argparse.Namespace, **overrides):
    from ..benchmarking.runner import BenchConfig

    return BenchConfig(
        divergence=args.divergence, beta=args.beta, seed=args.seed, device=args.device,
        max_case_seconds=args.max_case_seconds, check=args.check, **overrides,
    )


def _implementations(args: argparse.Namespace):
    import torch

    from ..benchmarking.implementations import FLOOR, default_backends, select

    device = torch.device(args.device)
    chosen = select(args.backends if args.backends is not None else default_backends(device), args.peers, device)
    return chosen if args.floor else [impl for impl in chosen if impl.name != FLOOR]


def _argv(args: argparse.Namespace) -> list[str]:
    """The full effective command line (defaults spelled out), so a JSON file says how to rerun it."""
    argv = ["bench", args.bench_command]
    for key, value in vars(args).items():
        if key in ("command", "bench_command", "func") or value is None:
            continue
        if key in ("check", "floor"):
            argv += [] if value else [f"--no-{key}"]
        elif isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        elif key == "arms":  # repeatable
            argv += [part for arm in value for part in ("--arms", arm)]
        else:
            argv += [f"--{key.replace('_', '-')}", ",".join(value) if isinstance(value, list) else str(value)]
    return argv


def _saver(args: argparse.Namespace, cfg, load_before: dict):
    """Rewrites the JSON/CSV after every case, so a long run that is stopped keeps what it finished."""
    from ..benchmarking import report

    def save(results) -> None:
        if args.json:
            report.write_json(args.json, results, report.metadata(cfg, _argv(args), load_before))
        if args.csv:
            report.write_csv(args.csv, results)

    return save


def _emit(args: argparse.Namespace, results, cfg, load_before: dict, plot_fn, title: str) -> int:
    from ..benchmarking import report
    from ..benchmarking.plot import RunGroup

    meta = report.metadata(cfg, _argv(args), load_before)
    print(f"# {meta['date_utc']} UTC, {report.setting(meta)}; {meta['command']}")
    print(report.format_markdown(results) if args.markdown else report.format_table(results))
    if args.json:
        report.write_json(args.json, results, meta)
    if args.csv:
        report.write_csv(args.csv, results)
    if args.plot:
        plot_fn([RunGroup(report.setting(meta), results)], args.plot, f"{title} - {meta['date_utc']} UTC")
    failed = [r for r in results if r.status in ("incorrect", "error")]
    return 1 if failed else 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_loss(args: argparse.Namespace) -> int:
    from ..benchmarking.plot import plot_loss
    from ..benchmarking.report import machine_load
    from ..benchmarking.runner import run_loss_bench
    from ..benchmarking.shapes import parse_dtypes, parse_shapes

    load_before = machine_load()
    shapes, dtypes = parse_shapes(args.shapes), parse_dtypes(args.dtypes)
    cfg = _config(args, warmup=args.warmup, repeats=args.repeats)
    results = run_loss_bench(_implementations(args), shapes, dtypes, cfg, _log, _saver(args, cfg, load_before))
    return _emit(args, results, cfg, load_before, plot_loss, f"fused loss fwd+bwd, {args.divergence}")


def _run_memory(args: argparse.Namespace) -> int:
    from ..benchmarking.plot import plot_memory
    from ..benchmarking.report import machine_load
    from ..benchmarking.runner import run_memory_bench
    from ..benchmarking.shapes import grid, parse_dtypes

    load_before = machine_load()
    (dtype,) = parse_dtypes(args.dtype)
    shapes = grid([int(n) for n in _csv(args.ns)], [args.vocab], args.hidden)
    cfg = _config(args)
    results = run_memory_bench(_implementations(args), shapes, dtype, cfg, _log, _saver(args, cfg, load_before))
    return _emit(args, results, cfg, load_before, plot_memory, f"extra peak memory vs N, V={args.vocab}, {dtype}")


def _run_report(args: argparse.Namespace) -> int:
    from ..benchmarking import report
    from ..benchmarking.plot import RunGroup, plot_loss, plot_memory
    from ..benchmarking.shapes import DTYPES

    loaded = [report.load_json(path) for path in args.files]
    dtype_rank = {name: i for i, name in enumerate(DTYPES)}

    def ordered(results):  # stable: implementations keep their run order within a shape x dtype
        return sorted(results, key=lambda r: (r.shape.n * r.shape.v, r.shape.n, r.shape.h_s,
                                              dtype_rank.get(r.dtype, 99)))

    groups: dict[str, list] = {}
    for path, (meta, batch) in zip(args.files, loaded, strict=True):
        print(f"# {path}: {meta['date_utc']} UTC, {report.setting(meta)}; {meta['command']}")
        groups.setdefault(report.setting(meta), []).extend(batch)
    results = ordered(res for _, batch in loaded for res in batch)
    print(report.format_markdown(results) if args.markdown else report.format_table(results))
    if args.csv:
        report.write_csv(args.csv, results)
    if args.plot:
        memory_only = not any(r.runs_s for r in results)  # bench memory runs time nothing
        plot_fn, what = (plot_memory, "extra peak memory") if memory_only else (plot_loss, "fused loss fwd+bwd")
        dates = sorted(meta["date_utc"] for meta, _ in loaded)
        span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        plot_fn([RunGroup(k, ordered(v)) for k, v in groups.items()], args.plot, f"{what} - {span} UTC")
    return 0


def _run_e2e(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from ..benchmarking import e2e, report

    load_before = report.machine_load()
    if args.quick:
        cfg = e2e.quick_config(args.cache_dir)
    else:
        vocabs = _csv(args.vocab)
        if not vocabs or not all(v.isdigit() and int(v) > 0 for v in vocabs):
            raise ValueError(f"--vocab must be comma-separated positive vocabulary sizes, got {args.vocab!r}")
        cfg = e2e.E2EConfig(
            vocab_sizes=tuple(int(v) for v in vocabs), steps=args.steps, warmup_steps=args.warmup_steps,
            rounds=args.rounds, threads=args.threads, seed=args.seed, cache_dir=args.cache_dir,
        )
    if args.arms is not None:
        cfg = dataclasses.replace(cfg, arms=tuple(e2e.Arm.parse(a) for a in args.arms))
    if cfg.warmup_steps >= cfg.steps:
        raise ValueError(f"--warmup-steps ({cfg.warmup_steps}) must be below --steps ({cfg.steps}): nothing measured")
    results = e2e.run_e2e(cfg, Path(args.out_dir), _log)
    meta = {"command": shlex.join(["opd-fast", *_argv(args)]), "date_utc": report.now_utc(), "cpu": report.cpu_model(),
            "cpu_threads": cfg.threads, "load": {"before": load_before, "after": report.machine_load()},
            "versions": report.versions()}
    print(f"# {meta['date_utc']} UTC, {report.setting(meta)}; {meta['command']}")
    print(e2e.format_markdown(results, cfg))
    if args.json:
        Path(args.json).write_text(json.dumps(e2e.to_json(results, cfg, meta), indent=2) + "\n")
    if args.plot:
        e2e.plot(results, args.plot, f"on-policy distillation end to end - {report.setting(meta)} - "
                                     f"{meta['date_utc']} UTC")
    return 1 if any(r.status == "error" for r in results) else 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..benchmarking.e2e import DEFAULT_ARMS, E2EConfig
    from ..benchmarking.shapes import SHAPE_FORMAT, SHAPE_PRESETS

    bench = sub.add_parser("bench", help="benchmark the fused loss against the GEMM floor and peers")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    loss = kinds.add_parser("loss", help="fwd+bwd time, first call, extra peak memory per shape x dtype",
                            formatter_class=_Formatter)
    presets = "; ".join(f"{k} = {v}" for k, v in SHAPE_PRESETS.items())
    loss.add_argument("--shapes", default="small",
                      help=f"a preset or comma-separated shapes, each {SHAPE_FORMAT}. Presets: {presets}")
    loss.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16, fp16")
    loss.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    loss.add_argument("--repeats", type=int, default=3, help="timed rounds (fewer if over the case budget)")
    _common(loss)
    loss.set_defaults(func=_run_loss)

    memory = kinds.add_parser("memory", help="extra peak memory vs N at fixed V (no timing)",
                              formatter_class=_Formatter)
    memory.add_argument("--ns", default="1024,2048,4096,8192,16384", help="comma-separated token counts N")
    memory.add_argument("--vocab", type=int, default=32768, help="vocabulary V")
    memory.add_argument("--hidden", type=int, default=1024, help="hidden size H (student and teacher)")
    memory.add_argument("--dtype", default="bf16", help="one of fp32, bf16, fp16")
    _common(memory)
    memory.set_defaults(func=_run_memory)

    e2e = kinds.add_parser("e2e", help="end-to-end on-policy distillation: opd-fast train modes vs TRL trainers",
                           formatter_class=_Formatter)
    defaults = E2EConfig()
    e2e.add_argument("--vocab", default=",".join(map(str, defaults.vocab_sizes)),
                     help="comma-separated vocabulary sizes")
    e2e.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per process (warm-up included)")
    e2e.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                     help="first steps of every process left out")
    e2e.add_argument("--rounds", type=int, default=defaults.rounds, help="times every arm runs (in rotated order)")
    e2e.add_argument("--threads", type=int, default=defaults.threads, help="torch threads of every arm")
    e2e.add_argument("--seed", type=int, default=defaults.seed, help="seed of the models, prompts and training")
    e2e.add_argument("--arms", action="append", default=None, metavar="ARM",
                     help="repeatable: trl-gkd, trl-distill, or opd-fast[-NAME]=KEY=VALUE;KEY=VALUE (opd-fast config "
                          "overrides). Default: " + ", ".join(a.spec for a in DEFAULT_ARMS))
    e2e.add_argument("--cache-dir", default=defaults.cache_dir, help="where the models are saved once")
    e2e.add_argument("--out-dir", default="runs/bench-e2e", help="run directories of every arm")
    e2e.add_argument("--quick", action="store_true",
                     help="smoke run: toy models, vocab 512, 3 steps, opd-fast serial vs trl-gkd")
    e2e.add_argument("--json", help="write results + metadata as JSON")
    e2e.add_argument("--plot", help="write a PNG bar chart of generated tokens/s per arm and vocabulary")
    e2e.set_defaults(func=_run_e2e)

    merged = kinds.add_parser("report", help="merge JSON files of earlier runs into one table, CSV and plot",
                              formatter_class=_Formatter)
    merged.add_argument("files", nargs="+", help="JSON files written by bench loss / bench memory --json")
    merged.add_argument("--csv", help="write the merged results as CSV")
    merged.add_argument("--plot", help="write a PNG plot (one marker per machine/load setting, never joined)")
    merged.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    merged.set_defaults(func=_run_report)
