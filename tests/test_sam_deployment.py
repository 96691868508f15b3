"""The SAM application of `gradshard deploy sam`: written by PyYAML, clean under cfn-lint, and roles that allow only
what they should (checked by evaluating their policy documents, as IAM does: an explicit deny wins, else an allow)."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import cfnlint.api
import pytest
import yaml
from click.testing import CliRunner

from gradshard.cli.main import main
from gradshard.deploy.sam import sam_template, to_yaml, write_sam_deployment
from gradshard.errors import GradshardError

BUCKET, PREFIX, PARTITION = "data-bucket", "gradshard/", "aws"
CLIENT_ARN = "arn:aws:lambda:us-east-1:123456789012:function:stack-ClientFunction"
AGGREGATION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:stack-AggregationFunction"


def lint_problems(text: str) -> list[str]:
    return [str(m) for m in cfnlint.api.lint(text, regions=["us-east-1"]) if m.rule.id[0] in "EW"]


def _resolve(value: Any) -> Any:
    """The template's intrinsic functions in policies, for one stack (bucket, prefix, function ARNs)."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        return (value["Fn::Sub"].replace("${AWS::Partition}", PARTITION).replace("${DataBucket}", BUCKET)
                .replace("${StorePrefix}", PREFIX))
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return {"ClientFunction": CLIENT_ARN, "AggregationFunction": AGGREGATION_ARN}[value["Fn::GetAtt"][0]]
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    return value


def _matches(pattern: str, text: str) -> bool:
    """IAM wildcards: ``*`` any run of characters (``/`` included), ``?`` one character."""
    return fnmatch.fnmatchcase(text, pattern)


def allowed(statements: list[dict[str, Any]], action: str, resource: str, prefix: str | None = None) -> bool:
    decision = False
    for st in statements:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = _resolve(st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]])
        if not any(_matches(a, action) for a in actions) or not any(_matches(r, resource) for r in resources):
            continue
        condition = st.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if condition is not None and (prefix is None or not any(_matches(_resolve(c), prefix) for c in condition)):
            continue
        if st["Effect"] == "Deny":
            return False
        decision = True
    return decision


def obj(key: str) -> str:
    return f"arn:aws:s3:::{BUCKET}/{PREFIX}{key}"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return sam_template(memory_mb=3008, client_memory_mb=2048, timeout_s=900)


def role(template: dict[str, Any], name: str) -> list[dict[str, Any]]:
    resource = template["Resources"][name]["Properties"]
    document = resource["PolicyDocument"] if "PolicyDocument" in resource else resource["Policies"][0]
    return document["Statement"]  # type: ignore[no-any-return]


def test_the_sam_application_is_written_and_lints_clean(tmp_path: Path) -> None:
    result = write_sam_deployment(tmp_path, memory_mb=1024, client_memory_mb=4096, timeout_s=300)

    text = (tmp_path / "template.yaml").read_text()
    assert lint_problems(text) == []
    template = yaml.safe_load(text)
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    assert template["Parameters"]["ClientMemorySize"]["Default"] == 4096
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in (tmp_path / "Dockerfile").read_text()
    assert (tmp_path / "gradshard" / "runtime" / "aws_lambda.py").exists()
    guide = (tmp_path / "DEPLOY.md").read_text()
    for step in ("sam validate --lint", "sam build", "sam deploy --guided", "sam remote invoke",
                 "--executor lambda"):
        assert step in guide
    assert set(result.files) >= {"template.yaml", "Dockerfile", "DEPLOY.md"}


def test_cfn_lint_catches_a_broken_sam_template(template: dict[str, Any]) -> None:
    broken = yaml.safe_load(to_yaml(template))
    broken["Resources"]["ClientFunction"]["Properties"]["Runtime"] = "python3.11"  # not with an image
    broken["Parameters"]["MemorySize"]["Default"] = 20_000  # above Lambda's 10240
    problems = lint_problems(to_yaml(broken))
    assert any("E3685" in p for p in problems) and any("E2015" in p for p in problems), problems
    with pytest.raises(GradshardError, match="memory"):
        sam_template(memory_mb=20_000, client_memory_mb=1024, timeout_s=60)


