"""The deploy CLI against moto in server mode on 127.0.0.1: what it creates is read back with
describe calls field by field, cleanup leaves nothing, and bad input creates nothing.

moto gaps this works around: endpoint configs reject ml.g5.* (ml.g4dn.xlarge here), endpoints are
InService at once, update_endpoint answers 500 (exercised as the failure it is).
"""

from __future__ import annotations

import json

import boto3
import pytest

from conftest import reset_moto
from whisper_triton.deploy import TAG_KEY, AwsClients, Deployer, DeployError
from whisper_triton.deploy.cli import main
from whisper_triton.deploy.options import DEFAULT_INFERENCE_AMI

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/whisper-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper-triton:0.1.0"
INSTANCE = "ml.g4dn.xlarge"  # moto rejects ml.g5.* in endpoint configs
BUCKET = "whisper-deploy-test"
TOPIC = "arn:aws:sns:us-east-1:123456789012:whisper-done"
ERROR_TOPIC = "arn:aws:sns:us-east-1:123456789012:whisper-failed"


@pytest.fixture
def aws(moto_url, monkeypatch):
    """Fresh moto state, boto3 pointed at it through the environment only; a bucket with model data."""
    reset_moto(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"):
        monkeypatch.delenv(var, raising=False)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="model/whisper/config.pbtxt", Body=b"name: 'whisper'")
    s3.put_object(Bucket=BUCKET, Key="archive/model.tar.gz", Body=b"not really gzip")
    return {
        "sm": boto3.client("sagemaker"),
        "aas": boto3.client("application-autoscaling"),
        "cw": boto3.client("cloudwatch"),
        "s3": s3,
    }


def inventory(aws) -> dict[str, list[str]]:
    """Every resource kind the deployer creates, as names."""
    sm, aas, cw = aws["sm"], aws["aas"], aws["cw"]
    return {
        "models": [m["ModelName"] for m in sm.list_models()["Models"]],
        "configs": [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]],
        "endpoints": [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]],
        "targets": [t["ResourceId"] for t in aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]],
        "policies": [p["PolicyName"] for p in aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]],
        "alarms": [a["AlarmName"] for a in cw.describe_alarms()["MetricAlarms"]],
    }


EMPTY = {"models": [], "configs": [], "endpoints": [], "targets": [], "policies": [], "alarms": []}


def run_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["--poll-interval", "0.01", "--max-attempts", "1", "--json", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def tags_of(sm, arn: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn)["Tags"]}


