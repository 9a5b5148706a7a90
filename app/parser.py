"""The `dstudio` argument parser: one builder per command, argument types with one-line errors, and the method
flags read from the method configs. A command's handler is named by its `run` default and looked up by the CLI
(dstudio.app.cli.HANDLERS), so the parser imports no handler and the app can check a job's arguments with it."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = "The `dstudio` command line: teacher training, sampling and distillation on any diffusers pipeline."
TEACHER_HELP = "pipeline folder or hub id (default: the shipped MNIST teacher)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`dstudio: error: ...`, exit 2) instead of usage dumps."""

    def error(self, message):
        self.exit(2, f"dstudio: error: {message} (see '{self.prog} --help')\n")


# --- argument types: each names the option and the bad value ------------------------------------------
def int_at_least(name: str, low: int):
    """An integer option's parser: at least `low`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        return value

    return parse


def positive_int(name: str):
    return int_at_least(name, 1)


def non_negative_int(name: str):
    return int_at_least(name, 0)


def integer(name: str):
    return int_at_least(name, -sys.maxsize)


def number(name: str):
    """A real-valued option's parser (finite)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got '{text}'") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got '{text}'")
        return value

    return parse


# --- method options with their own flag -----------------------------------------------------------------
# read from the config dataclasses' field metadata:
# `students: int = field(default=4, metadata={"cli": "--students", "help": "...", "min": 1})`;
# `--students 2` is `--set method.students=2`
def method_flags(methods) -> dict[str, dict]:
    """flag -> {"dest": the config key, "type": its parser, "help": ..., "methods": [...]} over the given methods."""
    import dataclasses
    import typing

    flags: dict[str, dict] = {}
    for name, cls in sorted(methods.items()):
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            flag = f.metadata.get("cli")
            if not flag:
                continue
            parse = _flag_type(hints[f.name], flag, f.metadata.get("min"))
            entry = flags.setdefault(flag, {"dest": f.name, "type": parse, "helps": {}, "methods": []})
            if entry["dest"] != f.name:
                raise RuntimeError(f"flag {flag} names method.{entry['dest']} and method.{f.name} ({name})")
            entry["methods"].append(name)
            entry["helps"].setdefault(f.metadata.get("help", f"method.{f.name}"), []).append(name)
    for entry in flags.values():
        entry["help"] = "; ".join(f"{', '.join(names)}: {text}" for text, names in entry.pop("helps").items())
    return flags


def _flag_type(tp, flag: str, low):
    """The argparse type of a config field: integers (at least `low`), numbers, or the text as given."""
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `X | None`: the flag gives an X
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is int:
        return int_at_least(flag, -sys.maxsize if low is None else low)
    if tp is float:
        return number(flag)
    return str


# --- one builder per command ------------------------------------------------------------------------------
def _train_args(p, default_out: str) -> None:
    """The options `teacher train` and `distill` share."""
    p.add_argument("--preset", default="quick", help="a preset name from configs/ (quick, full) or a YAML file")
    p.add_argument("--data", default=None, help="mnist, digits or an image folder (default: the preset's)")
    p.add_argument("--steps", type=positive_int("--steps"), default=None, help="override trainer.steps")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.batch_size=32 --set method.lr=2e-4")
    p.add_argument("--out", default=default_out, help="run folder: config, checkpoint, sample grids, pipeline/")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a run (its checkpoint, pipeline, log, samples go)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (torch.use_deterministic_algorithms): same seed, same student")


def _teacher(sub) -> None:
    teacher = sub.add_parser("teacher", help="train the embedded teacher").add_subparsers(
        dest="action", required=True, parser_class=Parser)
    tt = teacher.add_parser("train", help="train a class-conditional DDPM teacher on MNIST-5k (or --data)")
    _train_args(tt, "runs/teacher")
    tt.set_defaults(run="teacher train")


def _distill(sub, methods) -> None:
    distillers = sorted(n for n, c in methods.items() if c.is_distiller)
    dp = sub.add_parser("distill", help="distill a teacher into a fast student")
    dp.add_argument("method", help=f"one of: {', '.join(distillers) or '(none yet)'}")
    dp.add_argument("--teacher", default=None, help=TEACHER_HELP)
    dp.add_argument("--eval-per-class", type=non_negative_int("--eval-per-class"), default=None,
                    help="after training, FID (mnist and pixels) and speed of teacher (50 DDIM steps) vs student on "
                         "this many images per class (0: skip; default: 100 for pixel teachers, skipped for latent "
                         "ones, whose 50-step teacher images cost hours at full size)")
    _train_args(dp, "runs/distill")
    for flag, entry in method_flags(methods).items():
        dp.add_argument(flag, dest=entry["dest"], type=entry["type"], default=None, help=entry["help"])
    dp.set_defaults(run="distill")


