"""curate: Chinese-aware filters that sort greeting records into approved / doubtful / rejected, with reasons."""
from curate.config import ConfigError, CurateConfig, load_config
from curate.filters import Context, Verdict, build_filters
from curate.pipeline import Summary, curate_records, run

__all__ = ["ConfigError", "CurateConfig", "load_config", "Context", "Verdict", "build_filters", "Summary",
           "curate_records", "run"]
