"""The `dstudio` command line: teacher training, sampling and distillation on any diffusers pipeline.

The parser is dstudio.app.parser; each command's handler is here, named in HANDLERS by the parser's `run` key."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dstudio.app.errors import UsageError


# --- teacher train / distill ------------------------------------------------------------------------
def _method_options(cls, args) -> dict:
    """The method config keys given by their own flags (`--students 2`), each checked to apply to the method."""
    from dstudio.app.parser import method_flags
    from dstudio.distill.core.method import METHODS

    fields, options = set(cls.Config.__dataclass_fields__), {}
    for flag, entry in method_flags(METHODS).items():
        key = entry["dest"]
        value = getattr(args, key, None)
        if value is None:
            continue
        if key not in fields:
            raise UsageError(f"{flag} does not apply to method '{cls.name}' (it has no method.{key})")
        options[key] = value
    return options


def _train(method_name: str, args, teacher_source: str | None) -> Path:
    from dstudio.distill.core.method import get_method
    from dstudio.distill.core.run import RunRequest, prepare_run

    cls = get_method(method_name)
    run = prepare_run(RunRequest(cls.name, args.out, teacher_source, args.preset, args.data, args.set or [],
                                 _method_options(cls, args), args.steps, args.deterministic, args.resume,
                                 args.overwrite))
    pipeline = run.fit()
    print(f"exported {pipeline}")
    if cls.is_distiller and args.eval_per_class is None and not run.teacher.family.pixel_space:
        print("dstudio: note: no end-of-run FID for a latent teacher unless asked: --eval-per-class N draws 10 N "
              "images of teacher and student", file=sys.stderr)
    elif cls.is_distiller and args.eval_per_class != 0:
        args.eval_per_class = args.eval_per_class or 100
        _evaluate(run, args, teacher_source, pipeline)
    return pipeline


def _evaluate(run, args, teacher_source: str | None, pipeline: Path) -> None:
    """RUN/eval.json: the embedded protocol for pixel-space teachers; for latent families (family_compare) the same
    number of images on the run's prompts or class labels (the teacher at the method's guidance), against the run's
    image folder (--data) when FID can read it, else the teacher's own 50-step images."""
    import torch

    from dstudio.distill.core.io import save_json
    from dstudio.distill.evaluation.compare import compare, summary

    teacher, trainer = run.teacher, run.trainer
    if teacher.family.pixel_space:
        weights = next(teacher.network.parameters())  # the protocol runs in float32 on the CPU, as a folder loads
        reuse = weights.dtype == torch.float32 and weights.device.type == "cpu"
        result = compare(teacher.pipeline if reuse else teacher_source, pipeline, per_class=args.eval_per_class)
    else:
        from dstudio.distill.evaluation.family_compare import compare_family, data_reference
        from dstudio.distill.evaluation.protocol import NUM_CLASSES

        result = compare_family(teacher, pipeline, args.eval_per_class * NUM_CLASSES,
                                getattr(run.method, "prompts", None), ref=data_reference(args.data),
                                guidance=getattr(run.method.config, "guidance", 1.0))
    result["collapse_warnings"] = trainer.collapse_warnings
    save_json(result, run.out / "eval.json")
    print(summary(result))
    if trainer.collapse_warnings:
        print(f"dstudio: warning: the student's samples looked collapsed during training "
              f"({'; '.join(trainer.collapse_warnings)})", file=sys.stderr)


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
    if Path(args.runs).exists() and not Path(args.runs).is_dir():
        raise UsageError(f"--runs '{args.runs}' is not a folder: give the folder of runs (made when missing)")
    launch(args.port, args.runs, host=args.host or "127.0.0.1", auth=auth, teachers=tuple(args.teacher or ()))


# --- sample -----------------------------------------------------------------------------------------
def _check_condition(teacher, args, source) -> None:
    """--prompt for text-to-image pipelines, --class for class-conditional ones, neither for unconditional ones."""
    if args.class_label is not None:
        teacher.check_class(args.class_label)
    if teacher.takes_prompts and not args.prompt:
        raise UsageError(f"pipeline '{source}' is text-to-image: give --prompt")
    if args.prompt and not teacher.takes_prompts:
        takes = "class labels (--class)" if teacher.num_classes else "no condition"
        raise UsageError(f"--prompt '{args.prompt}' is for text-to-image pipelines; '{source}' takes {takes}")


def stock_from(cls, config):
    """A stock scheduler from a teacher's config, clip_sample as the config has it (no DDIM default clipping of
    latents from configs without the key, as SDXL's Euler and PixArt's DPM-Solver configs)."""
    import inspect

    takes_clip = "clip_sample" in inspect.signature(cls).parameters
    return cls.from_config(config, **({"clip_sample": bool(config.get("clip_sample"))} if takes_clip else {}))