def _sample(sub) -> None:
    from dstudio.app.schedulers import STOCK_SCHEDULERS

    sp = sub.add_parser("sample", help="draw images from a teacher or an exported student")
    sp.add_argument("--teacher", default=None, help=TEACHER_HELP)
    sp.add_argument("--pipeline", default=None, help="same as --teacher, for exported students")
    sp.add_argument("--steps", type=positive_int("--steps"), default=None,
                    help="number of inference steps (default: the scheduler's own, 50 for stock ones)")
    sp.add_argument("--scheduler", dest="scheduler_name", default=None,
                    help=f"replace the pipeline's scheduler: {', '.join(STOCK_SCHEDULERS)}")
    sp.add_argument("--scheduler-dir", default=None, help="a saved scheduler folder (e.g. a searched schedule)")
    sp.add_argument("--class", dest="class_label", type=integer("--class"), default=None,
                    help="class label (default: all classes in turn)")
    sp.add_argument("--prompt", default=None, help="prompt, for text-to-image pipelines")
    sp.add_argument("--guidance", type=number("--guidance"), default=1.0,
                    help="classifier-free guidance scale (1 = off)")
    sp.add_argument("--seed", type=integer("--seed"), default=0)
    sp.add_argument("--num-images", type=positive_int("--num-images"), default=16)
    sp.add_argument("--batch-size", type=positive_int("--batch-size"), default=100)
    sp.add_argument("--out", default="samples", help="folder for the PNGs")
    sp.add_argument("--grid", default=None, help="also write one PNG grid (one row per class) to this file")
    sp.set_defaults(run="sample")


def _fid(sub) -> None:
    from dstudio.distill.evaluation.spaces import FEATURES

    fp = sub.add_parser("fid", help="FID (and KID) of an image folder against a reference, through clean-fid")
    fp.add_argument("--images", required=True, help="folder of generated images")
    fp.add_argument("--ref", default="mnist", help="mnist (MNIST-5k statistics, cached), a .npz statistics file or a folder")
    fp.add_argument("--features", default="mnist", choices=FEATURES,
                    help="feature space: inception (standard; downloads once), mnist (offline digit classifier) or "
                         "pixels (raw grayscale pixels: speckle, salt noise, texture)")
    fp.add_argument("--json", default=None, help="also write the result JSON here")
    fp.add_argument("--save-ref-stats", default=None, metavar="FILE.npz",
                    help="save the reference statistics (mu, sigma, features) for later --ref FILE.npz")
    fp.set_defaults(run="fid")


def _search_fitness(se) -> None:
    """`dstudio search`'s fitness options: reference, feature space and the images each candidate is scored on."""
    from dstudio.distill.evaluation.spaces import FEATURES

    se.add_argument("--ref", default=None,
                    help="FID reference: mnist, teacher (its own --ref-steps-step images on the same conditions, other "
                         "noise), a .npz statistics file or an image folder; default: mnist for pixel-space teachers, "
                         "teacher for latent ones (SD, SDXL, SD3, FLUX, PixArt, DiT)")
    se.add_argument("--ref-steps", type=positive_int("--ref-steps"), default=50,
                    help="--ref teacher: steps of the teacher's stock scheduler (DDIM trailing, or its Euler)")
    se.add_argument("--features", default=None, choices=FEATURES,
                    help="the fitness's FID feature space; default: mnist for pixel-space teachers, pixels for latent "
                         "ones (offline, any size)")
    se.add_argument("--prompts", default=None, metavar="FILE",
                    help="text-to-image teachers: a file with one prompt per line (image i gets prompt i mod their "
                         "count); class-conditional teachers cycle their labels")
    se.add_argument("--guidance", type=number("--guidance"), default=1.0,
                    help="classifier-free guidance scale the candidates and the teacher reference sample at")
    se.add_argument("--num-samples", type=positive_int("--num-samples"), default=1000,
                    help="images the leaders are re-scored on (fixed noise)")
    se.add_argument("--screen-samples", type=positive_int("--screen-samples"), default=250,
                    help="images every candidate is first scored on (successive halving)")
    se.add_argument("--promote", type=positive_int("--promote"), default=3,
                    help="per generation, the best this many screened candidates are re-scored on --num-samples")
    se.add_argument("--speed-images", type=positive_int("--speed-images"), default=250,
                    help="stage two: images the exported pipeline/ is timed on, with and without its skips")


