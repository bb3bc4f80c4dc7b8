"""``opd-fast bench loss`` and ``opd-fast bench memory``: measure backends and peers on your shapes."""

from __future__ import annotations

import argparse
import sys

_DEFAULT_SHAPES = "2048x32768x1024,8192x32768x1024,2048x131072x1024,8192x131072x1024"
_DEFAULT_PEERS = "naive,trl,liger,liger-eager"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", type=_csv, default=None,
                   help="opd-fast backends (default: every one available on the device)")
    p.add_argument("--peers", type=_csv, default=_csv(_DEFAULT_PEERS),
                   help=f"comma-separated peers, empty for none (default {_DEFAULT_PEERS})")
    p.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd", "tvd"))
    p.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (divergence=jsd)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-case-seconds", type=float, default=240.0,
                   help="time budget per case: fewer timed rounds beyond it; an implementation whose "
                        "first call exceeds it is reported too-slow")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="do not measure the bare-GEMM floor (no x-floor ratios)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the correctness check against the reference (not recommended)")
    p.add_argument("--json", help="write results + metadata (command line included) as JSON")
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
        else:
            argv += [f"--{key.replace('_', '-')}", ",".join(value) if isinstance(value, list) else str(value)]
    return argv


def _saver(args: argparse.Namespace, cfg):
    """Rewrites the JSON/CSV after every case, so a long run that is stopped keeps what it finished."""
    from ..benchmarking import report

    def save(results) -> None:
        if args.json:
            report.write_json(args.json, results, report.metadata(cfg, _argv(args)))
        if args.csv:
            report.write_csv(args.csv, results)

    return save


def _emit(args: argparse.Namespace, results, cfg, plot_fn, title: str) -> int:
    from ..benchmarking import report

    meta = report.metadata(cfg, _argv(args))
    print(f"# {meta['date_utc']} UTC, {meta['cpu']}, {meta['cpu_threads']} threads; {meta['command']}")
    print(report.format_markdown(results) if args.markdown else report.format_table(results))
    if args.json:
        report.write_json(args.json, results, meta)
    if args.csv:
        report.write_csv(args.csv, results)
    if args.plot:
        plot_fn(results, args.plot, f"{title} - {meta['cpu']} - {meta['date_utc']} UTC")
    failed = [r for r in results if r.status in ("incorrect", "error")]
    return 1 if failed else 0


def _run_loss(args: argparse.Namespace) -> int:
    from ..benchmarking.plot import plot_loss
    from ..benchmarking.runner import run_loss_bench
    from ..benchmarking.shapes import parse_dtypes, parse_shapes

    shapes, dtypes = parse_shapes(args.shapes), parse_dtypes(args.dtypes)
    cfg = _config(args, warmup=args.warmup, repeats=args.repeats)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    results = run_loss_bench(_implementations(args), shapes, dtypes, cfg, log, _saver(args, cfg))
    return _emit(args, results, cfg, plot_loss, f"fused loss fwd+bwd, {args.divergence}")


def _run_memory(args: argparse.Namespace) -> int:
    from ..benchmarking.plot import plot_memory
    from ..benchmarking.runner import run_memory_bench
    from ..benchmarking.shapes import grid, parse_dtypes

    (dtype,) = parse_dtypes(args.dtype)
    shapes = grid([int(n) for n in _csv(args.ns)], [args.vocab], args.hidden)
    cfg = _config(args)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    results = run_memory_bench(_implementations(args), shapes, dtype, cfg, log, _saver(args, cfg))
    return _emit(args, results, cfg, plot_memory, f"extra peak memory vs N, V={args.vocab}, {dtype}")


def _run_report(args: argparse.Namespace) -> int:
    from ..benchmarking import report
    from ..benchmarking.plot import plot_loss
    from ..benchmarking.shapes import DTYPES

    loaded = [report.load_json(path) for path in args.files]
    dtype_rank = {name: i for i, name in enumerate(DTYPES)}
    results = sorted(  # stable: implementations keep their run order within a shape x dtype
        (res for _, batch in loaded for res in batch),
        key=lambda r: (r.shape.n * r.shape.v, r.shape.n, r.shape.h_s, dtype_rank.get(r.dtype, 99)),
    )
    for path, (meta, _) in zip(args.files, loaded, strict=True):
        print(f"# {path}: {meta['date_utc']} UTC, {meta['cpu']}; {meta['command']}")
    print(report.format_markdown(results) if args.markdown else report.format_table(results))
    if args.csv:
        report.write_csv(args.csv, results)
    if args.plot:
        plot_loss(results, args.plot, f"fused loss fwd+bwd - {loaded[0][0]['cpu']} - {loaded[0][0]['date_utc']} UTC")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark the fused loss against the GEMM floor and peers")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    loss = kinds.add_parser("loss", help="fwd+bwd time, first call, extra peak memory per shape x dtype")
    loss.add_argument("--shapes", default=_DEFAULT_SHAPES, help="comma-separated NxVxH or NxVxH_SxH_T")
    loss.add_argument("--dtypes", default="fp32,bf16")
    loss.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    loss.add_argument("--repeats", type=int, default=3, help="timed rounds (fewer if over the case budget)")
    _common(loss)
    loss.set_defaults(func=_run_loss)

    memory = kinds.add_parser("memory", help="extra peak memory vs N at fixed V (no timing)")
    memory.add_argument("--ns", default="1024,2048,4096,8192,16384")
    memory.add_argument("--vocab", type=int, default=32768)
    memory.add_argument("--hidden", type=int, default=1024)
    memory.add_argument("--dtype", default="bf16")
    _common(memory)
    memory.set_defaults(func=_run_memory)

    merged = kinds.add_parser("report", help="merge JSON files of earlier runs into one table, CSV and plot")
    merged.add_argument("files", nargs="+")
    merged.add_argument("--csv")
    merged.add_argument("--plot")
    merged.add_argument("--markdown", action="store_true")
    merged.set_defaults(func=_run_report)
