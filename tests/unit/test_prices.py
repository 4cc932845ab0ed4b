"""Prices: the YAML file, its errors, and the AWS refresh against botocore's Stubber."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber
from typer.testing import CliRunner

from spotbatch.cli import app
from spotbatch.scheduler import pricing_aws
from spotbatch.scheduler.prices import InstancePrice, PricesError, demo_prices, load_prices, save_prices

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prices.example.yaml"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    return path


def test_example_file_loads_and_says_it_is_an_example():
    prices = load_prices(EXAMPLE)
    assert {"g5.xlarge", "g6.xlarge", "p4d.24xlarge"} <= set(prices)
    assert prices["p4d.24xlarge"].gpus == 8
    assert all(p.spot_per_h < p.on_demand_per_h for p in prices.values())
    assert "EXAMPLE" in EXAMPLE.read_text().splitlines()[0]


def test_round_trip(tmp_path):
    prices = {"g5.xlarge": InstancePrice("g5.xlarge", 1.006, 0.3622, 1, "us-east-1"),
              "p4d.24xlarge": InstancePrice("p4d.24xlarge", 21.9576, 8.783, 8, "us-west-2")}
    save_prices(tmp_path / "p.yaml", prices, note="fetched today")
    assert load_prices(tmp_path / "p.yaml") == prices


def test_per_h_picks_the_pool_price():
    price = InstancePrice("g5.xlarge", 1.0, 0.3, 1, "us-east-1")
    assert (price.per_h("spot"), price.per_h("on-demand")) == (0.3, 1.0)
    with pytest.raises(ValueError, match="unknown pool"):
        price.per_h("reserved")


@pytest.mark.parametrize("text, words", [
    ("g5.xlarge: {on_demand_per_h: 1.0, spot_per_h: 0.3, gpus: 1}", ["g5.xlarge.region", "missing"]),
    ("g5.xlarge: {on_demand_per_h: 1.0, spot_per_h: 0.3, gpus: 1, region: r, zone: a}", ["g5.xlarge.zone", "valid keys"]),
    ("g5.xlarge: {on_demand_per_h: cheap, spot_per_h: 0.3, gpus: 1, region: r}", ["g5.xlarge.on_demand_per_h", "number"]),
    ("g5.xlarge: {on_demand_per_h: 1.0, spot_per_h: -1, gpus: 1, region: r}", ["g5.xlarge.spot_per_h", ">= 0"]),
    ("g5.xlarge: {on_demand_per_h: 1.0, spot_per_h: 0.3, gpus: 1.5, region: r}", ["g5.xlarge.gpus", "whole number"]),
    ("g5.xlarge: 1.0", ["g5.xlarge must be a mapping"]),
    ("note: only a note", ["no instance types"]),
    ("note: 3\ng5.xlarge: {on_demand_per_h: 1.0, spot_per_h: 0.3, gpus: 1, region: r}", ["'note' must be a string"]),
    ("- a list", ["expected a mapping"]),
    ("g5.xlarge: {on_demand_per_h: 1.0", ["not valid YAML"]),
])
def test_bad_files_give_one_line_naming_the_key(tmp_path, text, words):
    with pytest.raises(PricesError) as info:
        load_prices(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(PricesError, match="prices --refresh"):
        load_prices(tmp_path / "absent.yaml")


def test_demo_prices_are_labelled_illustrative():
    (price,) = demo_prices().values()
    assert price.instance_type == "local" and price.region == "illustrative"


# ---- AWS refresh (botocore Stubber; responses shaped like AWS's) ----------------------


def spot_item(itype: str, zone: str, price: str, age_min: int) -> dict:
    return {"AvailabilityZone": zone, "InstanceType": itype, "ProductDescription": "Linux/UNIX",
            "SpotPrice": price, "Timestamp": NOW - timedelta(minutes=age_min)}


def product(itype: str, usd: str, gpus: str) -> str:
    """One PriceList entry as the Pricing API returns it: a JSON *string*."""
    sku, term = "ABCDEFGH12345678", "JRTCKXETXF"
    return json.dumps({
        "product": {"productFamily": "Compute Instance", "sku": sku, "attributes": {
            "instanceType": itype, "gpu": gpus, "regionCode": "us-east-1", "operatingSystem": "Linux",
            "tenancy": "Shared", "capacitystatus": "Used", "preInstalledSw": "NA", "vcpu": "4"}},
        "serviceCode": "AmazonEC2",
        "terms": {"OnDemand": {f"{sku}.{term}": {
            "offerTermCode": term, "sku": sku, "effectiveDate": "2026-11-01T00:00:00Z", "termAttributes": {},
            "priceDimensions": {f"{sku}.{term}.6YS6EN2CT7": {
                "unit": "Hrs", "endRange": "Inf", "beginRange": "0", "appliesTo": [], "rateCode": f"{sku}.{term}.6YS6EN2CT7",
                "description": f"${usd} per On Demand Linux {itype} Instance Hour", "pricePerUnit": {"USD": usd}}}}}},
        "version": "20261120000000", "publicationDate": "2026-11-20T00:00:00Z"})


@pytest.fixture
def clients():
    ec2 = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    pricing = boto3.client("pricing", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(ec2) as ec2_stub, Stubber(pricing) as pricing_stub:
        yield ec2, pricing, ec2_stub, pricing_stub
        ec2_stub.assert_no_pending_responses()
        pricing_stub.assert_no_pending_responses()


def stub_spot(stub: Stubber, types: list[str]) -> None:
    params = {"InstanceTypes": types, "ProductDescriptions": ["Linux/UNIX"], "StartTime": ANY, "EndTime": ANY}
    stub.add_response("describe_spot_price_history", {"SpotPriceHistory": [
        spot_item("g5.xlarge", "us-east-1a", "0.400000", 30),
        spot_item("g5.xlarge", "us-east-1a", "0.300000", 5),  # newer: replaces 0.40 for zone a
        spot_item("g5.xlarge", "us-east-1b", "0.500000", 10),
    ], "NextToken": "page2"}, params)
    stub.add_response("describe_spot_price_history", {"SpotPriceHistory": [
        spot_item("p4d.24xlarge", "us-east-1c", "9.000000", 1),
    ], "NextToken": ""}, {**params, "NextToken": "page2"})


def stub_on_demand(stub: Stubber, itype: str, usd: str, gpus: str) -> None:
    stub.add_response("get_products", {"FormatVersion": "aws_v1", "PriceList": [product(itype, usd, gpus)]}, {
        "ServiceCode": "AmazonEC2", "FormatVersion": "aws_v1", "Filters": ANY})


def test_refresh_combines_latest_zone_prices_and_parses_price_list(clients):
    ec2, pricing, ec2_stub, pricing_stub = clients
    stub_spot(ec2_stub, ["g5.xlarge", "p4d.24xlarge"])
    stub_on_demand(pricing_stub, "g5.xlarge", "1.0060000000", "1")
    stub_on_demand(pricing_stub, "p4d.24xlarge", "21.9576000000", "8")
    prices = pricing_aws.refresh_prices(["p4d.24xlarge", "g5.xlarge"], "us-east-1", ec2=ec2, pricing=pricing)
    assert prices["g5.xlarge"] == InstancePrice("g5.xlarge", 1.006, pytest.approx(0.4), 1, "us-east-1")
    assert prices["p4d.24xlarge"] == InstancePrice("p4d.24xlarge", 21.9576, 9.0, 8, "us-east-1")


def test_refresh_min_over_zones(clients):
    ec2, _, ec2_stub, _ = clients
    stub_spot(ec2_stub, ["g5.xlarge", "p4d.24xlarge"])
    assert pricing_aws.spot_prices(ec2, ["g5.xlarge", "p4d.24xlarge"], stat="min")["g5.xlarge"] == 0.3


def test_on_demand_query_filters_linux_shared_tenancy(clients):
    _, pricing, _, pricing_stub = clients
    expected_filters = [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in {
        "instanceType": "g6.xlarge", "regionCode": "eu-west-1", "operatingSystem": "Linux", "tenancy": "Shared",
        "preInstalledSw": "NA", "capacitystatus": "Used", "licenseModel": "No License required"}.items()]
    pricing_stub.add_response("get_products", {"FormatVersion": "aws_v1", "PriceList": [product("g6.xlarge", "0.8048", "1")]},
                              {"ServiceCode": "AmazonEC2", "FormatVersion": "aws_v1", "Filters": expected_filters})
    assert pricing_aws.on_demand_prices(pricing, ["g6.xlarge"], "eu-west-1") == {"g6.xlarge": (0.8048, 1)}


def test_a_type_aws_does_not_price_is_named(clients):
    ec2, pricing, ec2_stub, pricing_stub = clients
    ec2_stub.add_response("describe_spot_price_history", {"SpotPriceHistory": [], "NextToken": ""})
    with pytest.raises(pricing_aws.PricingError, match="g9.nonexistent"):
        pricing_aws.spot_prices(ec2, ["g9.nonexistent"])
    pricing_stub.add_response("get_products", {"FormatVersion": "aws_v1", "PriceList": []})
    with pytest.raises(pricing_aws.PricingError, match="g9.nonexistent.*--region"):
        pricing_aws.on_demand_prices(pricing, ["g9.nonexistent"], "us-east-1")


def test_cli_refresh_writes_a_file_the_loader_reads(clients, tmp_path, monkeypatch):
    ec2, pricing, ec2_stub, pricing_stub = clients
    stub_spot(ec2_stub, ["g5.xlarge", "p4d.24xlarge"])
    stub_on_demand(pricing_stub, "g5.xlarge", "1.0060000000", "1")
    stub_on_demand(pricing_stub, "p4d.24xlarge", "21.9576000000", "8")
    monkeypatch.setattr(pricing_aws, "aws_clients", lambda region: (ec2, pricing))
    path = tmp_path / "prices.yaml"
    result = CliRunner().invoke(app, ["scheduler", "prices", "--refresh", "--region", "us-east-1", "--types",
                                      "g5.xlarge,p4d.24xlarge", "--file", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["p4d.24xlarge"]["spot_per_h"] == 9.0
    assert load_prices(path)["g5.xlarge"].on_demand_per_h == 1.006
    assert "spot = mean over zones" in path.read_text()


def test_cli_prices_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["scheduler", "prices", "--refresh", "--file", str(tmp_path / "p.yaml")])
    assert result.exit_code == 2 and "--region" in result.output
    bad = write(tmp_path, "g5.xlarge: {on_demand_per_h: 1.0}")
    result = runner.invoke(app, ["scheduler", "prices", "--file", str(bad)])
    assert result.exit_code == 2 and "g5.xlarge.spot_per_h is missing" in result.output


def test_cli_prints_the_table(tmp_path):
    result = CliRunner().invoke(app, ["scheduler", "prices", "--file", str(EXAMPLE)])
    assert result.exit_code == 0 and "p4d.24xlarge" in result.stdout and "21.9576" in result.stdout
