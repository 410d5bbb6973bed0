"""Several models on SageMaker: a multi-model endpoint made by `whisper-deploy` on moto, its models
packed by `whisper-deploy models-upload`, and inference components (whose API moto does not have:
their requests are held against botocore's own service model)."""

from __future__ import annotations

import tarfile

import boto3
import pytest
from botocore.validate import validate_parameters

from test_deploy import BUCKET, IMAGE, INSTANCE, ROLE, aws  # noqa: F401  (the moto fixture)
from whisper_triton.contract.models import ManifestModel, RegistryManifest
from whisper_triton.deploy import DeploymentOptions, EndpointOptions, ModelOptions
from whisper_triton.deploy.cli import main
from whisper_triton.deploy.components import ComponentOptions, component_requests


def small_models(tmp_path):
    for name in ("legal", "medical"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.bin").write_bytes(name.encode() * 100)
        (tmp_path / name / "tokenizer.json").write_text("{}")
    RegistryManifest(default="legal", models=[ManifestModel(id="legal", path="legal"),
                                              ManifestModel(id="medical", path="medical")]).save(tmp_path)
    return tmp_path / "models.json"


def test_models_upload_and_a_multi_model_endpoint(aws, tmp_path, capsys):
    manifest = small_models(tmp_path)
    assert main(["models-upload", "--manifest", str(manifest), "--uri", f"s3://{BUCKET}/mme/"]) == 0
    keys = sorted(o["Key"] for o in aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix="mme/")["Contents"])
    assert keys == ["mme/legal.tar.gz", "mme/medical.tar.gz"]
    aws["s3"].download_file(BUCKET, "mme/legal.tar.gz", str(tmp_path / "legal.tar.gz"))
    with tarfile.open(tmp_path / "legal.tar.gz") as tar:  # the files at the root, as SageMaker unpacks them
        assert sorted(tar.getnames()) == ["model.bin", "tokenizer.json"]
    assert main(["--poll-interval", "0.01", "deploy", "--name", "whisper-mme", "--image", IMAGE, "--role", ROLE,
                 "--model-data", f"s3://{BUCKET}/mme", "--multi-model", "--instance-type", INSTANCE]) == 0
    endpoint = aws["sm"].describe_endpoint(EndpointName="whisper-mme")
    config = aws["sm"].describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    container = aws["sm"].describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])["PrimaryContainer"]
    assert container["Mode"] == "MultiModel" and container["ModelDataUrl"] == f"s3://{BUCKET}/mme/"
    capsys.readouterr()
    assert main(["deploy", "--name", "whisper-mme2", "--image", IMAGE, "--role", ROLE, "--model-data",
                 f"s3://{BUCKET}/archive/model.tar.gz", "--multi-model", "--instance-type", INSTANCE]) == 1
    assert "multi-model endpoint takes an S3 prefix" in capsys.readouterr().err


def test_inference_component_requests_hold_against_botocore_service_model():
    options = DeploymentOptions("whisper-ic", ModelOptions(IMAGE, "", ROLE, {"WHISPER_TRITON_ENGINE": "tensorrtllm"}),
                                EndpointOptions(instance_type="ml.g5.12xlarge"))
    requests = component_requests(options, {"legal": f"s3://{BUCKET}/legal", "medical": f"s3://{BUCKET}/medical/"},
                                  ComponentOptions(memory_mb=7200, accelerators=1, copies=2), "abc123",
                                  {"whisper-triton:deployment": "whisper-ic"})
    model = boto3.client("sagemaker", region_name="us-east-1").meta.service_model
    validate_parameters(requests["endpoint_config"], model.operation_model("CreateEndpointConfig").input_shape)
    for request in requests["models"]:
        validate_parameters(request, model.operation_model("CreateModel").input_shape)
    for request in requests["components"]:
        validate_parameters(request, model.operation_model("CreateInferenceComponent").input_shape)
    assert "ModelName" not in requests["endpoint_config"]["ProductionVariants"][0]
    assert [m["PrimaryContainer"]["Environment"]["WHISPER_TRITON_SERVED_MODEL_NAME"] for m in requests["models"]] == \
        ["legal", "medical"]
    assert {m["PrimaryContainer"]["ModelDataSource"]["S3DataSource"]["S3Uri"] for m in requests["models"]} == \
        {f"s3://{BUCKET}/legal/", f"s3://{BUCKET}/medical/"}
    legal = requests["components"][0]
    assert legal["Specification"]["ComputeResourceRequirements"] == {"MinMemoryRequiredInMb": 7200,
                                                                     "NumberOfAcceleratorDevicesRequired": 1}
    assert legal["RuntimeConfig"] == {"CopyCount": 2} and legal["EndpointName"] == "whisper-ic"


def test_a_bad_request_shape_is_caught_by_the_same_check():
    """The check is not vacuous: botocore's validator refuses what SageMaker would."""
    from botocore.exceptions import ParamValidationError

    model = boto3.client("sagemaker", region_name="us-east-1").meta.service_model
    with pytest.raises(ParamValidationError):
        validate_parameters({"InferenceComponentName": "x", "EndpointName": "e", "Specification": {"ModelName": 3}},
                            model.operation_model("CreateInferenceComponent").input_shape)