def test_realtime_deploy_with_autoscaling_then_cleanup(aws, capsys):
    code, result, err = run_cli(
        capsys, "deploy", "--name", "whisper-rt", "--image", IMAGE, "--model-data", f"s3://{BUCKET}/model/",
        "--role", ROLE, "--instance-type", INSTANCE, "--instance-count", "2", "--startup-timeout", "900",
        "--download-timeout", "1500", "--env", "WHISPER_TRITON_ENGINE=ctranslate2", "--tag", "team=speech",
        "--autoscale", "--min-capacity", "1", "--max-capacity", "3", "--target-invocations", "120",
    )
    assert code == 0, err
    assert "endpoint whisper-rt: InService" in err  # progress while waiting
    sm, aas = aws["sm"], aws["aas"]

    model = sm.describe_model(ModelName=result["model"])
    assert model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataSource"] == {
        "S3DataSource": {"S3Uri": f"s3://{BUCKET}/model/", "S3DataType": "S3Prefix", "CompressionType": "None"}
    }
    assert "ModelDataUrl" not in model["PrimaryContainer"]
    assert model["PrimaryContainer"]["Environment"] == {"WHISPER_TRITON_ENGINE": "ctranslate2"}
    assert tags_of(sm, model["ModelArn"]) == {TAG_KEY: "whisper-rt", "team": "speech"}

    config = sm.describe_endpoint_config(EndpointConfigName=result["endpoint_config"])
    assert config["ProductionVariants"] == [{
        "VariantName": "AllTraffic", "ModelName": result["model"], "InitialInstanceCount": 2,
        "InstanceType": INSTANCE, "ModelDataDownloadTimeoutInSeconds": 1500,
        "ContainerStartupHealthCheckTimeoutInSeconds": 900,
        "InferenceAmiVersion": DEFAULT_INFERENCE_AMI,  # a GPU type: a driver the image's CUDA 12.8 runs on
    }]
    assert "AsyncInferenceConfig" not in config
    assert tags_of(sm, config["EndpointConfigArn"]) == {TAG_KEY: "whisper-rt", "team": "speech"}

    endpoint = sm.describe_endpoint(EndpointName="whisper-rt")
    assert endpoint["EndpointConfigName"] == result["endpoint_config"]
    assert endpoint["EndpointStatus"] == "InService" == result["status"]
    assert tags_of(sm, endpoint["EndpointArn"])[TAG_KEY] == "whisper-rt"

    [target] = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["ScalableDimension"], target["MinCapacity"], target["MaxCapacity"]) == (
        "endpoint/whisper-rt/variant/AllTraffic", "sagemaker:variant:DesiredInstanceCount", 1, 3)
    [policy] = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["PolicyName"] == "whisper-rt-invocations-per-instance"
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["ResourceId"] == "endpoint/whisper-rt/variant/AllTraffic"
    assert policy["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 120.0,
        "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        "ScaleInCooldown": 600, "ScaleOutCooldown": 300,
    }
    assert aws["cw"].describe_alarms()["MetricAlarms"] == []  # real-time needs no scale-from-zero alarm

    code, listed, err = run_cli(capsys, "cleanup", "--name", "whisper-rt", "--dry-run")
    assert code == 0 and inventory(aws)["endpoints"] == ["whisper-rt"]  # dry run removes nothing
    assert sorted(r.split()[0] for r in listed["would_remove"]) == sorted(
        ["scaling-policy", "scalable-target", "endpoint", "endpoint-config", "model"])
    code, removed, err = run_cli(capsys, "cleanup", "--name", "whisper-rt")
    assert code == 0, err
    assert len(removed["removed"]) == 5
    assert inventory(aws) == EMPTY


