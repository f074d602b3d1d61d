"""`baldro` command line: finetune, unlearn, eval, attack, show-config, summarize, report, demo.

Recipes are YAML files plus `key=value` overrides, e.g.
    baldro unlearn configs/unlearn/tofu.yaml objective=simnpo weighting=dv split=forget05 train.learning_rate=2e-5
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from baldro.errors import BaldroError

KINDS = ("finetune", "unlearn", "eval", "attack")  # validation.KINDS (not imported here: it would slow `baldro --help`)

EPILOG = "Overrides: KEY=VALUE (dotted, e.g. train.learning_rate=1e-5) or GROUP=CHOICE (objective=npo, weighting=dv, split=forget05)."


def _recipe_parser(sub, name: str, help: str):
    p = sub.add_parser(name, help=help, epilog=EPILOG)
    p.add_argument("config", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE or GROUP=CHOICE overrides")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baldro", description="Balanced LLM unlearning (BalDRO).")
    parser.add_argument(
        "--debug",
        "-v",
        "--verbose",
        dest="debug",
        action="store_true",
        help="debug logging, and full tracebacks instead of one-line errors",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _recipe_parser(sub, "finetune", "fine-tune a model on QA pairs (TOFU target/retain models)")
    _recipe_parser(sub, "unlearn", "unlearn a forget set with an objective under a weighting")
    _recipe_parser(sub, "eval", "evaluate a model on TOFU, MUSE or lm-evaluation-harness tasks (eval.benchmark)")
    _recipe_parser(
        sub, "attack", "relearning and quantization attacks on an unlearned model (model.path), sample by sample"
    )
    show = _recipe_parser(
        sub,
        "show-config",
        "print a recipe as resolved (groups, overrides, every default), checked as the run will check it",
    )
    show.add_argument(
        "--kind",
        choices=KINDS,
        default=None,
        help="the run the recipe is for (default: the recipe's folder, e.g. configs/unlearn/)",
    )

    s = sub.add_parser("summarize", help="recompute every aggregate of a per-sample eval log")
    s.add_argument("eval_json", help="TOFU_EVAL.json or MUSE_EVAL.json (ours or OpenUnlearning's)")
    s.add_argument("--reference", help="the retain/retrained model's eval log (forget quality, privleak)")
    s.add_argument("--out", help="write the summary JSON here")

    r = sub.add_parser("report", help="build report.md and plots from run folders")
    r.add_argument("run_dirs", nargs="+", help="run folders (unlearning runs, plus 'target'/'retain' runs)")
    r.add_argument("--out", default="report", help="output folder (default: report)")

    d = sub.add_parser("demo", help="offline BalDRO demo on a synthetic TOFU-format benchmark")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a tiny preset for tests (about a minute)")
    d.add_argument("--preset", choices=["quick", "default"], default=None, help="size preset")
    d.add_argument("--overwrite", action="store_true", help="delete a non-empty --out folder first")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command in ("finetune", "unlearn", "eval", "attack", "show-config"):
        from baldro.recipes.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "show-config":
            from baldro.recipes.config import as_recipe, dump_config
            from baldro.recipes.validation import validate

            recipe, kind = as_recipe(cfg), args.kind or _kind_of(args.config)
            if kind is None:
                raise BaldroError(
                    f"cannot tell which run {args.config} is for: give --kind {', '.join(KINDS[:-1])} or {KINDS[-1]}"
                )
            # The run's own checks (names, arguments, ranges, files, the output folder), not this machine's
            # hardware: a recipe for a GPU cluster can be shown on a laptop.
            validate(recipe, kind)
            print(dump_config(recipe), end="")
        elif args.command == "finetune":
            from baldro.recipes.finetune import run_finetune

            _say(f"baldro: fine-tuned model in {run_finetune(cfg) / 'model'}")
        elif args.command == "unlearn":
            from baldro.recipes.unlearn import run_unlearn

            _say(f"baldro: unlearned model in {run_unlearn(cfg) / 'model'}")
        elif args.command == "attack":
            from baldro.recipes.attack import run_attack

            _say(f"baldro: attacks in {run_attack(cfg)}")
        else:
            from baldro.recipes.evaluate import run_eval

            run_eval(cfg)
    elif args.command == "summarize":
        from baldro.eval.summarize import run_summarize

        run_summarize(args.eval_json, args.reference, args.out)
    elif args.command == "report":
        from baldro.report.build import report_main

        print(f"baldro: report in {report_main(args.run_dirs, args.out)}")
    elif args.command == "demo":
        from baldro.recipes.demo import run_demo

        run_demo(
            args.out,
            seed=args.seed,
            preset=args.preset or ("quick" if args.quick else "default"),
            overwrite=args.overwrite,
        )


def _kind_of(config_path: str) -> str | None:
    """finetune, unlearn or eval from the recipe's folder (configs/unlearn/tofu.yaml -> unlearn)."""
    from pathlib import Path

    folders = [part for part in Path(config_path).parts[:-1] if part in KINDS]
    return folders[-1] if folders else None


def _say(text: str) -> None:
    """Print once in a run of several processes (from the main one)."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(text)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 a problem with the input, the files or the run (one line on stderr naming
    it and the fix); 1 an internal error (one line; `--debug` shows the traceback); 130 interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command not in ("show-config", "summarize"):
            from baldro.progress import follow_terminal_policy

            follow_terminal_policy()
        run(args)
    except BaldroError as e:
        if args.debug:
            raise
        print(f"baldro {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system: permissions, a full disk, a path that is a file
        if args.debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(
            f"baldro {args.command}: error: {_one_line(e.strerror or e)}{where}: check the path, its permissions and "
            "free space",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"baldro {args.command}: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(
            f"baldro {args.command}: internal error: {type(e).__name__}: {_one_line(e)[:500]} (rerun with --debug "
            "for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
