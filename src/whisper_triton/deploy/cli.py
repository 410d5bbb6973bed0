"""`whisper-deploy`: deploy, update, scale, batch-run and clean up whisper-triton on SageMaker.

AWS credentials, region and endpoints come from boto3's usual configuration (AWS_PROFILE,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, ...). Examples:

  whisper-deploy deploy --name whisper --image 1234.dkr.ecr.us-east-1.amazonaws.com/whisper-triton:0.1.0 \\
      --model-data s3://bucket/whisper/model/ --role arn:aws:iam::1234:role/SageMaker --autoscale
  whisper-deploy deploy --name whisper-async ... --async --output-path s3://bucket/async/out \\
      --failure-path s3://bucket/async/failed --autoscale --max-capacity 4
  whisper-deploy transform --name whisper-batch --model-name MODEL --input s3://bucket/audio/ --output s3://bucket/text/
  whisper-deploy cleanup --name whisper
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .aws import AwsClients
from .deployer import Deployer
from .errors import DeployError
from .options import (
    AMI_AUTO,
    AMI_NONE,
    DEFAULT_INFERENCE_AMI,
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_TRANSFORM_AMI,
    INFERENCE_AMI_VERSIONS,
    TRANSFORM_AMI_VERSIONS,
    DEFAULT_VARIANT,
    AsyncOptions,
    AutoscalingOptions,
    DeploymentOptions,
    EndpointOptions,
    ModelOptions,
    TransformOptions,
)

logger = logging.getLogger("whisper_triton.deploy")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--image", default="", help="container image URI in ECR (REGISTRY/REPO:TAG)")
    group.add_argument(
        "--model-data",
        default="",
        help="s3://BUCKET/PREFIX/ (uncompressed, delivered as is to /opt/ml/model) or s3://.../model.tar.gz",
    )
    group.add_argument("--role", default="", help="SageMaker execution role ARN")
    group.add_argument("--ssh-ssm-role", default="",
                       help="debugging: start sagemaker-ssh-helper in the container (image built with "
                            "INSTALL_SSH_HELPER=true), registering it in SSM with this IAM role name")
    group.add_argument("--ssh-owner", default="", help="debugging: the SSHOwner tag value (your IAM user id)")
    group.add_argument("--multi-model", action="store_true",
                       help="a multi-model endpoint: --model-data is the S3 prefix of <id>.tar.gz models "
                            "(whisper-deploy models-upload); each invocation names one with TargetModel")
    group.add_argument("--env", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                       help="container environment variable (repeatable), e.g. WHISPER_TRITON_ENGINE=tensorrtllm")


def _add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("endpoint")
    group.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE)
    group.add_argument("--instance-count", type=int, default=1, help="initial instance count")
    group.add_argument("--variant", default=DEFAULT_VARIANT)
    group.add_argument("--startup-timeout", type=int, default=600,
                       help="ContainerStartupHealthCheckTimeoutInSeconds (60-3600)")
    group.add_argument("--download-timeout", type=int, default=1200,
                       help="ModelDataDownloadTimeoutInSeconds (60-3600)")
    group.add_argument("--volume-size", type=int, default=None, help="VolumeSizeInGB (instance types without NVMe)")
    group.add_argument("--inference-ami-version", default=AMI_AUTO, metavar="NAME",
                       help=f"InferenceAmiVersion, i.e. the host's NVIDIA driver: {AMI_AUTO} (default: "
                            f"{DEFAULT_INFERENCE_AMI} on ml.g*/ml.p* types, none elsewhere), {AMI_NONE} (SageMaker's "
                            f"default, driver 470 on ml.g5), or one of {', '.join(INFERENCE_AMI_VERSIONS)}")
    group.add_argument("--async", dest="is_async", action="store_true", help="asynchronous inference endpoint")
    group.add_argument("--output-path", default="", help="async: S3 path for results")
    group.add_argument("--failure-path", default="", help="async: S3 path for failures")
    group.add_argument("--max-concurrent-invocations", type=int, default=4, help="async: per instance")
    group.add_argument("--success-topic", default=None, help="async: SNS topic ARN for results")
    group.add_argument("--error-topic", default=None, help="async: SNS topic ARN for failures")
    group.add_argument("--no-wait", action="store_true", help="return without waiting for InService")
    group.add_argument("--wait-timeout", type=float, default=3600.0)
    group.add_argument("--tag", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                       help="extra tag on every resource (repeatable)")


def _add_scaling_args(parser: argparse.ArgumentParser, flag: bool = True) -> None:
    group = parser.add_argument_group("autoscaling")
    if flag:
        group.add_argument("--autoscale", action="store_true", help="register autoscaling after the endpoint is up")
    group.add_argument("--min-capacity", type=int, default=None, help="default: 0 async, 1 real-time")
    group.add_argument("--max-capacity", type=int, default=2)
    group.add_argument("--target-backlog", type=float, default=5.0, help="async: ApproximateBacklogSizePerInstance target")
    group.add_argument("--target-invocations", type=float, default=60.0,
                       help="real-time: SageMakerVariantInvocationsPerInstance target (per minute)")
    group.add_argument("--scale-in-cooldown", type=int, default=600)
    group.add_argument("--scale-out-cooldown", type=int, default=300)


def _scaling(args: argparse.Namespace) -> AutoscalingOptions:
    return AutoscalingOptions(
        min_capacity=args.min_capacity,
        max_capacity=args.max_capacity,
        target_backlog_per_instance=args.target_backlog,
        target_invocations_per_instance=args.target_invocations,
        scale_in_cooldown_s=args.scale_in_cooldown,
        scale_out_cooldown_s=args.scale_out_cooldown,
    )


def _model(args: argparse.Namespace) -> ModelOptions:
    environment = {**ssh_environment(args.ssh_ssm_role, args.ssh_owner), **dict(args.env)}
    return ModelOptions(image_uri=args.image, model_data=args.model_data, role_arn=args.role, environment=environment,
                        multi_model=getattr(args, "multi_model", False))


def ssh_environment(ssm_role: str, owner: str) -> dict[str, str]:
    """What sagemaker-ssh-helper reads in the container (its own variable names)."""
    if not ssm_role:
        return {}
    return {"START_SSH": "true", "SSH_SSM_ROLE": ssm_role, "SSH_OWNER_TAG": owner,
            "SSH_LOG_TO_STDOUT": "true", "SSH_WAIT_TIME_SECONDS": "0"}


def _deployment(args: argparse.Namespace) -> DeploymentOptions:
    async_options = None
    if args.is_async or args.output_path or args.failure_path:
        async_options = AsyncOptions(
            output_path=args.output_path,
            failure_path=args.failure_path,
            max_concurrent_invocations_per_instance=args.max_concurrent_invocations,
            success_topic_arn=args.success_topic,
            error_topic_arn=args.error_topic,
        )
    return DeploymentOptions(
        name=args.name,
        model=_model(args),
        endpoint=EndpointOptions(
            instance_type=args.instance_type,
            initial_instance_count=args.instance_count,
            variant_name=args.variant,
            container_startup_health_check_timeout_s=args.startup_timeout,
            model_data_download_timeout_s=args.download_timeout,
            volume_size_gb=args.volume_size,
            inference_ami_version=args.inference_ami_version,
        ),
        async_inference=async_options,
        autoscaling=_scaling(args) if args.autoscale else None,
        tags=dict(args.tag),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whisper-deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--region", default=None, help="AWS region (default: boto3's configuration)")
    parser.add_argument("--poll-interval", type=float, default=15.0, help="seconds between status checks")
    parser.add_argument("--max-attempts", type=int, default=5, help="attempts per AWS call (botocore standard retries)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    deploy = sub.add_parser("deploy", help="create model, endpoint config and endpoint (and autoscaling)")
    deploy.add_argument("--name", required=True, help="endpoint name; also the deployment tag value")
    _add_model_args(deploy)
    components = deploy.add_argument_group("inference components (instead of one model or a multi-model endpoint)")
    components.add_argument("--inference-component", action="append", type=_key_value, default=[],
                            metavar="ID=S3URI", help="one component per model: its repository prefix (repeatable)")
    components.add_argument("--component-memory-mb", type=int, default=8192)
    components.add_argument("--component-accelerators", type=float, default=1.0)
    components.add_argument("--component-copies", type=int, default=1)
    _add_endpoint_args(deploy)
    _add_scaling_args(deploy)

    update = sub.add_parser("update", help="point an existing endpoint at a new model/config")
    update.add_argument("--name", required=True)
    _add_model_args(update)
    _add_endpoint_args(update)
    _add_scaling_args(update)

    delete = sub.add_parser("delete", help="delete an endpoint and its autoscaling (configs/models stay)")
    delete.add_argument("--name", required=True)

    scale = sub.add_parser("autoscale", help="add autoscaling to an existing endpoint")
    scale.add_argument("--name", required=True, help="endpoint name")
    scale.add_argument("--variant", default=None)
    scale.add_argument("--deployment", default=None, help="deployment tag value (default: the endpoint's own whisper-triton:deployment tag)")
    _add_scaling_args(scale, flag=False)

    transform = sub.add_parser("transform", help="start a batch transform job over an S3 prefix of audio files")
    transform.add_argument("--name", required=True)
    transform.add_argument("--input", required=True, help="s3://BUCKET/PREFIX/ of audio files")
    transform.add_argument("--output", required=True, help="s3://BUCKET/PREFIX/ for the transcripts")
    transform.add_argument("--model-name", default=None, help="existing model (else --image/--model-data/--role)")
    _add_model_args(transform)
    transform.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE)
    transform.add_argument("--instance-count", type=int, default=1)
    transform.add_argument("--max-payload-mb", type=int, default=100)
    transform.add_argument("--max-concurrent-transforms", type=int, default=1)
    transform.add_argument("--content-type", default=None, help="default: the container sniffs each file")
    transform.add_argument("--accept", default="application/json")
    transform.add_argument("--transform-ami-version", default=AMI_AUTO, metavar="NAME",
                           help=f"TransformAmiVersion: {AMI_AUTO} (default: {DEFAULT_TRANSFORM_AMI} on GPU types), "
                                f"{AMI_NONE}, or one of {', '.join(TRANSFORM_AMI_VERSIONS)}")
    transform.add_argument("--tag", action="append", type=_key_value, default=[], metavar="KEY=VALUE")

    cleanup = sub.add_parser("cleanup", help="remove everything tagged whisper-triton:deployment=NAME")
    cleanup.add_argument("--name", required=True)
    cleanup.add_argument("--dry-run", action="store_true", help="list, do not remove")

    upload = sub.add_parser("models-upload", help="pack each model of a models.json as <id>.tar.gz under an S3 "
                            "prefix: the --model-data of a --multi-model endpoint")
    upload.add_argument("--manifest", required=True, help="models.json written by `whisper-export models`")
    upload.add_argument("--uri", required=True, help="s3://BUCKET/PREFIX/")

    status = sub.add_parser("status", help="list the resources tagged for a deployment")
    status.add_argument("--name", required=True)
    return parser


def run(args: argparse.Namespace, deployer: Deployer) -> dict:
    if args.command == "deploy" and args.inference_component:
        from .components import ComponentOptions

        result = deployer.deploy_components(
            _deployment(args), dict(args.inference_component),
            ComponentOptions(args.component_memory_mb, args.component_accelerators, args.component_copies),
            wait=not args.no_wait, wait_timeout_s=args.wait_timeout)
        return {"endpoint": result.endpoint_name, "models": result.model_name, "created": [str(r) for r in result.created]}
    if args.command == "deploy":
        result = deployer.deploy(_deployment(args), wait=not args.no_wait, wait_timeout_s=args.wait_timeout)
        return {"endpoint": result.endpoint_name, "model": result.model_name,
                "endpoint_config": result.endpoint_config_name, "status": result.endpoint_status,
                "created": [str(r) for r in result.created]}
    if args.command == "update":
        result = deployer.update(_deployment(args), wait=not args.no_wait, wait_timeout_s=args.wait_timeout)
        return {"endpoint": result.endpoint_name, "model": result.model_name,
                "endpoint_config": result.endpoint_config_name, "status": result.endpoint_status,
                "created": [str(r) for r in result.created]}
    if args.command == "delete":
        return {"removed": [str(r) for r in deployer.delete_endpoint(args.name)]}
    if args.command == "autoscale":
        created = deployer.configure_autoscaling(
            args.name, _scaling(args), variant_name=args.variant, deployment=args.deployment
        )
        return {"created": [str(r) for r in created]}
    if args.command == "transform":
        model = None if args.model_name else _model(args)
        job = deployer.start_transform(TransformOptions(
            name=args.name, input_prefix=args.input, output_path=args.output, model_name=args.model_name,
            model=model, instance_type=args.instance_type, instance_count=args.instance_count,
            max_payload_mb=args.max_payload_mb, max_concurrent_transforms=args.max_concurrent_transforms,
            content_type=args.content_type, accept=args.accept, tags=dict(args.tag),
            transform_ami_version=args.transform_ami_version,
        ))
        return {"transform_job": job.name, "arn": job.arn}
    if args.command == "cleanup":
        resources = deployer.cleanup(args.name, dry_run=args.dry_run)
        return {("would_remove" if args.dry_run else "removed"): [str(r) for r in resources]}
    if args.command == "models-upload":
        from .multi_model import upload_models

        return {"uploaded": upload_models(args.manifest, args.uri, deployer.aws.s3)}
    if args.command == "status":
        return {"resources": [str(r) for r in deployer.find(args.name)]}
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # a real command line; callers passing argv (tests, wrappers) keep their logging
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
        )
    if not args.verbose:
        for noisy in ("botocore", "urllib3", "boto3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    deployer = Deployer(
        AwsClients(region_name=args.region, max_attempts=args.max_attempts),
        poll_interval_s=args.poll_interval,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    try:
        result = run(args, deployer)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            if isinstance(value, list):
                print(f"{key}:")
                for item in value:
                    print(f"  {item}")
            else:
                print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