def test_async_deploy_scales_from_zero_then_cleanup(aws, capsys):
    code, result, err = run_cli(
        capsys, "deploy", "--name", "whisper-async", "--image", IMAGE,
        "--model-data", f"s3://{BUCKET}/archive/model.tar.gz", "--role", ROLE, "--instance-type", INSTANCE,
        "--async", "--output-path", f"s3://{BUCKET}/async/out", "--failure-path", f"s3://{BUCKET}/async/failed",
        "--max-concurrent-invocations", "8", "--success-topic", TOPIC, "--error-topic", ERROR_TOPIC,
        "--autoscale", "--max-capacity", "4", "--target-backlog", "3",
        "--ssh-ssm-role", "SageMakerSSMRole", "--ssh-owner", "AIDAEXAMPLE",
    )
    assert code == 0, err
    sm, aas, cw = aws["sm"], aws["aas"], aws["cw"]

    model = sm.describe_model(ModelName=result["model"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == f"s3://{BUCKET}/archive/model.tar.gz"
    assert "ModelDataSource" not in model["PrimaryContainer"]
    environment = model["PrimaryContainer"]["Environment"]
    # async: the container accepts the larger bodies and waits as long as async inference allows
    assert environment["WHISPER_TRITON_MAX_BODY_BYTES"] == str(1024 ** 3)
    assert environment["WHISPER_TRITON_REQUEST_TIMEOUT_S"] == "3600"
    assert environment["START_SSH"] == "true" and environment["SSH_SSM_ROLE"] == "SageMakerSSMRole"
    assert environment["SSH_OWNER_TAG"] == "AIDAEXAMPLE"

    config = sm.describe_endpoint_config(EndpointConfigName=result["endpoint_config"])
    assert config["ProductionVariants"][0]["InstanceType"] == INSTANCE
    assert config["ProductionVariants"][0]["InitialInstanceCount"] == 1
    assert config["ProductionVariants"][0]["ContainerStartupHealthCheckTimeoutInSeconds"] == 600
    assert config["ProductionVariants"][0]["ModelDataDownloadTimeoutInSeconds"] == 1200
    assert config["AsyncInferenceConfig"] == {
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 8},
        "OutputConfig": {
            "S3OutputPath": f"s3://{BUCKET}/async/out",
            "S3FailurePath": f"s3://{BUCKET}/async/failed",
            "NotificationConfig": {"SuccessTopic": TOPIC, "ErrorTopic": ERROR_TOPIC},
        },
    }
    assert sm.describe_endpoint(EndpointName="whisper-async")["EndpointConfigName"] == result["endpoint_config"]

    resource = "endpoint/whisper-async/variant/AllTraffic"
    [target] = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (resource, 0, 4)
    policies = {p["PolicyName"]: p for p in aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]}
    assert set(policies) == {"whisper-async-backlog-per-instance", "whisper-async-scale-from-zero"}
    backlog = policies["whisper-async-backlog-per-instance"]
    assert backlog["PolicyType"] == "TargetTrackingScaling" and backlog["ResourceId"] == resource
    assert backlog["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 3.0,
        "CustomizedMetricSpecification": {
            "MetricName": "ApproximateBacklogSizePerInstance", "Namespace": "AWS/SageMaker",
            "Dimensions": [{"Name": "EndpointName", "Value": "whisper-async"}], "Statistic": "Average",
        },
        "ScaleInCooldown": 600, "ScaleOutCooldown": 300,
    }
    step = policies["whisper-async-scale-from-zero"]
    assert step["PolicyType"] == "StepScaling" and step["ResourceId"] == resource
    assert step["StepScalingPolicyConfiguration"] == {
        "AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Average", "Cooldown": 300,
        "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}],
    }
    [alarm] = cw.describe_alarms()["MetricAlarms"]
    assert alarm["AlarmName"] == "whisper-async-has-backlog-without-capacity"
    assert (alarm["MetricName"], alarm["Namespace"], alarm["Statistic"]) == ("HasBacklogWithoutCapacity", "AWS/SageMaker", "Average")
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": "whisper-async"}]
    assert (alarm["Period"], alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (60, 2, 2)
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (1.0, "GreaterThanOrEqualToThreshold")
    assert alarm["TreatMissingData"] == "missing"
    assert alarm["AlarmActions"] == [step["PolicyARN"]]
    assert {t["Key"]: t["Value"] for t in cw.list_tags_for_resource(ResourceARN=alarm["AlarmArn"])["Tags"]} == {
        TAG_KEY: "whisper-async"}

    code, removed, err = run_cli(capsys, "cleanup", "--name", "whisper-async")
    assert code == 0, err
    assert sorted(r.split()[0] for r in removed["removed"]) == sorted(
        ["alarm", "scaling-policy", "scaling-policy", "scalable-target", "endpoint", "endpoint-config", "model"])
    assert inventory(aws) == EMPTY


def test_cleanup_removes_only_its_own_deployment(aws, capsys):
    for name in ("whisper-a", "whisper-ab"):  # one name contains the other
        code, _, err = run_cli(capsys, "deploy", "--name", name, "--image", IMAGE, "--model-data",
                               f"s3://{BUCKET}/model/", "--role", ROLE, "--instance-type", INSTANCE)
        assert code == 0, err
    code, _, err = run_cli(capsys, "cleanup", "--name", "whisper-a")
    assert code == 0, err
    left = inventory(aws)
    assert left["endpoints"] == ["whisper-ab"]
    assert len(left["models"]) == 1 and left["models"][0].startswith("whisper-ab-")
    assert len(left["configs"]) == 1 and left["configs"][0].startswith("whisper-ab-")


def test_autoscale_and_delete_an_existing_endpoint(aws, capsys):
    code, _, err = run_cli(capsys, "deploy", "--name", "whisper-x", "--image", IMAGE, "--model-data",
                           f"s3://{BUCKET}/model/", "--role", ROLE, "--instance-type", INSTANCE, "--async",
                           "--output-path", f"s3://{BUCKET}/o", "--failure-path", f"s3://{BUCKET}/f")
    assert code == 0, err
    assert inventory(aws)["targets"] == []
    code, created, err = run_cli(capsys, "autoscale", "--name", "whisper-x", "--max-capacity", "2")
    assert code == 0, err
    # the async kind is read from the endpoint config: backlog tracking, step policy and alarm
    assert sorted(r.split()[0] for r in created["created"]) == ["alarm", "scalable-target", "scaling-policy", "scaling-policy"]
    code, removed, err = run_cli(capsys, "delete", "--name", "whisper-x")
    assert code == 0, err
    left = inventory(aws)
    assert (left["endpoints"], left["targets"], left["policies"], left["alarms"]) == ([], [], [], [])
    assert len(left["models"]) == 1 and len(left["configs"]) == 1  # kept until cleanup
    run_cli(capsys, "cleanup", "--name", "whisper-x")
    assert inventory(aws) == EMPTY


@pytest.mark.parametrize(
    "drop, expected",
    [
        ("--role", "No execution role was given"),
        ("--image", "No container image was given"),
        ("--model-data", "No model data location was given"),
    ],
)
def test_missing_input_is_refused_before_anything_is_created(aws, capsys, drop, expected):
    argv = {"--image": IMAGE, "--model-data": f"s3://{BUCKET}/model/", "--role": ROLE}
    argv.pop(drop)
    code, _, err = run_cli(capsys, "deploy", "--name", "whisper-bad", "--instance-type", INSTANCE,
                           *[x for kv in argv.items() for x in kv])
    assert code == 1
    assert expected in err and "Fix:" in err
    assert inventory(aws) == EMPTY


def test_missing_bucket_and_empty_prefix_are_refused(aws, capsys):
    code, _, err = run_cli(capsys, "deploy", "--name", "whisper-bad", "--image", IMAGE, "--role", ROLE,
                           "--model-data", "s3://no-such-bucket-here/model/", "--instance-type", INSTANCE,
                           "--async", "--output-path", f"s3://{BUCKET}/o", "--failure-path", "s3://missing-failures/f")
    assert code == 1
    assert "The bucket 'no-such-bucket-here' for the model data does not exist" in err
    assert "The bucket 'missing-failures' for the async failure path does not exist" in err
    code, _, err = run_cli(capsys, "deploy", "--name", "whisper-bad", "--image", IMAGE, "--role", ROLE,
                           "--model-data", f"s3://{BUCKET}/nothing-here/", "--instance-type", INSTANCE)
    assert code == 1 and f"There are no objects under the model data prefix s3://{BUCKET}/nothing-here/" in err
    code, _, err = run_cli(capsys, "deploy", "--name", "whisper-bad", "--image", "not an image", "--role", "admin",
                           "--model-data", f"s3://{BUCKET}/model/", "--instance-type", INSTANCE)
    assert code == 1 and "'admin' is not an IAM role ARN" in err and "is not an image URI" in err
    assert inventory(aws) == EMPTY


def test_failure_midway_rolls_back(aws, capsys):
    # moto refuses ml.g5 in endpoint configs: the model is created first, then the config fails
    code, _, err = run_cli(capsys, "deploy", "--name", "whisper-g5", "--image", IMAGE, "--model-data",
                           f"s3://{BUCKET}/model/", "--role", ROLE, "--instance-type", "ml.g5.xlarge")
    assert code == 1
    assert "Creating endpoint config" in err and "ml.g5.xlarge" in err and "--instance-type" in err
    assert "Left behind" not in err
    assert inventory(aws) == EMPTY


def test_failure_after_the_endpoint_rolls_back_everything(aws, monkeypatch):
    deployer = Deployer(AwsClients(max_attempts=1), poll_interval_s=0.01)
    from whisper_triton.deploy import AutoscalingOptions, DeploymentOptions, EndpointOptions, ModelOptions

    options = DeploymentOptions(
        name="whisper-late",
        model=ModelOptions(IMAGE, f"s3://{BUCKET}/model/", ROLE),
        endpoint=EndpointOptions(instance_type=INSTANCE),
        autoscaling=AutoscalingOptions(max_capacity=2),
    )

    def refuse(**kwargs):
        raise DeployError(cause="Creating scaling policy failed: AccessDenied.", fix="Grant the permission.")

    monkeypatch.setattr(deployer, "_put_policy", lambda *a, **k: refuse())
    with pytest.raises(DeployError) as info:
        deployer.deploy(options)
    assert "AccessDenied" in str(info.value) and info.value.left_behind == []
    assert inventory(aws) == EMPTY  # model, config, endpoint and scalable target were all removed


def test_existing_endpoint_name_is_refused(aws, capsys):
    args = ["--image", IMAGE, "--model-data", f"s3://{BUCKET}/model/", "--role", ROLE, "--instance-type", INSTANCE]
    assert run_cli(capsys, "deploy", "--name", "whisper-dup", *args)[0] == 0
    before = inventory(aws)
    code, _, err = run_cli(capsys, "deploy", "--name", "whisper-dup", *args)
    assert code == 1 and "An endpoint named 'whisper-dup' already exists" in err and "update" in err
    assert inventory(aws) == before


@pytest.mark.parametrize("command", [["delete"], ["autoscale"], ["update", "--image", IMAGE, "--model-data",
                                     f"s3://{BUCKET}/model/", "--role", ROLE, "--instance-type", INSTANCE]])
def test_an_endpoint_that_does_not_exist(aws, capsys, command):
    code, _, err = run_cli(capsys, command[0], "--name", "no-such-endpoint", *command[1:])
    assert code == 1
    assert "'no-such-endpoint'" in err and ("does not exist" in err or "no endpoint named" in err)
    assert inventory(aws) == EMPTY


def test_update_failure_removes_the_new_model_and_config(aws, capsys):
    args = ["--image", IMAGE, "--model-data", f"s3://{BUCKET}/model/", "--role", ROLE, "--instance-type", INSTANCE]
    code, first, err = run_cli(capsys, "deploy", "--name", "whisper-up", *args)
    assert code == 0, err
    before = inventory(aws)
    # moto does not implement UpdateEndpoint (500): the new model and config must not stay behind
    code, _, err = run_cli(capsys, "update", "--name", "whisper-up", *args)
    assert code == 1
    assert "Updating endpoint whisper-up" in err and "Left behind" not in err
    assert inventory(aws) == before
    assert aws["sm"].describe_endpoint(EndpointName="whisper-up")["EndpointConfigName"] == first["endpoint_config"]


def test_batch_transform_over_a_prefix(aws, capsys):
    s3 = aws["s3"]
    for i in range(3):
        s3.put_object(Bucket=BUCKET, Key=f"audio/clip{i}.wav", Body=b"RIFF....")
    code, result, err = run_cli(
        capsys, "transform", "--name", "whisper-batch", "--input", f"s3://{BUCKET}/audio/",
        "--output", f"s3://{BUCKET}/transcripts/", "--image", IMAGE, "--model-data", f"s3://{BUCKET}/model/",
        "--role", ROLE, "--instance-type", INSTANCE, "--max-payload-mb", "50",
    )
    assert code == 0, err
    sm = aws["sm"]
    job = sm.describe_transform_job(TransformJobName=result["transform_job"])
    assert job["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/audio/"}},
        "SplitType": "None",
    }
    assert job["TransformOutput"] == {"S3OutputPath": f"s3://{BUCKET}/transcripts/", "Accept": "application/json", "AssembleWith": "None"}
    assert job["TransformResources"] == {"InstanceType": INSTANCE, "InstanceCount": 1,
                                         "TransformAmiVersion": "al2-ami-sagemaker-batch-gpu-535"}
    assert (job["MaxPayloadInMB"], job["BatchStrategy"], job["MaxConcurrentTransforms"]) == (50, "SingleRecord", 1)
    assert tags_of(sm, job["TransformJobArn"]) == {TAG_KEY: "whisper-batch"}
    [model] = inventory(aws)["models"]
    assert job["ModelName"] == model
    code, removed, err = run_cli(capsys, "cleanup", "--name", "whisper-batch")
    assert code == 0, err
    assert inventory(aws) == EMPTY


