"""`dstudio app`: the studio in the browser (Gradio Blocks). Compare pipelines row by row on the same noise,
browse every FID result with its Pareto front, and queue distillations or searches from the page.

Every method and search result appears through the registries and the run folders: no app code per method.
Paths typed into the page are confined to the runs folder and the --teacher folders given on the command line.
Modules, each importing only those before it: `safety` (refusals, path confinement, argument checks), `compare`
(pipelines and Compare rows), `board` (the FID board), `jobs` (the job queue), `state` (the Studio), `page`."""
from dstudio.app.studio.page import build_app, launch

__all__ = ["build_app", "launch"]
