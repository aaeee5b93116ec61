"""The probe: data-free Model-Dowser statistics and masks for one checkpoint (paper Sec. 3).

Owns, by stage: what is scored (`settings`: the settings and their checks, device and dtype;
`selection`: which weights), how passes are scheduled (`schedule`: batches per pass, the
activation store, resume), what a pass computes (`passes`: forward, backward, head and stem
statistics, the call trace; `statistics`: the hooks that record psi and a), how results are cut
and written (`cut`: masks, the distributed gather, the sidecar's info), the run's orchestration
(`run`: `ProbeRun`, `probe()`), and probe prompts and images (`prompts`).

May import: `dowser_tool.sidecar`, `dowser_tool.score`, `dowser_tool.model`, `dowser_tool.io`,
`dowser_tool.errors`.
"""

from ..compat import check_versions

check_versions()  # one warning line if transformers/peft lie outside the tested range

from .run import ProbeSettings, parse_size, probe

__all__ = ["ProbeSettings", "parse_size", "probe"]


def __getattr__(name):
    # `dowser_tool.probe` was one module before 0.2: its other names now live in `probe.run`.
    from .. import _moved
    from . import run

    return _moved.moved_attribute(__name__, run, name)
