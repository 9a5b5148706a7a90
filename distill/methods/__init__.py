"""Every method registers itself on import; adding a method is adding a module here."""
from dstudio.distill.methods import consistency, ddpm, dmd2, msd, rectified_flow, sim, slimflow  # noqa: F401
