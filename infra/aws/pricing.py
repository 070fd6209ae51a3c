"""On-demand prices from the dated table shipped with gpuflow (``infra/prices.json``).

The AWS Pricing API needs extra permissions, a us-east-1 endpoint and pages of
JSON per query; a small dated table of list prices for the GPU types people
train on is enough for a cost estimate and works offline.  Spot prices come
from ``describe_spot_price_history`` (see the provisioner).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PRICES_PATH = Path(__file__).resolve().parent.parent / "prices.json"


@dataclass(frozen=True)
class PriceTable:
    as_of: str
    region: str
    on_demand: dict[str, float]

    def on_demand_price(self, instance_type: str) -> float | None:
        """$/h of one on-demand instance (us-east-1 list price), None if not in the table."""
        return self.on_demand.get(instance_type)


def load_price_table(path: Path = PRICES_PATH) -> PriceTable:
    document = json.loads(path.read_text(encoding="utf-8"))
    return PriceTable(
        as_of=str(document["as_of"]),
        region=str(document["region"]),
        on_demand={name: float(price) for name, price in document["on_demand"].items()},
    )