def cmd_sample(args) -> None:
    import diffusers
    import torch

    from dstudio.app.schedulers import STOCK_SCHEDULERS, load_scheduler
    from dstudio.distill.core.export import provenance
    from dstudio.distill.core.images import save_grid, save_pngs
    from dstudio.distill.core.io import check_writable, save_json
    from dstudio.distill.core.method import GRID_CLASSES
    from dstudio.distill.core.teacher import load_pipeline, teacher_from_pipeline

    out = check_writable(args.out)
    if args.grid:
        check_writable(Path(args.grid).parent)
    source = args.pipeline or args.teacher
    pipe = load_pipeline(source)
    teacher = teacher_from_pipeline(pipe, str(source))
    if args.scheduler_name:
        name = args.scheduler_name
        if name not in STOCK_SCHEDULERS:
            raise UsageError(f"unknown scheduler '{name}': use one of {', '.join(STOCK_SCHEDULERS)}")
        if teacher.denoiser.prediction_type == "flow":
            raise UsageError(f"pipeline '{source}' is a flow-matching model: the stock --scheduler choices are DDPM-family "
                             f"schedulers; it samples with its own FlowMatchEulerDiscreteScheduler (omit --scheduler)")
        pipe.scheduler = stock_from(getattr(diffusers, STOCK_SCHEDULERS[name]), pipe.scheduler.config)
    if args.scheduler_dir:
        if args.scheduler_name:
            raise UsageError("give --scheduler or --scheduler-dir, not both")
        pipe.scheduler = load_scheduler(args.scheduler_dir)
    _check_condition(teacher, args, source)
    classes = min(teacher.num_classes, GRID_CLASSES)  # DiT's 1,000: the first ten
    generator = torch.Generator().manual_seed(args.seed)
    done, grid_images = 0, []
    while done < args.num_images:
        n = min(args.batch_size, args.num_images - done)
        labels = None
        if teacher.num_classes:  # equal, contiguous blocks of classes: image i has class i * classes // num_images
            labels = (torch.full((n,), args.class_label) if args.class_label is not None
                      else torch.arange(done, done + n) * classes // args.num_images)
        images = teacher.family.draw(n, args.steps, args.guidance, generator, prompts=[args.prompt] * n, labels=labels)
        save_pngs(images * 2 - 1, out, start=done)
        grid_images.append(images * 2 - 1)
        done += n
        print(f"\r{done}/{args.num_images} images", end="", file=sys.stderr)
    print(file=sys.stderr)
    save_json(provenance(pipeline=str(source), scheduler=type(pipe.scheduler).__name__, steps=args.steps,
                         guidance=args.guidance, seed=args.seed, class_label=args.class_label,
                         num_images=args.num_images), out / "samples.json")
    if args.grid:
        per_row = args.num_images // classes if classes and args.class_label is None \
            else int(args.num_images ** 0.5)
        save_grid(torch.cat(grid_images), args.grid, nrow=max(per_row, 1), upscale=4)
        print(f"wrote grid {args.grid}")
    print(f"wrote {args.num_images} images to {out}")


# --- fid ----------------------------------------------------------------------------------------------
def cmd_fid(args) -> None:
    from dstudio.distill.core.io import check_writable, save_json
    from dstudio.distill.evaluation.fid import fid_of_folder

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


def cmd_search(args) -> None:
    from dstudio.app.search_cli import cmd_search as search

    search(args)


def cmd_plan(args) -> None:
    from dstudio.app.plan_cli import cmd_plan as plan

    plan(args)


def cmd_methods(args) -> None:
    """The registered methods, then each method plugin that did not import, with its one-line error."""
    from dstudio.distill.core.method import BROKEN, discover

    methods = discover()
    lines = [f"{n}\t{(c.__doc__ or '').strip().splitlines()[0]}" for n, c in sorted(methods.items())]
    lines += [f"{source}\tplugin not loaded: {error}" for source, error in BROKEN.items()]
    print("\n".join(lines))


HANDLERS = {"teacher train": cmd_teacher_train, "distill": cmd_distill, "sample": cmd_sample, "fid": cmd_fid,
            "search": cmd_search, "plan": cmd_plan, "report": cmd_report, "app": cmd_app,
            "features train": cmd_features_train, "methods": cmd_methods}


def main(argv: list[str] | None = None) -> int:
    from dstudio.app.parser import build_parser
    from dstudio.distill.core.sharding import end_distributed, exit_distributed

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error, already printed as one line (2)
        return e.code
    try:
        code = _run(HANDLERS[args.run], args)
    except BaseException:  # a crash: leave the group, let the traceback print
        end_distributed(barrier=False)
        raise
    return exit_distributed(code)  # a distributed run's process ends here, with its status, on every rank


def _run(handler, args) -> int:
    """A command's exit status: 0, or its one-line error's."""
    from dstudio.distill.core.errors import UserError
    from dstudio.distill.core.signals import Stopped
    from dstudio.distill.core.trainer import DivergenceError

    try:
        handler(args)
    except (UserError, FileNotFoundError, PermissionError) as e:
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
