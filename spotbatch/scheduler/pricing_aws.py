"""Refresh a prices file from AWS with boto3.

Spot: EC2 ``DescribeSpotPriceHistory`` for Linux/UNIX asked at one instant (now), which
AWS answers with the price in effect in each availability zone; the latest entry per
zone is kept and the zones are combined by ``spot_stat`` ("mean", the default, is what
a spread-out fleet pays on average; "min" is the cheapest zone).
On-demand: the Pricing API (its endpoint lives in us-east-1) ``GetProducts`` for
AmazonEC2 with Linux, shared tenancy, no pre-installed software, capacity status Used;
each PriceList entry is a JSON string whose OnDemand term holds the hourly USD price,
and whose product attributes hold the GPU count.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from spotbatch.scheduler.prices import InstancePrice

__all__ = ["PricingError", "refresh_prices", "spot_prices", "on_demand_prices", "aws_clients", "PRICING_REGION",
           "DEFAULT_TYPES"]

PRICING_REGION = "us-east-1"  # the Pricing API's endpoint for every region's prices
DEFAULT_TYPES = ("g4dn.xlarge", "g5.xlarge", "g5.12xlarge", "g6.xlarge", "g6e.xlarge", "p4d.24xlarge", "p5.48xlarge")
SpotStat = Literal["mean", "min"]


class PricingError(RuntimeError):
    """AWS gave no usable price; one line naming the type and the fix."""


def aws_clients(region: str) -> tuple[Any, Any]:
    """(ec2 in ``region``, pricing in us-east-1) from the default credential chain."""
    import boto3

    return boto3.client("ec2", region_name=region), boto3.client("pricing", region_name=PRICING_REGION)


def refresh_prices(types: Iterable[str], region: str, *, ec2: Any, pricing: Any,
                   spot_stat: SpotStat = "mean") -> dict[str, InstancePrice]:
    """Current on-demand and spot prices of ``types`` in ``region``."""
    wanted = sorted(set(types))
    spot = spot_prices(ec2, wanted, stat=spot_stat)
    on_demand = on_demand_prices(pricing, wanted, region)
    return {t: InstancePrice(t, on_demand_per_h=on_demand[t][0], spot_per_h=spot[t], gpus=on_demand[t][1],
                             region=region) for t in wanted}


def spot_prices(ec2: Any, types: list[str], *, stat: SpotStat = "mean",
                now: datetime | None = None) -> dict[str, float]:
    """{type: $/h}: the latest Linux/UNIX spot price per zone, combined over zones by ``stat``."""
    at = now or datetime.now(timezone.utc)
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    pages = ec2.get_paginator("describe_spot_price_history").paginate(
        InstanceTypes=types, ProductDescriptions=["Linux/UNIX"], StartTime=at, EndTime=at)
    for page in pages:
        for item in page["SpotPriceHistory"]:
            key = (item["InstanceType"], item["AvailabilityZone"])
            if key not in latest or item["Timestamp"] > latest[key][0]:
                latest[key] = (item["Timestamp"], float(item["SpotPrice"]))
    combine = statistics.fmean if stat == "mean" else min
    out = {}
    for itype in types:
        zones = [price for (t, _), (_, price) in latest.items() if t == itype]
        if not zones:
            raise PricingError(f"AWS has no Linux/UNIX spot price for {itype} in {ec2.meta.region_name}; "
                               f"check the type name or drop it from --types")
        out[itype] = combine(zones)
    return out


def on_demand_prices(pricing: Any, types: list[str], region: str) -> dict[str, tuple[float, int]]:
    """{type: ($/h, GPUs)} from the Pricing API for Linux, shared tenancy, in ``region``."""
    return {itype: _on_demand_one(pricing, itype, region) for itype in types}


def _on_demand_one(pricing: Any, itype: str, region: str) -> tuple[float, int]:
    filters = {"instanceType": itype, "regionCode": region, "operatingSystem": "Linux", "tenancy": "Shared",
               "preInstalledSw": "NA", "capacitystatus": "Used", "licenseModel": "No License required"}
    pages = pricing.get_paginator("get_products").paginate(
        ServiceCode="AmazonEC2", FormatVersion="aws_v1",
        Filters=[{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in filters.items()])
    for page in pages:
        for entry in page["PriceList"]:
            found = _hourly_usd(json.loads(entry) if isinstance(entry, str) else entry)
            if found is not None:
                return found
    raise PricingError(f"the AWS Pricing API lists no Linux shared-tenancy on-demand price for {itype} in {region}; "
                       f"check the type and --region")


def _hourly_usd(product: Mapping[str, Any]) -> tuple[float, int] | None:
    """(hourly USD, GPUs) from one PriceList product, or None if it has no hourly price."""
    attributes = product.get("product", {}).get("attributes", {})
    for term in product.get("terms", {}).get("OnDemand", {}).values():
        for dim in term.get("priceDimensions", {}).values():
            usd = float(dim.get("pricePerUnit", {}).get("USD", "0"))
            if dim.get("unit") == "Hrs" and usd > 0:
                return usd, int(attributes.get("gpu", "0") or 0)
    return None
