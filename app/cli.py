"""The `dstudio` command line: teacher training, sampling and distillation on any diffusers pipeline."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

class UsageError(Exception):
    """Bad command-line usage: printed as one line, exit code 2 (like every distill.core.errors.UserError)."""


def _int_at_least(name, low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        return value

    return parse


def _positive_int(name):
    return _int_at_least(name, 1)


def _non_negative_int(name):
    return _int_at_least(name, 0)


# --- teacher train / distill ------------------------------------------------------------------------
def _train(method_name: str, args, teacher_source: str | None) -> Path:
    import torch

    from dstudio.distill.core.config import from_dict, load_preset, merge_overrides, to_dict
    from dstudio.distill.core.io import check_writable
    from dstudio.distill.core.method import METHODS, get_method
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.core.trainer import (CHECKPOINT, Trainer, TrainerConfig, check_resume, check_run_folder,
                                              read_checkpoint)
    from dstudio.distill.data import load_data

    cls = get_method(method_name)
    if args.data is not None and not cls.needs_data:
        trains_on = cls.trains_on or "its own samples scored by the teacher (data-free)"
        raise UsageError(f"--data does not apply to method '{cls.name}': it trains on {trains_on}, not on images")
    raw = merge_overrides(load_preset(cls.name, args.preset, args.data or "mnist"), args.set or [])
    unknown = set(raw) - {"trainer", "method"}
    if unknown:
        raise UsageError(f"unknown config section(s) {sorted(unknown)}: use trainer: and method:")
    if args.steps is not None:
        raw.setdefault("trainer", {})["steps"] = args.steps
    if args.deterministic:
        raw.setdefault("trainer", {})["deterministic"] = True
    tcfg = from_dict(TrainerConfig, raw.get("trainer"), "trainer.")
    mraw = dict(raw.get("method") or {})
    fields = set(cls.Config.__dataclass_fields__)
    if args.data is not None and "data" in fields:
        mraw["data"] = args.data
    for flag, entry in method_flags(METHODS).items():
        key = entry["dest"]
        value = getattr(args, key, None)
        if value is None:
            continue
        if key not in fields:
            raise UsageError(f"{flag} does not apply to method '{cls.name}' (it has no method.{key})")
        mraw[key] = value
    mcfg = from_dict(cls.Config, mraw, "method.")
    out = check_writable(args.out)
    resolved = {"method_name": cls.name, "preset": args.preset, "teacher": teacher_source,
                "trainer": to_dict(tcfg), "method": to_dict(mcfg)}
    # run-folder and resume checks come before anything heavy is loaded (the Trainer repeats them)
    check_run_folder(out, args.resume, args.overwrite)
    if args.resume:
        check_resume(read_checkpoint(out / CHECKPOINT), cls.name, resolved, out)
    teacher = load_teacher(teacher_source) if cls.needs_teacher else None
    if teacher and teacher.kind == "text" and not cls.text_teachers:
        takes = sorted(n for n, c in METHODS.items() if c.text_teachers)
        raise UsageError(f"method '{cls.name}' takes class-conditional or unconditional teachers; for text-to-image "
                         f"teacher '{teacher.source}' use one of {', '.join(takes)}")
    data = None
    if cls.needs_data:
        channels, resolution = (teacher.pixel_shape[0], teacher.pixel_shape[-1]) if teacher else (1, mcfg.resolution)
        data = load_data(getattr(mcfg, "data", "mnist"), resolution, channels)
        if teacher:
            data = teacher.to_model_space(data)
    torch.manual_seed(tcfg.seed)
    method = cls(mcfg, teacher=teacher, data=data)
    trainer = Trainer(method, tcfg, out, data=data, resolved_config=resolved)
    pipeline = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    print(f"exported {pipeline}")
    if cls.is_distiller and teacher.kind != "text" and args.eval_per_class:
        from dstudio.distill.evaluation.compare import compare, summary
        from dstudio.distill.core.io import save_json

        result = compare(teacher_source, pipeline, per_class=args.eval_per_class)
        result["collapse_warnings"] = trainer.collapse_warnings
        save_json(result, out / "eval.json")
        print(summary(result))
        if trainer.collapse_warnings:
            print(f"dstudio: warning: the student's samples looked collapsed during training "
                  f"({'; '.join(trainer.collapse_warnings)})", file=sys.stderr)
    return pipeline


def cmd_teacher_train(args) -> None:
    _train("ddpm", args, None)


def cmd_distill(args) -> None:
    _train(args.method, args, args.teacher)


def cmd_app(args) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError('the app needs Gradio: pip install -e ".[app]"') from None
    from dstudio.app.studio import launch

    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not (sep and user and password):
            raise UsageError("--auth must look like user:password")
        auth = (user, password)
    if args.host is not None and auth is None:
        raise UsageError(f"--host {args.host} opens the app (which runs jobs and reads folders) to other machines: "
                         "give --auth user:password too")
    for folder in args.teacher or []:
        if not (Path(folder) / "model_index.json").is_file():
            raise UsageError(f"--teacher '{folder}' is not a diffusers pipeline folder (no model_index.json)")
    launch(args.port, args.runs, host=args.host or "127.0.0.1", auth=auth, teachers=tuple(args.teacher or ()))


def load_scheduler(folder: str):
    """A scheduler folder written by save_pretrained: dstudio's own classes or any diffusers scheduler."""
    import json

    import diffusers

    from dstudio import samplers

    path = Path(folder)
    config = path / "scheduler_config.json"
    if not config.is_file():
        raise UsageError(f"scheduler folder '{folder}' has no scheduler_config.json")
    try:
        name = json.loads(config.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError):
        raise UsageError(f"scheduler folder '{folder}' has a corrupt scheduler_config.json") from None
    cls = getattr(samplers, name, None) or getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UsageError(f"scheduler class '{name}' in '{folder}' is neither a dstudio nor a diffusers scheduler")
    try:
        return cls.from_pretrained(path)
    except ValueError as e:
        raise UsageError(f"scheduler folder '{folder}': {e}") from None


