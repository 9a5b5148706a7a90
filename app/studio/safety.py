"""What keeps the page safe: one-line refusals shown in the page, paths confined to the runs folder and the
--teacher folders, override values that name paths checked the same way, and job arguments checked by the CLI's
own parser before a job waits in the queue."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path


def check(condition: bool, message: str) -> None:
    """Refuse in the page (a Gradio error with `message`) unless `condition` holds."""
    import gradio as gr

    if not condition:
        raise gr.Error(message)


@contextlib.contextmanager
def as_page_errors():
    """The CLI's own one-line `dstudio: error: ...` for every UserError raised in the block."""
    import gradio as gr

    from dstudio.distill.core.errors import UserError

    try:
        yield
    except UserError as e:
        raise gr.Error(f"dstudio: error: {e}") from None


def confine(text: str, what: str, runs: Path, teachers: tuple[Path, ...]) -> Path:
    """`text` as a path (relative ones from `runs`) if it lies in `runs` or a --teacher folder (symlinks resolved)."""
    path = Path(text.strip()).expanduser()
    path = (path if path.is_absolute() else runs / path).resolve()
    check(any(path.is_relative_to(root) for root in (runs, *teachers)),
          f"{what} '{text.strip()}' is outside the folders this page may use: the runs folder {runs}"
          + "".join(f", {t}" for t in teachers) + " (give more with dstudio app --teacher DIR)")
    return path


def strings(value) -> list[str]:
    """Every string inside a YAML value (lists and mappings included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings(k) + strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in strings(v)]
    return []


def looks_like_path(leaf: str, runs: Path) -> bool:
    """A value a job (run from the runs folder) would open: a path, or a name that exists there."""
    return any(c in leaf for c in "/\\") or leaf.startswith(("~", ".")) or (runs / leaf).is_symlink() or \
        (runs / leaf).exists()


def check_override(text: str, runs: Path, teachers: tuple[Path, ...]) -> None:
    """A `--set KEY=VALUE` line: well formed, and every path inside its value confined."""
    from dstudio.distill.core.config import parse_override

    with as_page_errors():
        _, value = parse_override(text)
    for leaf in strings(value):
        if looks_like_path(leaf, runs):
            confine(leaf, f"path in --set {text}", runs, teachers)


def check_arguments(argv: list[str]) -> None:
    """Parse `argv` with the CLI's own parser; its one-line error is the page's."""
    import gradio as gr

    from dstudio.app.parser import build_parser

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            lines = stderr.getvalue().strip().splitlines()
            raise gr.Error(lines[-1] if lines else "dstudio: error: bad arguments") from None
