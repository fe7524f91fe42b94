"""Every robust rule by name: the one place a new rule class is registered."""

from __future__ import annotations

from hearthnet.fedlearn.rules.base import Rule
from hearthnet.fedlearn.rules.fedavg import FedAvg
from hearthnet.fedlearn.rules.geometric_median import GeometricMedian
from hearthnet.fedlearn.rules.krum import Krum
from hearthnet.fedlearn.rules.median import Median
from hearthnet.fedlearn.rules.multi_krum import MultiKrum
from hearthnet.fedlearn.rules.trimmed_mean import TrimmedMean

# Order is the order users see in help and error messages.
REGISTRY: dict[str, type[Rule]] = {
    cls.name: cls for cls in (FedAvg, TrimmedMean, Median, Krum, MultiKrum, GeometricMedian)
}
RULES: tuple[str, ...] = tuple(REGISTRY)
