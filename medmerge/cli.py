"""The `medmerge` command. Thin: parse arguments, call the library, turn user errors into one line each."""

from __future__ import annotations

import argparse
import gc
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from medmerge_common.errors import UserError

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 bytes, '512MiB' -> 536_870_912, '1000' -> 1000."""
    m = SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (examples: 2GB, 500MB, 4GiB, 1000000)")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got '{text}'")
    return value


def warn(line: str) -> None:
    print(f"medmerge: warning: {line}", file=sys.stderr)


def to_stderr(line: str) -> None:
    """Progress and summary lines go to stderr: stdout carries only what a script reads."""
    print(line, file=sys.stderr)


def nowhere(_line: str) -> None:
    """What --quiet says."""


def cmd_merge(args: argparse.Namespace) -> int:
    if args.out_dir is None and not args.dry_run:
        raise UserError("give OUT_DIR, the directory to write the merged model to (only --dry-run needs none)")
    with heavy_imports():
        from medmerge.console import describe_plan, progress_bar
        from merge.run import run_merge

    with progress_bar(f"merging {Path(args.recipe).name}", enabled=not (args.quiet or args.dry_run)) as progress:
        result = run_merge(
            args.recipe,
            args.out_dir,
            device=args.device,
            shard_bytes=args.out_shard_size,
            seed=args.seed,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            allow_nonfinite=args.allow_nonfinite,
            progress=progress,
            warn=warn,
        )
    if args.dry_run:
        print(describe_plan(result.plan))
    elif not args.quiet:
        print(f"wrote {result.out_dir} ({len(result.plan.jobs)} tensors, {result.seconds:.1f} s)", file=sys.stderr)
    return 0


def cmd_moe(args: argparse.Namespace) -> int:
    if args.out_dir is None and not args.dry_run:
        raise UserError("give OUT_DIR, the directory to write the mixture of experts to (only --dry-run needs none)")
    with heavy_imports():
        import torch

        from medmerge.console import progress_bar
        from merge.moe.build import PromptRun, build_moe

    with progress_bar(f"building {Path(args.config).name}", enabled=not (args.quiet or args.dry_run)) as progress:
        result = build_moe(
            args.config,
            args.out_dir,
            prompt_run=PromptRun(args.device, getattr(torch, args.prompt_dtype), args.quantization),
            shard_bytes=args.out_shard_size,
            seed=args.seed,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            allow_all_same=args.allow_all_same,
            progress=progress,
            warn=warn,
        )
    plan = result.plan
    summary = (
        f"{plan.layout.name}: {len(plan.config.experts)} experts x {plan.num_layers} layers, "
        f"{plan.config.experts_per_token} per token, gate_mode {plan.config.gate_mode}, {len(plan.tensors)} tensors"
    )
    if args.dry_run:
        print(summary)
    elif not args.quiet:
        print(f"wrote {result.out_dir} ({summary}, {result.seconds:.1f} s)", file=sys.stderr)
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    with heavy_imports():
        from medmerge.console import progress_bar
        from medmerge.labelled import labelled_prompts
        from medmerge.router_training import RouterSettings, train_router

    train = labelled_prompts(args.data, "--data")
    validation = labelled_prompts(args.validation_data, "--validation-data") if args.validation_data else None
    settings = RouterSettings(**{name: getattr(args, name) for name in RouterSettings.model_fields})
    say = nowhere if args.quiet else to_stderr
    with progress_bar(f"training {Path(args.moe_dir).name}'s routers", enabled=not args.quiet) as progress:
        result = train_router(
            args.moe_dir,
            args.out_dir,
            train,
            validation,
            settings=settings,
            data_names=(args.data, args.validation_data),
            overwrite=args.overwrite,
            progress=progress,
            say=say,
        )
    best = result.epochs[result.best_epoch]
    say(
        f"wrote {result.out_dir} (epoch {result.best_epoch} of {len(result.epochs) - 1}: validation accuracy "
        f"{best.validation_accuracy:.4f}, was {result.epochs[0].validation_accuracy:.4f}; {result.seconds:.1f} s)"
    )
    return 0


def _named_models(pairs: list[str]) -> dict[str, str]:
    """NAME=MODEL pairs (repeatable --model), names unique."""
    models: dict[str, str] = {}
    for pair in pairs:
        name, sep, ref = pair.partition("=")
        if not sep or not name or not ref:
            raise UserError(f"--model {pair}: expected NAME=MODEL (a task's name and its fine-tuned model)")
        if name in models:
            raise UserError(f"--model {pair}: the task name '{name}' is given twice")
        models[name] = ref
    return models


def cmd_fisher(args: argparse.Namespace) -> int:
    with heavy_imports():
        from medmerge.experiment import library_progress_bars
        from medmerge.fisher import estimate_fisher

    say = nowhere if args.quiet else to_stderr
    with library_progress_bars(not args.quiet):
        estimate_fisher(
            args.model,
            args.data,
            Path(args.out_dir),
            estimator=args.estimator,
            limit=args.limit,
            max_length=args.max_length,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            overwrite=args.overwrite,
            say=say,
        )
    return 0


def cmd_tall_masks(args: argparse.Namespace) -> int:
    with heavy_imports():
        from merge.tall import write_masks

    models = _named_models(args.model)
    lambdas = dict.fromkeys(models, args.tall_lambda)
    say = nowhere if args.quiet else to_stderr
    write_masks(args.merged, args.base, models, lambdas, Path(args.out_dir), overwrite=args.overwrite, say=say)
    return 0


def cmd_tall_restore(args: argparse.Namespace) -> int:
    with heavy_imports():
        from merge.tall import restore

    say = nowhere if args.quiet else to_stderr
    restore(
        args.merged,
        Path(args.masks),
        args.task,
        Path(args.out_dir),
        base_ref=args.base,
        overwrite=args.overwrite,
        say=say,
    )
    return 0


def cmd_fuse_train(args: argparse.Namespace) -> int:
    with heavy_imports():
        from medmerge.console import progress_bar
        from medmerge.fusion.train import load_fusion_config, train_fusion, with_overrides

    overrides = {"combiner": args.combiner, "seeds": args.seed, "limit": args.limit, "cache_dir": args.cache_dir}
    config = with_overrides(load_fusion_config(args.config), device=args.device, **overrides)
    say = nowhere if args.quiet else to_stderr
    with progress_bar("members' outputs", enabled=not args.quiet) as progress:
        result = train_fusion(config, args.out_dir, overwrite=args.overwrite, say=say, progress=progress)
    say(
        f"wrote {result.out_dir} ({config.combiner}: validation accuracy {result.validation_accuracy:.4f}, seed "
        f"{result.best_seed} epoch {result.best_epoch}; members ran on {result.member_runs} question(s); "
        f"{result.seconds:.1f} s)"
    )
    return 0


def _print_report(leaderboard: Path) -> None:
    print(f"report: {leaderboard.parent / 'index.html'} ({leaderboard})")


def cmd_demo(args: argparse.Namespace) -> int:
    with heavy_imports():
        from medmerge.demo import run_demo, run_methods_demo, run_search_demo

    if args.search:
        run_search_demo(Path(args.dir))
        return 0
    if args.methods:
        from medmerge.demo import chosen_methods

        run_methods_demo(Path(args.dir), chosen_methods(args.methods))
        return 0
    leaderboard = run_demo(Path(args.dir), verbose=args.verbose)
    _print_report(leaderboard)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    with heavy_imports():
        from medmerge.console import progress_bar
        from medmerge.experiment import run_experiment

    leaderboard = run_experiment(
        args.experiment, say=to_stderr, progress=lambda d: progress_bar(d, not args.quiet), verbose=args.verbose
    )
    _print_report(leaderboard)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    with heavy_imports():
        from medmerge.search.run import run_search

    outcome = run_search(
        args.search,
        args.out_dir,
        allow_test_fitness=args.allow_test_fitness,
        ray_address=args.ray_address,
        restart=args.restart,
        merge_best=args.merge_best,
        say=to_stderr,
    )
    print(outcome.best_recipe)
    if outcome.report is not None:
        _print_report(outcome.report)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    with heavy_imports():
        from medmerge.report import build_report

    say = nowhere if args.quiet else to_stderr

    leaderboard = build_report(
        args.results,
        args.output,
        title=args.title,
        rank_by=args.rank_by,
        bootstrap=args.bootstrap,
        seed=args.seed,
        std=args.std,
        say=say,
    )
    _print_report(leaderboard)
    return 0


def cmd_data_pull(args: argparse.Namespace) -> int:
    from medmerge_common.hub import hub_reachable
    from medmerge_tasks.corpora import DATASETS
    from medmerge_tasks.sources import pull

    if not hub_reachable():
        raise UserError(
            "the hub cannot be reached from here: run `medmerge data pull --to DIR` on a machine "
            "with a network, copy DIR here and set MEDMERGE_DATA_DIR=DIR"
        )
    for path in pull(Path(args.to) if args.to else None):
        print(path)
    if args.to:
        print(f"mirrored {len(DATASETS)} datasets; use them with MEDMERGE_DATA_DIR={args.to}", file=sys.stderr)
    return 0


VERBOSE_HELP = "also show the progress bars of transformers and datasets while lm-eval runs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medmerge", description="Merge biomedical language models and evaluate the merges with lm-eval."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser(
        "merge",
        help="merge the models of a YAML recipe into a Hugging Face model directory",
        description="Merge the models of a mergekit-format YAML recipe; OUT_DIR is written "
        "atomically and loads with `lm_eval --model hf --model_args pretrained=OUT_DIR`.",
    )
    merge.add_argument("recipe", help="the recipe YAML file")
    merge.add_argument(
        "out_dir",
        nargs="?",
        help="output model directory (created; must be empty unless --overwrite); optional with --dry-run",
    )
    merge.add_argument("--device", default="cpu", help="where to compute: cpu (default) or cuda[:N]")
    merge.add_argument(
        "--out-shard-size",
        type=parse_size,
        default=parse_size("5GB"),
        metavar="SIZE",
        help="largest output shard in bytes, e.g. 2GB, 500MB, 4GiB (default 5GB)",
    )
    merge.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of random methods (DARE, DELLA): each tensor's draws depend only on (seed, tensor name) (default 0)",
    )
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it exists and is a model directory medmerge or mergekit wrote",
    )
    merge.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="merge input tensors that hold NaN/Inf (with a warning each) instead of stopping",
    )
    merge.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    merge.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe and the models' configs/headers and print the plan; read no weights",
    )
    merge.set_defaults(func=cmd_merge)

    _add_moe_parser(sub)
    _add_fuse_parser(sub)

    run = sub.add_parser(
        "run",
        help="run an experiment file: merge, evaluate with lm-eval, report (resumable)",
        description="Merge the experiment's recipes, evaluate merged and plain models with "
        "lm-eval on its tasks and shot sets, and write the report (as `medmerge report`). Finished "
        "merges and evaluations are reused (keyed by a hash of their inputs), so an "
        "interrupted run resumes where it stopped.",
    )
    run.add_argument("experiment", help="the experiment YAML file")
    run.add_argument("--quiet", action="store_true", help="no merge progress bars")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(func=cmd_run)

    search = sub.add_parser(
        "search",
        help="search a recipe's parameters against lm-eval scores on held-out tasks (resumable)",
        description="Optimise the ranges of a search file (a recipe with {range: [low, high]} or {choice: [...]} "
        "where values go, and a 'search:' block) with CMA-ES or Optuna's TPE. Each trial merges into one loaded "
        "model (only the tensors it changes) and scores it with lm-eval on the fitness tasks, which must be "
        "held-out splits. Every trial is appended to OUT_DIR/journal.jsonl; run the same command again to "
        "resume. Writes OUT_DIR/best.yaml (an ordinary recipe), fitness.png, parameters.png and, with "
        "test_tasks, the best recipe's report against its parents on the test tasks (OUT_DIR/final/report).",
    )
    search.add_argument("search", help="the search YAML file")
    search.add_argument("out_dir", help="output directory (journal, best recipe, figures, final report)")
    search.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="run trials on a Ray cluster (auto, or HOST:PORT); without it, `workers:` > 1 starts a local Ray",
    )
    search.add_argument(
        "--allow-test-fitness",
        action="store_true",
        help="let fitness tasks be scored on test splits (their numbers are then tuned on, not measured)",
    )
    search.add_argument("--restart", action="store_true", help="discard OUT_DIR's journal and start over")
    search.add_argument("--merge-best", metavar="DIR", help="also merge the best recipe into DIR")
    search.set_defaults(func=cmd_search)

    report = sub.add_parser(
        "report",
        help="leaderboard, figures and paired significance tests from lm-eval results",
        description="Read lm-eval outputs (--output_path directories or results_*.json files; any number of "
        "models and runs) and write leaderboard.md, leaderboard.csv, pairwise.csv, PNG figures and a "
        "self-contained index.html. Repeated runs of a model (shot sets, few-shot seeds) fold into mean ± std; "
        "with --log_samples, every two models get a paired test on every task. Merges are compared with their "
        "parents (model card base_model list, or the recipe in the model directory).",
    )
    report.add_argument("results", nargs="+", help="lm-eval output directories or results_*.json files")
    report.add_argument(
        "-o",
        "--output",
        default="medmerge-report",
        metavar="DIR",
        help="report directory, replaced when it holds an earlier report (default: ./medmerge-report)",
    )
    report.add_argument("--title", default="Leaderboard", help="the page's title (default: Leaderboard)")
    report.add_argument(
        "--rank-by", metavar="COLUMN", help="column to rank by, e.g. 'bioinstructqa acc' (default: the first group)"
    )
    report.add_argument(
        "--bootstrap", type=positive_int, default=10_000, metavar="N", help="paired bootstrap resamples (default 10000)"
    )
    report.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    report.add_argument(
        "--std",
        choices=["population", "sample"],
        default="population",
        help="spread of repeated runs: population std (÷n, BioMistral's statistics.pstdev; default) or sample std "
        "(÷(n-1))",
    )
    report.add_argument("--quiet", action="store_true", help="no warnings or summary lines on stderr")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser(
        "demo",
        help="run the whole loop offline on tiny models: build, merge, lm-eval, report",
        description="Build tiny models, merge them (SLERP, TIES, DARE-TIES), build a 2-expert MoE and train its "
        "routers, train fusion combiners over the parents, evaluate everything with "
        "lm-eval and write a report. Needs no network.",
    )
    demo.add_argument("dir", nargs="?", default="medmerge-demo", help="work directory (default: ./medmerge-demo)")
    demo.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    mode = demo.add_mutually_exclusive_group()
    mode.add_argument(
        "--search",
        action="store_true",
        help="instead: search SLERP's t and TIES's weight/density on held-out fixture questions from the hand-picked "
        "settings (medmerge search, CMA-ES), then report the best and the hand-picked recipe beside the parents on "
        "test questions (DIR/search/summary.md)",
    )
    mode.add_argument(
        "--methods",
        metavar="all|NAME,...",
        help="instead: merge the two parents with every merge method (or those named) at its defaults, evaluate "
        "each on BioInstructQA and write one comparison table (DIR/methods/summary.md)",
    )
    demo.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="manage the evaluation datasets").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    data_pull = data.add_parser(
        "pull",
        help="download every dataset the medmerge tasks use",
        description="Download the files the medmerge lm-eval tasks read (BioInstructQA's "
        "data.zip, TruthfulQA, MedMCQA) into the hub cache, or with --to into "
        "DIR/<org>/<name> for MEDMERGE_DATA_DIR=DIR on offline machines.",
    )
    data_pull.add_argument("--to", metavar="DIR", help="mirror directory (default: the Hugging Face cache)")
    data_pull.set_defaults(func=cmd_data_pull)
    return parser


def _add_moe_parser(sub: argparse._SubParsersAction) -> None:
    moe = sub.add_parser(
        "moe",
        help="build a mixture of experts from dense models (mergekit-moe's config)",
        description="Build a Mixtral (or Qwen MoE / Qwen3 MoE) mixture of experts from dense Llama/Mistral/Qwen "
        "models, read from a mergekit-moe YAML config: attention, embeddings and norms from base_model, each "
        "expert's MLPs from its model, router rows from the experts' prompts. `medmerge moe CONFIG OUT_DIR` is "
        "short for `medmerge moe build CONFIG OUT_DIR`.",
    )
    actions = moe.add_subparsers(dest="moe_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="build the MoE a config describes",
        description="Build the mixture of experts of a mergekit-moe config into OUT_DIR (written atomically; loads "
        "with transformers' AutoModelForCausalLM and `lm_eval --model hf`).",
    )
    build.add_argument("config", help="the MoE config YAML file (mergekit-moe's format)")
    build.add_argument("out_dir", nargs="?", help="output model directory; optional with --dry-run")
    build.add_argument(
        "--device", default="cpu", help="where the base model runs the prompts: cpu (default) or cuda[:N]"
    )
    build.add_argument(
        "--prompt-dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype the base model runs the prompts in (gate_mode hidden*): bfloat16 (default) gives mergekit-moe's "
        "rows to the bit; float32 is ~5x faster on CPUs without bfloat16 units",
    )
    build.add_argument(
        "--quantization",
        choices=["4bit", "8bit"],
        help="load the base model in 4-/8-bit (bitsandbytes, CUDA) to run the prompts (gate_mode hidden*)",
    )
    build.add_argument(
        "--out-shard-size",
        type=parse_size,
        default=parse_size("5GB"),
        metavar="SIZE",
        help="largest output shard, e.g. 2GB, 500MB (default 5GB)",
    )
    build.add_argument("--seed", type=int, default=0, help="seed of random gates and expert noise (default 0)")
    build.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if medmerge or mergekit wrote it")
    build.add_argument(
        "--allow-all-same",
        "--i-understand-this-is-not-useful-without-training",
        dest="allow_all_same",
        action="store_true",
        help="build even when every expert is the same model (useful only to train the result)",
    )
    build.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    build.add_argument(
        "--dry-run", action="store_true", help="check the config and the models' configs/headers; read no weights"
    )
    build.set_defaults(func=cmd_moe)

    train = actions.add_parser(
        "train-router",
        help="train a mixture of experts' routers on labelled questions, experts frozen",
        description="Train the router of every layer of a Mixtral / Qwen MoE (the experts and everything else "
        "frozen) on labelled multiple-choice questions in MedMCQA's [INST] prompt, the answer letter as the target; "
        "keep the epoch with the best validation accuracy. OUT_DIR is the MoE with the trained routers (noise and "
        "capacity off), loadable by transformers and `lm_eval --model hf`, plus router_training.json (losses, "
        "accuracy and per-layer expert choices per epoch).",
    )
    train.add_argument("moe_dir", help="the mixture of experts (a directory `medmerge moe` or mergekit-moe wrote)")
    train.add_argument(
        "--data",
        required=True,
        help="labelled questions: `medmcqa` (MedMCQA's train split, from the hub or "
        "MEDMERGE_DATA_DIR), a .jsonl/.json/.parquet file in MedMCQA's schema (question, opa-opd, cop), or "
        "task:NAME[:train|validation] (any lm-eval multiple-choice task's train or validation split)",
    )
    train.add_argument("-o", "--out", dest="out_dir", required=True, help="output model directory")
    train.add_argument(
        "--validation-data", help="validation questions (same forms as --data); default: held out of --data"
    )
    train.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="share of --data held out for validation when --validation-data is not given (default 0.1)",
    )
    train.add_argument("--limit", type=float, help="train on this many questions (or this fraction of them, when < 1)")
    train.add_argument(
        "--router",
        choices=["linear", "noisy_topk"],
        default="linear",
        help="linear (softmax over the top k) or noisy_topk (Gaussian noise on the logits while training)",
    )
    train.add_argument(
        "--top-k", type=positive_int, help="experts per token, in training and in OUT_DIR (default: the MoE's)"
    )
    train.add_argument("--noise", type=float, help="standard deviation of the logit noise (noisy_topk; default 1.0)")
    train.add_argument(
        "--capacity-factor",
        type=float,
        help="limit each expert to ceil(k * tokens / experts * FACTOR) tokens per training batch (e.g. 1.25); "
        "default: no limit",
    )
    train.add_argument(
        "--load-balancing",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="weight of the Switch-style load-balancing loss (e.g. 0.01; default 0: off)",
    )
    train.add_argument("--epochs", type=positive_int, default=3, help="most epochs (default 3)")
    train.add_argument(
        "--patience",
        type=positive_int,
        default=2,
        help="stop after this many epochs without a better validation score (default 2)",
    )
    train.add_argument("--batch-size", type=positive_int, default=8, help="questions per step (default 8)")
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the router weights (1e-4)")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, the order and the noise (default 0)")
    train.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    train.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype of the frozen model (default auto: bfloat16 on CUDA, float32 on CPU); routers train in float32",
    )
    train.add_argument(
        "--quantization", choices=["4bit", "8bit"], help="load the frozen model in 4-/8-bit (bitsandbytes, CUDA)"
    )
    train.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if medmerge or mergekit wrote it")
    train.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    train.set_defaults(func=cmd_train_router)


def _add_fuse_parser(sub: argparse._SubParsersAction) -> None:
    fuse = sub.add_parser("fuse", help="trained output ensembles (combiners over frozen members)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    train = fuse.add_parser(
        "train",
        help="train a combiner (weighted, late_fusion, transformer) on frozen members' outputs",
        description="Run each member once on the labelled questions (outputs reduced to the answer options, "
        "cached), then train a combiner on them with early stopping on validation accuracy. FUSION_DIR holds the "
        "combiner, the members' identities and the training log and curves; evaluate it with "
        "`lm_eval --model medmerge-fusion --model_args pretrained=FUSION_DIR`. CONFIG's fields are documented in "
        "the README (members, data, combiner, features, seeds, epochs, ...); the options below override them.",
    )
    train.add_argument("config", help="fusion config (YAML)")
    train.add_argument("-o", "--out", dest="out_dir", required=True, help="output directory (FUSION_DIR)")
    train.add_argument("--combiner", choices=["weighted", "late_fusion", "transformer"], help="the combiner")
    train.add_argument(
        "--seed", type=int, action="append", help="train once per seed (repeatable); the best on validation is kept"
    )
    train.add_argument("--limit", type=float, help="train on this many questions (or this fraction, when < 1)")
    train.add_argument("--device", help="where the members run: cpu or cuda[:N]")
    train.add_argument("--cache-dir", help="cache of the members' outputs (default ~/.cache/medmerge/fusion)")
    train.add_argument("--overwrite", action="store_true", help="replace FUSION_DIR if medmerge wrote it")
    train.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    train.set_defaults(func=cmd_fuse_train)

    fisher = sub.add_parser(
        "fisher",
        help="estimate a model's diagonal Fisher on calibration text (for the fisher merge method)",
        description="F = mean over texts of (∂ log p(y|x) / ∂θ)², one text at a time (Matena & Raffel 2022). "
        "FISHER_DIR holds it under the model's tensor names; a recipe names it per model: "
        "`merge_method: fisher`, `parameters: {fisher: FISHER_DIR}`.",
    )
    fisher.add_argument("model", help="the model (directory or hub id)")
    fisher.add_argument(
        "--data",
        required=True,
        help='calibration texts: a .txt file (one per line), a .jsonl of {"text": ...}, or a labelled source '
        "(medmcqa, a MedMCQA-schema file, task:NAME[:SPLIT]) as question + right answer",
    )
    fisher.add_argument("-o", "--out", dest="out_dir", required=True, help="output directory (FISHER_DIR)")
    fisher.add_argument(
        "--estimator",
        choices=["model", "empirical"],
        default="model",
        help="y sampled from the model (the paper's Fisher; default) or the text's own tokens (empirical Fisher)",
    )
    fisher.add_argument("--limit", type=int, help="use the first N texts")
    fisher.add_argument("--max-length", type=int, default=512, help="tokens per text at most (default 512)")
    fisher.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    fisher.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    fisher.add_argument("--seed", type=int, default=0, help="seed of the sampled y (default 0)")
    fisher.add_argument("--overwrite", action="store_true", help="replace FISHER_DIR if medmerge wrote it")
    fisher.add_argument("--quiet", action="store_true", help="no progress lines")
    fisher.set_defaults(func=cmd_fisher)

    tall = sub.add_parser(
        "tall", help="TALL masks: keep one merged model and restore each task's model from it"
    ).add_subparsers(dest="tall_command", required=True, metavar="ACTION")
    masks = tall.add_parser(
        "masks",
        help="write each task's TALL mask against a merged model (one bit per weight and task)",
        description="m_t = 1{|τ_t| ≥ λ·|τ_MTL − τ_t|} with τ_t = θ_t − θ_base and τ_MTL = θ_merged − θ_base (Wang et "
        "al., ICML 2024): where task t's own change dominates what the merge added for the others. MASKS_DIR holds "
        "the packed masks and tall_masks.json (each mask's share of kept entries, the merged model's fingerprint).",
    )
    masks.add_argument("merged", help="the merged model (directory or hub id)")
    masks.add_argument("--base", required=True, help="the model the tasks were fine-tuned from")
    masks.add_argument(
        "--model", action="append", required=True, metavar="NAME=MODEL", help="a task and its model (repeatable)"
    )
    masks.add_argument(
        "--lambda",
        dest="tall_lambda",
        type=float,
        default=0.4,
        help="λ for every task (default 0.4; the paper picks it per task from 0.2-0.6 on validation)",
    )
    masks.add_argument("-o", "--out", dest="out_dir", required=True, help="output directory (MASKS_DIR)")
    masks.add_argument("--overwrite", action="store_true", help="replace MASKS_DIR if medmerge wrote it")
    masks.add_argument("--quiet", action="store_true", help="no summary lines")
    masks.set_defaults(func=cmd_tall_masks)
    restore = tall.add_parser(
        "restore",
        help="restore one task's model: θ_base + m_t ⊙ (θ_merged − θ_base)",
        description="Write task NAME's model from the merged model and its TALL mask, with the merged model's "
        "config and tokenizer; the merged model must be the one the masks were made from (checked).",
    )
    restore.add_argument("merged", help="the merged model the masks were made from")
    restore.add_argument("masks", help="MASKS_DIR from `medmerge tall masks`")
    restore.add_argument("--task", required=True, help="the task to restore")
    restore.add_argument("--base", help="the base model (default: the one the masks record)")
    restore.add_argument("-o", "--out", dest="out_dir", required=True, help="output model directory")
    restore.add_argument("--overwrite", action="store_true", help="replace the output if medmerge wrote it")
    restore.add_argument("--quiet", action="store_true", help="no summary line")
    restore.set_defaults(func=cmd_tall_restore)


MOE_ACTIONS = ("build", "train-router", "-h", "--help")


def _moe_shorthand(argv: list[str]) -> list[str]:
    """`medmerge moe CONFIG OUT_DIR` -> `medmerge moe build CONFIG OUT_DIR`."""
    if len(argv) > 1 and argv[0] == "moe" and argv[1] not in MOE_ACTIONS:
        return ["moe", "build", *argv[1:]]
    return argv


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by `timeout`, SLURM, `docker stop`), handled like Ctrl-C: outputs in progress are removed."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signum)


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Import torch and the libraries around it: signals held back (`interrupts_held`) and Python's cycle collector
    paused. The imports create hundreds of thousands of long-lived objects, and collecting over them as they come
    cost about 0.25 s of every command (`import merge.run`: 1.72 -> 1.46 s, medians of eight); they are frozen
    afterwards (`gc.freeze`), so that later collections skip them too."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with interrupts_held():
            yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while heavy C extensions initialise, and deliver them when the block ends.

    torch runs Python code from C++ while it is imported: a KeyboardInterrupt raised in there cannot unwind
    through C++ and aborts the process ("terminate called after throwing ... KeyboardInterrupt")."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, _frame: caught.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:
        raise Terminated(caught[0]) if caught[0] == signal.SIGTERM else KeyboardInterrupt


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with _sigterm_as_interrupt():
            args = build_parser().parse_args(_moe_shorthand(list(sys.argv[1:] if argv is None else argv)))
            func: Callable[[argparse.Namespace], int] = args.func
            return func(args)
    except UserError as exc:
        for problem in exc.problems:
            print(f"medmerge: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("medmerge: interrupted; nothing was left half-written", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