def test_a_client_cannot_read_another_clients_update_or_write_the_model(template: dict[str, Any]) -> None:
    # the client role reaches no data at all (a client uses the URLs presigned for its task); it may record tokens
    client = role(template, "ClientFunction")
    assert allowed(client, "s3:PutObject", obj("security/jti/2026120710/abc"))
    assert not allowed(client, "s3:PutObject", obj("rounds/000003/updates/client-0001.safetensors"))
    assert not allowed(client, "s3:GetObject", obj("models/000003.safetensors"))
    assert not allowed(client, "s3:GetObject", obj("rounds/000003/updates/client-0002.safetensors"))
    assert not allowed(client, "s3:PutObject", obj("models/000004.safetensors"))
    assert not allowed(client, "s3:PutObject", obj("rounds/000003/aggregate.safetensors"))
    assert not allowed(client, "s3:DeleteObject", obj("rounds/000003/updates/client-0001.safetensors"))
    assert not allowed(client, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", prefix=PREFIX)
    assert not allowed(client, "s3:GetObject", f"arn:aws:s3:::{BUCKET}/elsewhere/models/x")
    assert not allowed(client, "lambda:InvokeFunction", AGGREGATION_ARN)


def test_aggregation_reads_updates_writes_aggregates_and_never_an_update(template: dict[str, Any]) -> None:
    aggregation = role(template, "AggregationFunction")
    assert allowed(aggregation, "s3:GetObject", obj("rounds/000003/updates/client-0002.safetensors"))
    assert allowed(aggregation, "s3:PutObject", obj("rounds/000003/aggregate.safetensors"))
    assert allowed(aggregation, "s3:PutObject", obj("models/000004.safetensors"))
    assert not allowed(aggregation, "s3:PutObject", obj("rounds/000003/updates/client-0002.safetensors"))
    assert not allowed(aggregation, "s3:DeleteObject", obj("models/000004.safetensors"))


def test_the_driver_invokes_this_stacks_functions_and_lists_only_its_prefix(template: dict[str, Any]) -> None:
    driver = role(template, "DriverPolicy")
    assert allowed(driver, "lambda:InvokeFunction", CLIENT_ARN)
    assert allowed(driver, "lambda:InvokeFunction", AGGREGATION_ARN)
    assert not allowed(driver, "lambda:InvokeFunction", "arn:aws:lambda:us-east-1:123456789012:function:other")
    assert allowed(driver, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", prefix=f"{PREFIX}rounds/")
    assert not allowed(driver, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", prefix="other/")


def test_the_cli_writes_the_application(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["deploy", "sam", "--out", str(tmp_path), "--client-memory-mb", "2048"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "template.yaml").read_text())["Parameters"]["ClientMemorySize"][
        "Default"] == 2048


def test_the_aggregation_memory_comes_from_the_planner_for_a_model(tmp_path: Path) -> None:
    from gradshard.core.zoo import get_layout
    from gradshard.deploy.sam import planned_memory

    result = CliRunner().invoke(main, ["deploy", "sam", "--out", str(tmp_path), "--model", "vgg16", "--clients", "20"])

    assert result.exit_code == 0, result.output
    plan = planned_memory(get_layout("vgg16").numel, 20)
    template = yaml.safe_load((tmp_path / "template.yaml").read_text())
    assert template["Parameters"]["MemorySize"]["Default"] == plan.memory_mb
    assert 128 <= plan.memory_mb < 3008 and plan.shards > 1  # sharding keeps each function far below the model
    assert f"M = {plan.shards}" in (tmp_path / "DEPLOY.md").read_text()
    with pytest.raises(GradshardError, match="no GradsSharding plan fits"):
        planned_memory(10**15, 20)
