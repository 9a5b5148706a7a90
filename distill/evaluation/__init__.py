"""Evaluation, below the app: the embedded benchmark protocol (`protocol`), the named feature spaces and their
extractors (`spaces`, `features`), feature statistics and reference sets (`stats`), FID/KID results (`fid`) and
the end-of-run teacher-vs-student comparison (`compare`). The CLI, the app, the search CLI and the benchmarks
import it; it imports only the core and the data sets."""