# --- sample -----------------------------------------------------------------------------------------
def cmd_sample(args) -> None:
    import diffusers
    import torch

    from dstudio.distill.core.export import provenance
    from dstudio.distill.core.images import save_grid, save_pngs
    from dstudio.distill.core.io import check_writable, save_json
    from dstudio.distill.core.teacher import load_pipeline, teacher_from_pipeline

    out = check_writable(args.out)
    if args.grid:
        check_writable(Path(args.grid).parent)
    source = args.pipeline or args.teacher
    pipe = load_pipeline(source)
    teacher = teacher_from_pipeline(pipe, str(source))
    if args.scheduler_name:
        name = args.scheduler_name
        from dstudio.app.benchmark import STOCK_SCHEDULERS

        if name not in STOCK_SCHEDULERS:
            raise UsageError(f"unknown scheduler '{name}': use one of {', '.join(STOCK_SCHEDULERS)}")
        if teacher.denoiser.prediction_type == "flow":
            raise UsageError(f"pipeline '{source}' is a flow-matching model: the stock --scheduler choices are DDPM-family "
                             f"schedulers; it samples with its own FlowMatchEulerDiscreteScheduler (omit --scheduler)")
        pipe.scheduler = getattr(diffusers, STOCK_SCHEDULERS[name]).from_config(pipe.scheduler.config)
    if args.scheduler_dir:
        if args.scheduler_name:
            raise UsageError("give --scheduler or --scheduler-dir, not both")
        pipe.scheduler = load_scheduler(args.scheduler_dir)
    if args.class_label is not None:
        teacher.check_class(args.class_label)
    if teacher.kind == "text" and not args.prompt:
        raise UsageError(f"pipeline '{source}' is text-to-image: give --prompt")

    generator = torch.Generator().manual_seed(args.seed)
    done, grid_images = 0, []
    while done < args.num_images:
        n = min(args.batch_size, args.num_images - done)
        if teacher.kind == "text":
            images = pipe(prompt=[args.prompt] * n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          generator=generator, output_type="pt").images
        else:
            labels = None
            if teacher.kind == "class":
                # equal, contiguous blocks of classes: image i has class i * classes // num_images
                labels = (torch.full((n,), args.class_label) if args.class_label is not None
                          else torch.arange(done, done + n) * teacher.num_classes // args.num_images)
            images = pipe(batch_size=n, class_labels=labels, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, generator=generator, output_type="pt").images
        save_pngs(images * 2 - 1, out, start=done)
        grid_images.append(images * 2 - 1)
        done += n
        print(f"\r{done}/{args.num_images} images", end="", file=sys.stderr)
    print(file=sys.stderr)
    save_json(provenance(pipeline=str(source), scheduler=type(pipe.scheduler).__name__, steps=args.steps,
                         guidance=args.guidance, seed=args.seed, class_label=args.class_label,
                         num_images=args.num_images), out / "samples.json")
    if args.grid:
        per_row = args.num_images // teacher.num_classes if teacher.kind == "class" and args.class_label is None \
            else int(args.num_images ** 0.5)
        save_grid(torch.cat(grid_images), args.grid, nrow=max(per_row, 1), upscale=4)
        print(f"wrote grid {args.grid}")
    print(f"wrote {args.num_images} images to {out}")


# --- fid ----------------------------------------------------------------------------------------------
def cmd_fid(args) -> None:
    from dstudio.distill.evaluation.fid import fid_of_folder
    from dstudio.distill.core.io import check_writable, save_json

    for out in (args.json, args.save_ref_stats):
        if out:
            check_writable(Path(out).parent)
    result = fid_of_folder(args.images, args.ref, args.features, save_ref_stats=args.save_ref_stats)
    for name in result["skipped_corrupt"]:
        print(f"dstudio: warning: skipped corrupt image {name}", file=sys.stderr)
    if result["skipped_corrupt"]:
        print(f"dstudio: warning: {len(result['skipped_corrupt'])} corrupt image(s) skipped", file=sys.stderr)
    if "warning" in result:
        print(f"dstudio: warning: {result['warning']}", file=sys.stderr)
    if args.json:
        save_json(result, args.json)
    kid = "n/a" if result["kid"] is None else f"{result['kid']:.5f}"
    print(f"FID-{result['features']} {result['fid']:.4f}  KID {kid}  "
          f"({result['n_generated']} images vs {result['n_reference']} reference: {result['reference']})")
    if args.json:
        print(f"wrote {args.json}")


def cmd_report(args) -> None:
    from dstudio.app.report import build_report
    from dstudio.distill.core.io import check_writable

    check_writable(Path(args.out).parent)
    print(f"wrote {build_report(args.items, args.out)}")


def cmd_features_train(args) -> None:
    from dstudio.distill.evaluation.features import train_feature_net

    card = train_feature_net(epochs=args.epochs)
    print(f"mnist feature net: held-out accuracy {card['heldout_accuracy']:.4f} on {card['n_heldout']} images "
          f"never trained on (16 px round trip: {card['heldout_accuracy_16px']:.4f})")


# --- parser -----------------------------------------------------------------------------------------
# method options with their own flag, read from the config dataclasses' field metadata:
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
        return _int_at_least(flag, -sys.maxsize if low is None else low)
    if tp is float:
        return float
    return str


def _add_method_flags(p, flags: dict[str, dict]) -> None:
    for flag, entry in flags.items():
        p.add_argument(flag, dest=entry["dest"], type=entry["type"], default=None, help=entry["help"])


def _add_train_args(p, default_out: str) -> None:
    p.add_argument("--preset", default="quick", help="a preset name from configs/ (quick, full) or a YAML file")
    p.add_argument("--data", default=None, help="mnist, digits or an image folder (default: the preset's)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=None, help="override trainer.steps")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.batch_size=32 --set method.lr=2e-4")
    p.add_argument("--out", default=default_out, help="run folder: config, checkpoint, sample grids, pipeline/")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a run (its checkpoint, pipeline, log, samples go)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (torch.use_deterministic_algorithms): same seed, same student")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`dstudio: error: ...`, exit 2) instead of usage dumps."""

    def error(self, message):
        self.exit(2, f"dstudio: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from dstudio.app.benchmark import STOCK_SCHEDULERS
    from dstudio.distill.core.method import discover
    from dstudio.distill.evaluation.spaces import FEATURES

    methods = discover()
    parser = Parser(prog="dstudio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    teacher = sub.add_parser("teacher", help="train the embedded teacher").add_subparsers(
        dest="action", required=True, parser_class=Parser)
    tt = teacher.add_parser("train", help="train a class-conditional DDPM teacher on MNIST-5k (or --data)")
    _add_train_args(tt, "runs/teacher")
    tt.set_defaults(func=cmd_teacher_train)

    distillers = sorted(n for n, c in methods.items() if c.is_distiller)
    dp = sub.add_parser("distill", help="distill a teacher into a fast student")
    dp.add_argument("method", help=f"one of: {', '.join(distillers) or '(none yet)'}")
    dp.add_argument("--teacher", default=None, help="pipeline folder or hub id (default: the shipped MNIST teacher)")
    dp.add_argument("--eval-per-class", type=_non_negative_int("--eval-per-class"), default=100,
                    help="after training, FID and speed of teacher (50 DDIM steps) vs student on this many images "
                         "per class (0: skip)")
    _add_train_args(dp, "runs/distill")
    _add_method_flags(dp, method_flags(methods))
    dp.set_defaults(func=cmd_distill)

    sp = sub.add_parser("sample", help="draw images from a teacher or an exported student")
    sp.add_argument("--teacher", default=None, help="pipeline folder or hub id (default: the shipped MNIST teacher)")
    sp.add_argument("--pipeline", default=None, help="same as --teacher, for exported students")
    sp.add_argument("--steps", type=_positive_int("--steps"), default=None,
                    help="number of inference steps (default: the scheduler's own, 50 for stock ones)")
    sp.add_argument("--scheduler", dest="scheduler_name", default=None,
                    help=f"replace the pipeline's scheduler: {', '.join(STOCK_SCHEDULERS)}")
    sp.add_argument("--scheduler-dir", default=None, help="a saved scheduler folder (e.g. a searched schedule)")
    sp.add_argument("--class", dest="class_label", type=int, default=None, help="class label (default: all classes in turn)")
    sp.add_argument("--prompt", default=None, help="prompt, for text-to-image pipelines")
    sp.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--num-images", type=_positive_int("--num-images"), default=16)
    sp.add_argument("--batch-size", type=_positive_int("--batch-size"), default=100)
    sp.add_argument("--out", default="samples", help="folder for the PNGs")
    sp.add_argument("--grid", default=None, help="also write one PNG grid (one row per class) to this file")
    sp.set_defaults(func=cmd_sample)

    fp = sub.add_parser("fid", help="FID (and KID) of an image folder against a reference, through clean-fid")
    fp.add_argument("--images", required=True, help="folder of generated images")
    fp.add_argument("--ref", default="mnist", help="mnist (MNIST-5k statistics, cached), a .npz statistics file or a folder")
    fp.add_argument("--features", default="mnist", choices=FEATURES,
                    help="feature space: inception (standard; downloads once), mnist (offline digit classifier) or "
                         "pixels (raw grayscale pixels: speckle, salt noise, texture)")
    fp.add_argument("--json", default=None, help="also write the result JSON here")
    fp.add_argument("--save-ref-stats", default=None, metavar="FILE.npz",
                    help="save the reference statistics (mu, sigma, features) for later --ref FILE.npz")
    fp.set_defaults(func=cmd_fid)

    from dstudio.samplers.samplers import SOLVERS

    se = sub.add_parser("search", help="AutoDiffusion: evolutionary search of time steps (and skipped blocks)")
    se.add_argument("--teacher", default=None, help="pipeline folder or hub id (default: the shipped MNIST teacher)")
    se.add_argument("--nfe", type=int, default=4, help="number of steps (network evaluations) to search for")
    se.add_argument("--solver", nargs="+", default=["unipc-2", "unipc-3", "dpmpp-2m", "dpmpp-3m"],
                    choices=list(SOLVERS),
                    help="solvers the search may pick (part of each candidate); default: the best stock ones")
    se.add_argument("--skip-blocks", action="store_true", help="stage two: also search per-step skipped UNet blocks")
    se.add_argument("--skip-budget", type=float, default=0.3,
                    help="stage two: the share of --nfe's compute to save (budget: nfe x (1 - this) full forwards, "
                         "reached gradually; 0 trades skipped blocks for extra steps at --nfe's compute)")
    se.add_argument("--max-steps", type=_positive_int("--max-steps"), default=None,
                    help="stage two: the most steps a candidate may take within the budget (default: --nfe + 1)")
    se.add_argument("--ref", default="mnist", help="FID reference: mnist, a .npz statistics file or an image folder")
    se.add_argument("--features", default="mnist", choices=FEATURES, help="the fitness's FID feature space")
    se.add_argument("--init", default=None, help="a search.json whose best candidate seeds the population")
    se.add_argument("--num-samples", type=_positive_int("--num-samples"), default=1000,
                    help="images the leaders are re-scored on (fixed noise)")
    se.add_argument("--screen-samples", type=_positive_int("--screen-samples"), default=250,
                    help="images every candidate is first scored on (successive halving)")
    se.add_argument("--promote", type=_positive_int("--promote"), default=3,
                    help="per generation, the best this many screened candidates are re-scored on --num-samples")
    se.add_argument("--speed-images", type=_positive_int("--speed-images"), default=250,
                    help="stage two: images the exported pipeline/ is timed on, with and without its skips")
    se.add_argument("--population", type=_positive_int("--population"), default=20)
    se.add_argument("--generations", type=_positive_int("--generations"), default=6)
    se.add_argument("--top-k", type=_positive_int("--top-k"), default=10)
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--out", default="runs/search")
    se.add_argument("--resume", action="store_true", help="continue after the last complete generation")
    se.add_argument("--overwrite", action="store_true", help="start over in a folder that holds a search")
    se.set_defaults(func=lambda a: __import__("dstudio.app.search_cli", fromlist=["cmd_search"]).cmd_search(a))

    rp = sub.add_parser("report", help="one self-contained HTML page from runs and result JSONs")
    rp.add_argument("items", nargs="+", metavar="RUN_OR_RESULT", help="run folders and/or result .json files")
    rp.add_argument("--out", default="report.html")
    rp.set_defaults(func=cmd_report)

    ap = sub.add_parser("app", help="the studio in the browser: compare pipelines, FID board, start runs")
    ap.add_argument("--port", type=_positive_int("--port"), default=7860)
    ap.add_argument("--runs", default="runs", help="folder searched for exported pipelines, schedules and results")
    ap.add_argument("--teacher", action="append", metavar="DIR",
                    help="a pipeline folder the page may compare and distill from (repeatable; the page reads no "
                         "folder outside --runs and these)")
    ap.add_argument("--host", default=None,
                    help="address to bind instead of 127.0.0.1 (e.g. 0.0.0.0); needs --auth")
    ap.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login (Gradio auth)")
    ap.set_defaults(func=cmd_app)

    ft = sub.add_parser("features", help="the offline mnist feature net").add_subparsers(
        dest="action", required=True, parser_class=Parser)
    ftt = ft.add_parser("train", help="train the mnist feature net and record its held-out accuracy")
    ftt.add_argument("--epochs", type=_positive_int("--epochs"), default=12)
    ftt.set_defaults(func=cmd_features_train)

    sub.add_parser("methods", help="list the registered methods").set_defaults(
        func=lambda a: print("\n".join(f"{n}\t{(c.__doc__ or '').strip().splitlines()[0]}"
                                       for n, c in sorted(methods.items()))))
    return parser


def main(argv: list[str] | None = None) -> int:
    from dstudio.distill.core.errors import UserError
    from dstudio.distill.core.signals import Stopped
    from dstudio.distill.core.trainer import DivergenceError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error, already printed as one line (2)
        return e.code
    try:
        args.func(args)
    except (UsageError, UserError, FileNotFoundError, PermissionError) as e:
        print(f"dstudio: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # a signal: the state is saved
        if os.environ.get("RANK", "0") == "0":
            print(f"dstudio: {e}", file=sys.stderr)
        return e.code
    except DivergenceError as e:
        print(f"dstudio: diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dstudio: interrupted; the last checkpoint is kept, rerun with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
