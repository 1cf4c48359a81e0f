"""Distillers, each registered under its `--distiller` name."""

from pat_hf.distillers import (  # noqa: F401  (registration)
    bkd,
    correlation,
    crd,
    dist,
    dkd,
    fitnet,
    kd,
    ofa,
    pat,
    rkd,
    vanilla,
)
from pat_hf.distillers.base import (
    DISTILLERS,
    DistillArguments,
    DistillContext,
    Distiller,
    get_distiller_class,
    register_distiller,
)

__all__ = ["DISTILLERS", "DistillArguments", "DistillContext", "Distiller", "get_distiller_class",
           "register_distiller"]
