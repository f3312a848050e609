"""Per-cycle diagnostics of ``assim assimilate``: filter info (inner ESS of the dpf ...)
and the rank histogram of the truth in the analysis ensemble, with its PNG."""

from __future__ import annotations

from typing import Any

__all__ = ["Recorder", "plot_path", "rank_plot"]


class Recorder:
    """Wraps ``filt.cycle`` to keep each cycle's ``info`` and, with a truth, the rank of
    the truth in the analysis ensemble (weighted ensembles are resampled systematically
    for the ranks, with a generator of their own so the filter's random stream is
    unchanged)."""

    KEYS = {
        "min_inner_ess": "smallest ESS inside the diffusion chain (dpf)",
        "inner_resamples": "resamplings inside the diffusion chain (dpf)",
        "mean_local_ess": "mean over grid points of the local ESS (local dpf)",
    }

    def __init__(self, filt: Any, truth: Any, seed: int) -> None:
        import torch

        self.infos: list[dict] = []
        self.truth = truth
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.rank_counts = None
        inner = filt.cycle

        def cycle(world, ensemble, y, obs, generator=None):
            ens, info = inner(world, ensemble, y, obs, generator)
            self._record(ens, info)
            return ens, info

        filt.cycle = cycle

    def _record(self, ens: Any, info: dict) -> None:
        import torch

        from assim.metrics import rank_histogram
        from assim.smc import systematic

        k = len(self.infos)
        self.infos.append(info)
        if self.truth is None or not hasattr(ens, "log_w"):
            return
        n = ens.x.shape[0]
        idx = systematic(ens.log_w.cpu(), n, self.gen)
        members = ens.x.detach().cpu()[idx]
        truth = torch.as_tensor(self.truth[k])
        counts = rank_histogram(members, truth, generator=self.gen).counts
        self.rank_counts = counts if self.rank_counts is None else self.rank_counts + counts

    def rank_pvalue(self) -> float:
        import scipy.stats

        if self.rank_counts is None or self.rank_counts.sum() == 0:
            return float("nan")
        return float(scipy.stats.chisquare(self.rank_counts).pvalue)

    def add_to(self, ds: Any) -> None:
        """Per-cycle diagnostics present in any info, as ``(time,)`` variables."""
        import numpy as np

        for key, descr in self.KEYS.items():
            if not any(key in info for info in self.infos):
                continue
            v = np.array([float(info.get(key, np.nan)) for info in self.infos])
            ds[key] = ("time", v, {"long_name": descr, "units": "1"})
        if "ess" in ds:
            ds["ess"].attrs["long_name"] += " (outer ESS for the dpf)"


def plot_path(option: str | None, out: Any):
    from pathlib import Path

    if option is not None and option.lower() == "none":
        return None
    if option is not None:
        return Path(option)
    out = Path(out)
    return out.with_name(out.stem + "_rank.png")


def rank_plot(counts: Any, pvalue: float, path: Any, method: str) -> None:
    """Bar chart of the rank histogram, written atomically (:func:`assim.plot.save_figure`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from assim.plot import save_figure

    fig, ax = plt.subplots(figsize=(5, 3))
    n = len(counts)
    ax.bar(np.arange(n), counts, width=1.0, color="0.6", edgecolor="0.3")
    ax.axhline(counts.sum() / n, color="k", lw=0.8, ls="--", label="uniform")
    ax.set_xlabel("rank of the truth among the members")
    ax.set_ylabel("count (cycles x grid points)")
    ax.set_title(f"{method}: rank histogram, chi2 p = {pvalue:.2g}")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
