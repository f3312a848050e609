"""BENCHMARKS.md table A as data: every setting of the classical benchmark, the
methods run on it with their parameters, and DAPPER's reference figure for each.

Used by ``bench_classical.py`` (our filters) and ``bench_classical_dapper.py`` (the
same settings run by DAPPER side by side).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # etkf / enkf / enkf-n / letkf / pf / clim / oi / var3d
    n: int = 0
    opts: dict = field(default_factory=dict)
    ref: str = ""


@dataclass(frozen=True)
class Setting:
    system: str  # l96 / l63
    obs: str  # identity / every4 / arctan / cubic
    sigma2: float  # observation noise variance
    dko: int  # model steps per observation
    cycles: int
    burn_in: int
    methods: tuple[Method, ...]


def _pf(n: int, reg: float, ner: float, d: int, ref: str) -> Method:
    # DAPPER's PartFilt: resample when ESS < NER * N, then jitter with
    # reg * N^(-1/(d+4)) (Silverman bandwidth) times the weighted covariance.
    return Method(
        f"bootstrap PF N={n} reg {reg} NER {ner}",
        "pf",
        n,
        {"threshold": ner, "jitter": reg * n ** (-1.0 / (d + 4))},
        ref,
    )


SETTINGS: dict[str, Setting] = {
    "L96-std": Setting(
        "l96",
        "identity",
        1.0,
        1,
        5000,
        500,
        (
            Method("climatology", "clim", ref="3.63"),
            Method("optimal interpolation", "oi", ref="0.946"),
            Method("3D-Var xB=0.02", "var3d", opts={"xB": 0.02}, ref="0.414"),
            Method("EnKF-sqrt (ETKF) N=40 infl 1.02", "etkf", 40, {"inflation": 1.02}, "0.177"),
            Method(
                "LETKF N=7 loc 4 infl 1.04", "letkf", 7, {"inflation": 1.04, "radius": 4.0}, "0.215"
            ),
            _pf(3000, 0.7, 0.5, 40, "0.249"),
            # same filter as DAPPER's PartFilt, tuned within its options (reg 0.6 lost
            # seed 2 of 3 from DAPPER's X0)
            _pf(3000, 0.6, 0.5, 40, "0.249"),
            _pf(3000, 0.65, 0.5, 40, "0.249"),
        ),
    ),
    "L96-sparse": Setting(
        "l96",
        "every4",
        1.0,
        1,
        5000,
        500,
        (
            Method("optimal interpolation", "oi", ref="2.99"),
            Method(
                "EnKF-sqrt (ETKF) N=40 infl 1.10",
                "etkf",
                40,
                {"inflation": 1.10},
                "1.55-1.81 (2/10 div.)",
            ),
            Method(
                "LETKF N=40 loc 3 infl 1.05",
                "letkf",
                40,
                {"inflation": 1.05, "radius": 3.0},
                "0.89-0.96",
            ),
            # with the listed inflations DAPPER 1.7.1 itself loses these truths (see
            # classical_dapper.md); these two are re-tuned here on seed 0
            Method("EnKF-sqrt (ETKF) N=40 infl 1.05 (tuned)", "etkf", 40, {"inflation": 1.05}),
            Method(
                "LETKF N=40 loc 3 infl 1.02 (tuned)",
                "letkf",
                40,
                {"inflation": 1.02, "radius": 3.0},
            ),
            _pf(3000, 0.7, 0.5, 40, "5.0 (lost)"),
        ),
    ),
    "L96-sparse-long": Setting(
        "l96",
        "every4",
        1.0,
        3,
        5000,
        500,
        (
            Method(
                "EnKF-sqrt (ETKF) N=40 infl 1.15", "etkf", 40, {"inflation": 1.15}, "2.3 (all lost)"
            ),
            Method(
                "LETKF N=40 loc 3 infl 1.05",
                "letkf",
                40,
                {"inflation": 1.05, "radius": 3.0},
                "1.47-1.49",
            ),
        ),
    ),
    "L96-arctan": Setting(
        "l96",
        "arctan",
        0.05**2,
        2,
        5000,
        500,
        (
            Method("EnKF-sqrt (ETKF) N=40 infl 1.02", "etkf", 40, {"inflation": 1.02}, "0.032"),
            Method(
                "LETKF N=40 loc 4 infl 1.02",
                "letkf",
                40,
                {"inflation": 1.02, "radius": 4.0},
                "0.040",
            ),
        ),
    ),
    "L63-std": Setting(
        "l63",
        "identity",
        2.0,
        25,
        2000,
        200,
        (
            Method("climatology", "clim", ref="7.6 (DAPPER doc)"),
            Method("optimal interpolation", "oi", ref="1.25 (DAPPER doc)"),
            # DAPPER's sakov2012.py lists 0.65 for exactly this EnKF and 0.60 for the ETKF
            # with rot=True; BENCHMARKS.md's "EnKF N=10 0.57" names no flavour
            Method("EnKF (pert. obs) N=10 infl 1.04", "enkf", 10, {"inflation": 1.04}, "0.65"),
            Method("EnKF-sqrt (ETKF) N=10 infl 1.02", "etkf", 10, {"inflation": 1.02}, "0.60"),
            Method(
                "EnKF-sqrt (ETKF) N=10 infl 1.02 rot",
                "etkf",
                10,
                {"inflation": 1.02, "rotate": True},
                "0.60 (DAPPER doc)",
            ),
            Method("EnKF-N N=10 rot", "enkf-n", 10, {"rotate": True}, "0.54 (DAPPER doc); 0.57"),
            Method("EnKF-N N=10", "enkf-n", 10, {}, "0.57"),
            _pf(100, 2.4, 0.3, 3, "0.38"),
            _pf(4000, 0.7, 0.05, 3, "0.26"),
        ),
    ),
    "L63-cubic": Setting(
        "l63",
        "cubic",
        8.0,
        25,
        2000,
        200,
        (
            Method(
                "EnKF-sqrt (ETKF) N=10 infl 1.02",
                "etkf",
                10,
                {"inflation": 1.02},
                "5e-4 when locked; EnKF N=10 lost 2-3/10",
            ),
            Method(
                "EnKF (pert. obs) N=10 infl 1.04",
                "enkf",
                10,
                {"inflation": 1.04},
                "EnKF N=10 lost 2-3/10",
            ),
            Method("EnKF-N N=10 rot", "enkf-n", 10, {"rotate": True}, "EnKF N=10 lost 2-3/10"),
            _pf(1000, 0.7, 0.3, 3, "PF N=1000 lost 6/10"),
            # stronger regularisation (DAPPER's L63 tuning for small N): tried on 10 seeds
            _pf(1000, 2.4, 0.3, 3, "PF N=1000 lost 6/10"),
            _pf(1000, 1.2, 0.5, 3, "PF N=1000 lost 6/10"),
            _pf(1000, 4.0, 0.5, 3, "PF N=1000 lost 6/10"),
        ),
    ),
}

L63_X0 = (1.509, -1.531, 25.46)
