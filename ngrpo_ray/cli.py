"""`ngrpo`: the command line. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import json
import sys

from ngrpo_ray.compare import DEFAULT_SEEDS
from ngrpo_ray.config import ConfigError, load_config, to_yaml

EPILOG_OVERRIDES = (
    "Overrides are dotted keys parsed as YAML, e.g. mixing.rho=0.2 trainer.iterations=3 eval.benchmarks=[aime24]. "
    "Unknown keys and wrong types are rejected with the key's name."
)


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "cpu_default") -> None:
    p.add_argument("--config", "-c", default=default,
                   help="preset name from workflows/presets/ or a YAML path (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    from ngrpo_ray.planning.terms import DEFAULT_GPU_GIB  # no torch import

    p.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_GIB,
                   help="memory of one GPU as CUDA counts it, for the capacity plan (default: %(default)s, an H100 "
                        "80 GB)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs the cluster can give the run (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ngrpo",
        description="N-GRPO / N-GSPO: GRPO-family RL whose rollouts use Semantic Neighbor Mixing (Ray + vLLM + DeepSpeed).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved configuration of a preset plus overrides",
                       description="Resolve a preset and overrides, validate them, and print the result as YAML.",
                       epilog=EPILOG_OVERRIDES)
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="also load the preset's data and read its model config (no weights, no training)")

    p = sub.add_parser("train", help="run GRPO/GSPO (N-GRPO/N-GSPO with mixing) training iterations",
                       description="Train with rollouts on vLLM engines (Ray actors), a DeepSpeed trainer group "
                                   "(Ray Train), weight sync and MLflow tracking.",
                       epilog=EPILOG_OVERRIDES)
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in trainer.output_dir")
    _add_plan_args(p)

    p = sub.add_parser("plan", help="per-GPU memory of the trainer and engines; non-zero exit when it cannot fit",
                       description="The capacity plan of a preset: per-GPU memory of each trainer rank (weights, "
                                   "gradients, optimizer states by ZeRO stage, activations at the micro-batch, the "
                                   "log-softmax chunk, the reference model) and of each engine (weights, KV cache of "
                                   "the rollout batch, mixing tables) in the preset's layout. Exits 1 naming the "
                                   "term that does not fit (GPU presets). No Ray, no vLLM, no hub.",
                       epilog=EPILOG_OVERRIDES)
    _add_config_args(p)
    _add_plan_args(p)

    p = sub.add_parser("eval", help="evaluate a model: Mean@n, unbiased Pass@k, bootstrap best@k",
                       description="Sample n answers per problem, grade with math-verify in killable workers, and report "
                                   "Mean@n and unbiased Pass@k with 95% intervals.",
                       epilog=EPILOG_OVERRIDES)
    _add_config_args(p)

    p = sub.add_parser("bench", help="measured benchmarks (each prints a ratio measured in one run)",
                       description="Benchmarks that compare two variants in one process and print JSON.")
    bench = p.add_subparsers(dest="bench", metavar="BENCH")
    b = bench.add_parser("hook-overhead", help="vanilla vLLM vs the neighbor-mixing hook: tokens/s and slowdown",
                         description="Interleaved rounds of a vanilla vLLM engine and the hooked engine on the same "
                                     "prompts; prints JSON with tokens/s for both and slowdown = 1 - hooked/vanilla.")
    from ngrpo_ray.cli_bench import add_hook_overhead_arguments

    add_hook_overhead_arguments(b)  # one flag set (and defaults) for `ngrpo bench` and `python -m ngrpo_ray.cli_bench`
    b = bench.add_parser("neighbor-table", help="time the full neighbor-table build for a V x d matrix",
                         description="Build the k-nearest-neighbor table of a random V x d embedding matrix and print "
                                     "the seconds it took (default: the R1-Distill-Qwen-1.5B shape).")
    b.add_argument("--vocab", type=int, default=151936)
    b.add_argument("--dim", type=int, default=1536)
    b.add_argument("--k", type=int, default=3)
    b.add_argument("--metric", default="cosine", choices=["cosine", "l2", "l1", "dot"])

    b = bench.add_parser("sync", help="trainer -> engine weight sync vs a raw gloo broadcast of the same bytes",
                         description="Interleaved rounds of a real versioned weight sync and a raw broadcast of the "
                                     "same number of bytes; prints JSON with both times and their ratio.")
    from ngrpo_ray.bench.sync_bench import add_sync_bench_arguments

    add_sync_bench_arguments(b)

    b = bench.add_parser("hook-step", help="the mixing hook's own time per decode step vs vLLM's sampler",
                         description="Pre-hook + post-hook time per decode step at 8, 64 and 256 rows with V = 151,936, "
                                     "against vLLM's Sampler on the same logits; prints JSON with ratio_<rows>.")
    from ngrpo_ray.bench.hook_step import add_hook_step_arguments

    add_hook_step_arguments(b)
    b = bench.add_parser("train-step", help="the trainer's update of a demo iteration vs plain transformers + AdamW",
                         description="One process, the same synthetic rollout batch: the trainer's update (DeepSpeed, "
                                     "train_on_sequences) and a plain forward + backward + AdamW of the same tokens, "
                                     "alternating; prints JSON with both times and ratio = trainer / plain.")
    from ngrpo_ray.bench.train_step_bench import add_train_step_bench_arguments

    add_train_step_bench_arguments(b)

    p = sub.add_parser("diagnostics", help="paper figure 1: Gaussian noise vs neighbor mixing drift, with a PCA plot",
                       description="For a model's embedding matrix: how often the nearest vocabulary token of a "
                                   "perturbed embedding is still the original, for Gaussian noise vs neighbor mixing.",
                       add_help=False)
    p.add_argument("diag_args", nargs=argparse.REMAINDER, help="arguments of the diagnostics tool (--model PATH ...)")

    p = sub.add_parser("demo", help="the embedded default: train SmolLM2-135M with N-GRPO on this CPU and show it learning",
                       description="Prepare the offline demo model, evaluate, train with N-GRPO on a local Ray cluster, "
                                   "evaluate again, and print a before/after table with 95% intervals.",
                       epilog=EPILOG_OVERRIDES)
    _add_config_args(p, default="cpu_default")
    p.add_argument("--resume", action="store_true", help="finish an interrupted demo from its last checkpoint")

    p = sub.add_parser("compare", help="GRPO vs N-GRPO vs STHT on the demo task over several seeds, one table",
                       description="Train each method with each seed (same preset, schedule and gate rate), then "
                                   "report held-out Mean@n and Pass@k per method (seeds pooled) with 95% intervals "
                                   "that resample seeds and problems, "
                                   "and paired differences to GRPO and the base. Recorded runs are reused on a second call.",
                       epilog=EPILOG_OVERRIDES)
    _add_config_args(p, default="compare_cpu")
    p.add_argument("--methods", nargs="+", default=["grpo", "n-grpo", "stht"], help="default: %(default)s")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="default: %(default)s")
    p.add_argument("--out", default="runs/compare", help="output folder (default: %(default)s)")
    p.add_argument("--records", default=None,
                   help="folder of run records (grades, wall time, commit); a run recorded there for the same config "
                        "is not trained again (default: OUT/records)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["diagnostics"]:  # its own flags, passed through untouched (argparse REMAINDER eats --help)
        from ngrpo_ray.evaluation.diagnostics import main as diagnostics_main

        return diagnostics_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _dispatch(args, parser)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("ngrpo_ray"):
            raise
        print(f"'ngrpo {args.command}' is not available in this build ({err.name} is missing)", file=sys.stderr)
        return 3


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "config":
        cfg = load_config(args.config, args.overrides)
        print(to_yaml(cfg), end="")
        if args.dry_run:
            from ngrpo_ray.config.dry_run import dry_run, format_dry_run

            items = dry_run(cfg)
            print("# dry run\n" + format_dry_run(items))
            return 1 if any(i.status == "failed" for i in items) else 0
        return 0
    if args.command == "bench":
        return _bench(args, parser)
    if args.command == "compare":
        from ngrpo_ray.compare import run_comparison

        run_comparison(args.config, args.overrides, args.methods, args.seeds, args.out, args.records)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "plan":
        return _plan(cfg, args, enforce=cfg.trainer.use_gpu)[0]
    if args.command == "train":
        refused, memory_plan = _plan(cfg, args, enforce=cfg.trainer.use_gpu, quiet_fit=not cfg.trainer.use_gpu)
        if refused:
            return 1
        from ngrpo_ray.distributed.driver import train

        train(cfg, resume=args.resume, memory_plan=memory_plan)  # the printed plan goes to MLflow too
        return 0
    if args.command == "eval":
        from ngrpo_ray.evaluation.run import evaluate

        print(json.dumps(evaluate(cfg), indent=2))
        return 0
    if args.command == "demo":
        from ngrpo_ray.demo import run_demo

        run_demo(cfg, resume=args.resume)
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


def _plan(cfg, args: argparse.Namespace, enforce: bool, quiet_fit: bool = False):
    """Print the capacity plan; (1, plan) when a GPU run cannot fit (`ngrpo train` then starts nothing), else
    (0, plan); the plan is None where it cannot be made (no config.json for the model)."""
    from ngrpo_ray.planning import format_plan, plan_memory

    try:
        plan = plan_memory(cfg, gpu_gib=args.gpu_memory_gib, gpus=args.gpus)
    except FileNotFoundError as err:
        print(f"memory plan: not possible ({err})", file=sys.stderr)
        return (1 if args.command == "plan" else 0), None
    if not quiet_fit or not plan.fits:
        print(format_plan(plan, str(args.config)))
    if enforce and not plan.fits:
        hint = "--gpu-memory-gib sets the card" + ("; the table above is `ngrpo plan`'s" if args.command == "train"
                                                   else "")
        print("refused: " + "; ".join(plan.failures) + f" ({hint})", file=sys.stderr)
        return 1, plan
    return 0, plan


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ngrpo_ray.cli_bench import json_only_stdout, print_bench_json

    json_only_stdout()
    if args.bench is None:  # argparse has checked any name given against the benchmarks below
        parser.parse_args(["bench", "--help"])
        return 2
    # stdout is the JSON alone (`ngrpo bench sync > result.json`): what the run prints, Ray's forwarded worker lines
    # included, goes to stderr
    print_bench_json(lambda: _run_bench(args))
    return 0


def _run_bench(args: argparse.Namespace) -> dict:
    if args.bench == "hook-overhead":
        from ngrpo_ray.cli_bench import run_hook_overhead_bench

        return run_hook_overhead_bench(args)
    if args.bench == "sync":
        from ngrpo_ray.bench.sync_bench import sync_bench_from_args

        return sync_bench_from_args(args)
    if args.bench == "train-step":
        from ngrpo_ray.bench.train_step_bench import run_train_step_bench

        return run_train_step_bench(args)
    if args.bench == "hook-step":
        from ngrpo_ray.bench.hook_step import run_hook_step_bench

        return run_hook_step_bench(args)
    from ngrpo_ray.cli_bench import run_neighbor_table_bench

    return run_neighbor_table_bench(args.vocab, args.dim, args.k, args.metric)


if __name__ == "__main__":
    sys.exit(main())