def test_batch_transform_input_that_does_not_exist(aws, capsys):
    code, _, err = run_cli(
        capsys, "transform", "--name", "whisper-batch", "--input", f"s3://{BUCKET}/no-audio-here/",
        "--output", f"s3://{BUCKET}/transcripts/", "--image", IMAGE, "--model-data", f"s3://{BUCKET}/model/",
        "--role", ROLE, "--instance-type", INSTANCE,
    )
    assert code == 1 and f"no objects under the transform input s3://{BUCKET}/no-audio-here/" in err
    code, _, err = run_cli(
        capsys, "transform", "--name", "whisper-batch", "--input", f"s3://{BUCKET}/model/",
        "--output", f"s3://{BUCKET}/t/", "--model-name", "no-such-model", "--instance-type", INSTANCE,
    )
    assert code == 1 and "The model 'no-such-model' does not exist" in err
    assert inventory(aws) == EMPTY
    assert aws["sm"].list_transform_jobs()["TransformJobSummaries"] == []


def test_successful_update_replaces_the_old_model_and_config(aws, monkeypatch):
    """moto has no UpdateEndpoint: stand in for it by re-pointing the endpoint, then check that the
    deployer waits for the new config and removes the previous model and config it owned."""
    from whisper_triton.deploy import DeploymentOptions, EndpointOptions, ModelOptions

    deployer = Deployer(AwsClients(max_attempts=1), poll_interval_s=0.01)
    first = deployer.deploy(DeploymentOptions("whisper-up", ModelOptions(IMAGE, f"s3://{BUCKET}/model/", ROLE),
                                              EndpointOptions(instance_type=INSTANCE)))
    sm = deployer.aws.sagemaker

    def update_endpoint(EndpointName, EndpointConfigName):
        sm.delete_endpoint(EndpointName=EndpointName)
        sm.create_endpoint(EndpointName=EndpointName, EndpointConfigName=EndpointConfigName)

    monkeypatch.setattr(sm, "update_endpoint", update_endpoint)
    new_image = IMAGE.replace("0.1.0", "0.2.0")
    second = deployer.update(DeploymentOptions("whisper-up", ModelOptions(new_image, f"s3://{BUCKET}/model/", ROLE),
                                               EndpointOptions(instance_type=INSTANCE, initial_instance_count=2)))
    assert second.endpoint_status == "InService"
    left = inventory(aws)
    assert left["models"] == [second.model_name] and left["configs"] == [second.endpoint_config_name]
    assert first.model_name not in left["models"]
    assert aws["sm"].describe_model(ModelName=second.model_name)["PrimaryContainer"]["Image"] == new_image
    config = aws["sm"].describe_endpoint_config(EndpointConfigName=second.endpoint_config_name)
    assert config["ProductionVariants"][0]["InitialInstanceCount"] == 2