def _search(sub) -> None:
    from dstudio.samplers.samplers import SOLVERS

    se = sub.add_parser("search", help="AutoDiffusion: evolutionary search of time steps (and skipped blocks)")
    se.add_argument("--teacher", default=None, help=TEACHER_HELP)
    se.add_argument("--nfe", type=integer("--nfe"), default=4, help="number of steps (network evaluations) to search for")
    se.add_argument("--solver", nargs="+", default=["unipc-2", "unipc-3", "dpmpp-2m", "dpmpp-3m"],
                    choices=list(SOLVERS),
                    help="solvers the search may pick (part of each candidate); default: the best stock ones")
    se.add_argument("--skip-blocks", action="store_true", help="stage two: also search per-step skipped UNet blocks")
    se.add_argument("--skip-budget", type=number("--skip-budget"), default=0.3,
                    help="stage two: the share of --nfe's compute to save (budget: nfe x (1 - this) full forwards, "
                         "reached gradually; 0 trades skipped blocks for extra steps at --nfe's compute)")
    se.add_argument("--max-steps", type=positive_int("--max-steps"), default=None,
                    help="stage two: the most steps a candidate may take within the budget (default: --nfe + 1)")
    se.add_argument("--init", default=None, help="a search.json whose best candidate seeds the population")
    _search_fitness(se)
    se.add_argument("--population", type=positive_int("--population"), default=20)
    se.add_argument("--generations", type=positive_int("--generations"), default=6)
    se.add_argument("--top-k", type=positive_int("--top-k"), default=10)
    se.add_argument("--seed", type=integer("--seed"), default=0)
    se.add_argument("--out", default="runs/search")
    se.add_argument("--resume", action="store_true", help="continue after the last complete generation")
    se.add_argument("--overwrite", action="store_true", help="start over in a folder that holds a search")
    se.set_defaults(run="search")


def _plan(sub) -> None:
    pp = sub.add_parser("plan", help="each method's memory on a teacher (full copies vs LoRA), before loading it")
    pp.add_argument("teacher", nargs="?", default=None, help=TEACHER_HELP + " (only its configs are read)")
    pp.add_argument("--method", default=None, help="one method (default: every distillation method)")
    pp.add_argument("--lora-rank", type=non_negative_int("--lora-rank"), default=64,
                    help="the LoRA variant's rank (0: full copies only)")
    pp.add_argument("--gpu-memory", default=None, metavar="SIZE", help="say whether each fits, e.g. 24GB")
    pp.add_argument("--batch-size", type=positive_int("--batch-size"), default=1, help="per-device batch")
    pp.add_argument("--resolution", type=positive_int("--resolution"), default=None,
                    help="image size in pixels (default: the pipeline's own)")
    pp.set_defaults(run="plan")


def _report(sub) -> None:
    rp = sub.add_parser("report", help="one self-contained HTML page from runs and result JSONs")
    rp.add_argument("items", nargs="+", metavar="RUN_OR_RESULT", help="run folders and/or result .json files")
    rp.add_argument("--out", default="report.html")
    rp.set_defaults(run="report")


def _app(sub) -> None:
    ap = sub.add_parser("app", help="the studio in the browser: compare pipelines, FID board, start runs")
    ap.add_argument("--port", type=positive_int("--port"), default=7860)
    ap.add_argument("--runs", default="runs", help="folder searched for exported pipelines, schedules and results")
    ap.add_argument("--teacher", action="append", metavar="DIR",
                    help="a pipeline folder the page may compare and distill from (repeatable; the page reads no "
                         "folder outside --runs and these)")
    ap.add_argument("--host", default=None,
                    help="address to bind instead of 127.0.0.1 (e.g. 0.0.0.0); needs --auth")
    ap.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login (Gradio auth)")
    ap.set_defaults(run="app")


def _features(sub) -> None:
    ft = sub.add_parser("features", help="the offline mnist feature net").add_subparsers(
        dest="action", required=True, parser_class=Parser)
    ftt = ft.add_parser("train", help="train the mnist feature net and record its held-out accuracy")
    ftt.add_argument("--epochs", type=positive_int("--epochs"), default=12)
    ftt.set_defaults(run="features train")


def build_parser() -> argparse.ArgumentParser:
    """Every command's sub-parser; the methods (and their flags) come from the registry."""
    from dstudio.distill.core.method import discover

    parser = Parser(prog="dstudio", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _teacher(sub)
    _distill(sub, discover())
    for add in (_sample, _fid, _search, _plan, _report, _app, _features):
        add(sub)
    sub.add_parser("methods", help="list the registered methods (and method plugins that did not import)"
                   ).set_defaults(run="methods")
    return parser