def test_autoscaling_without_waiting_is_refused_up_front(aws, capsys):
    code, _, err = run_cli(capsys, "deploy", "--name", "whisper-nw", "--image", IMAGE, "--model-data",
                           f"s3://{BUCKET}/model/", "--role", ROLE, "--instance-type", INSTANCE, "--no-wait", "--autoscale")
    assert code == 1 and "InService" in err and "whisper-deploy autoscale" in err
    assert inventory(aws) == EMPTY


def _deploy_args(name: str, instance_type: str, *extra: str) -> list[str]:
    return ["deploy", "--name", name, "--image", IMAGE, "--model-data", f"s3://{BUCKET}/model/", "--role", ROLE,
            "--instance-type", instance_type, *extra]


@pytest.mark.parametrize("instance_type, flag, expected", [
    (INSTANCE, [], DEFAULT_INFERENCE_AMI),
    (INSTANCE, ["--inference-ami-version", "al2-ami-sagemaker-inference-gpu-3-1"], "al2-ami-sagemaker-inference-gpu-3-1"),
    (INSTANCE, ["--inference-ami-version", "none"], None),  # SageMaker's own default AMI
    ("ml.m5.xlarge", [], None),  # the CPU engine on a CPU instance: no GPU AMI
])
def test_the_host_driver_is_chosen_with_the_inference_ami_version(aws, capsys, instance_type, flag, expected):
    code, result, err = run_cli(capsys, *_deploy_args("whisper-ami", instance_type, *flag))
    assert code == 0, err
    [variant] = aws["sm"].describe_endpoint_config(EndpointConfigName=result["endpoint_config"])["ProductionVariants"]
    assert variant.get("InferenceAmiVersion") == expected
    assert run_cli(capsys, "cleanup", "--name", "whisper-ami")[0] == 0


@pytest.mark.parametrize("instance_type, ami, message", [
    (INSTANCE, "al2-ami-sagemaker-inference-gpu-9", "is not a SageMaker AMI version"),
    ("ml.m5.xlarge", "al2-ami-sagemaker-inference-gpu-3-1", "is a GPU AMI, but ml.m5.xlarge has no NVIDIA GPU"),
])
def test_a_wrong_inference_ami_version_is_refused_before_anything_is_created(aws, capsys, instance_type, ami, message):
    code, _, err = run_cli(capsys, *_deploy_args("whisper-ami", instance_type, "--inference-ami-version", ami))
    assert code == 1
    assert message in err and "--inference-ami-version" in err
    assert inventory(aws) == EMPTY
