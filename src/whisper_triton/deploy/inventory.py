"""Inventory and cleanup: every resource tagged `whisper-triton:deployment=<name>`, found and removed."""

from __future__ import annotations

import logging

from .base import DeployerBase
from .errors import DeployError, aws_error_text
from .options import TAG_KEY
from .resources import SCALABLE_DIMENSION, Resource, is_not_found

logger = logging.getLogger("whisper_triton.deploy.deployer")


class InventoryMixin(DeployerBase):
    """Find a deployment's resources by their tag, and remove them in dependency order."""

    def _has_tag(self, arn: str, name: str) -> bool:
        tags = self.aws.sagemaker.list_tags(ResourceArn=arn).get("Tags", [])
        return any(t["Key"] == TAG_KEY and t["Value"] == name for t in tags)

    def find(self, name: str) -> list[Resource]:
        """Every resource tagged `whisper-triton:deployment=<name>`, in the order cleanup removes them."""
        sm, aas, cw = self.aws.sagemaker, self.aws.autoscaling, self.aws.cloudwatch
        found: list[Resource] = []

        endpoints = [
            e for e in sm.get_paginator("list_endpoints").paginate(NameContains=name).build_full_result().get("Endpoints", [])
            if self._has_tag(e["EndpointArn"], name)
        ]
        endpoint_names = {e["EndpointName"] for e in endpoints}

        seen: set[str] = set()
        for prefix in sorted({name} | endpoint_names):  # our alarms are named after the endpoint they scale
            alarms = cw.get_paginator("describe_alarms").paginate(AlarmNamePrefix=f"{prefix}-").build_full_result()
            for alarm in alarms.get("MetricAlarms", []):
                if alarm["AlarmArn"] in seen:
                    continue
                seen.add(alarm["AlarmArn"])
                tags = cw.list_tags_for_resource(ResourceARN=alarm["AlarmArn"]).get("Tags", [])
                if any(t["Key"] == TAG_KEY and t["Value"] == name for t in tags):
                    found.append(Resource("alarm", alarm["AlarmName"], alarm["AlarmArn"]))
        targets = aas.get_paginator("describe_scalable_targets").paginate(ServiceNamespace="sagemaker").build_full_result()
        for target in targets.get("ScalableTargets", []):
            endpoint = target["ResourceId"].split("/")[1] if target["ResourceId"].startswith("endpoint/") else None
            # ours: on one of our endpoints, or left over on an endpoint of this deployment's name that is gone
            if endpoint in endpoint_names or (endpoint == name and not self._endpoint_exists(name)):
                policies = aas.describe_scaling_policies(
                    ServiceNamespace="sagemaker", ResourceId=target["ResourceId"]
                ).get("ScalingPolicies", [])
                for policy in policies:
                    found.append(Resource("scaling-policy", f"{target['ResourceId']}:{policy['PolicyName']}", policy.get("PolicyARN")))
                found.append(Resource("scalable-target", target["ResourceId"], target.get("ScalableTargetARN")))
        found.extend(Resource("endpoint", e["EndpointName"], e["EndpointArn"]) for e in endpoints)

        jobs = sm.get_paginator("list_transform_jobs").paginate(NameContains=name, StatusEquals="InProgress").build_full_result()
        for job in jobs.get("TransformJobSummaries", []):
            if self._has_tag(job["TransformJobArn"], name):
                found.append(Resource("transform-job", job["TransformJobName"], job["TransformJobArn"]))
        configs = sm.get_paginator("list_endpoint_configs").paginate(NameContains=name).build_full_result()
        for config in configs.get("EndpointConfigs", []):
            if self._has_tag(config["EndpointConfigArn"], name):
                found.append(Resource("endpoint-config", config["EndpointConfigName"], config["EndpointConfigArn"]))
        models = sm.get_paginator("list_models").paginate(NameContains=name).build_full_result()
        for model in models.get("Models", []):
            if self._has_tag(model["ModelArn"], name):
                found.append(Resource("model", model["ModelName"], model["ModelArn"]))
        return found

    def cleanup(self, name: str, *, dry_run: bool = False) -> list[Resource]:
        """Remove everything tagged for deployment `name`; returns what was (or, dry run, would be) removed.

        Transform jobs cannot be deleted: running ones are stopped; their S3 output stays.
        """
        try:
            resources = self.find(name)
        except Exception as exc:  # noqa: BLE001
            raise DeployError(
                cause=f"Could not list the resources of deployment {name!r}: {aws_error_text(exc)}.",
                fix="Check your AWS credentials, region and list/describe permissions.",
            ) from exc
        if dry_run:
            return resources
        sm, aas, cw = self.aws.sagemaker, self.aws.autoscaling, self.aws.cloudwatch
        removed, failed = [], []
        for resource in resources:
            try:
                if resource.kind == "alarm":
                    cw.delete_alarms(AlarmNames=[resource.name])
                elif resource.kind == "scaling-policy":
                    rid, _, policy = resource.name.rpartition(":")
                    aas.delete_scaling_policy(
                        PolicyName=policy, ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=SCALABLE_DIMENSION
                    )
                elif resource.kind == "scalable-target":
                    aas.deregister_scalable_target(
                        ServiceNamespace="sagemaker", ResourceId=resource.name, ScalableDimension=SCALABLE_DIMENSION
                    )
                elif resource.kind == "endpoint":
                    sm.delete_endpoint(EndpointName=resource.name)
                elif resource.kind == "transform-job":
                    sm.stop_transform_job(TransformJobName=resource.name)
                elif resource.kind == "endpoint-config":
                    sm.delete_endpoint_config(EndpointConfigName=resource.name)
                elif resource.kind == "model":
                    sm.delete_model(ModelName=resource.name)
                removed.append(resource)
                self.progress(f"removed {resource}")
            except Exception as exc:  # noqa: BLE001 - keep removing the rest
                if is_not_found(exc):
                    removed.append(resource)
                    continue
                logger.error("could not remove %s: %s", resource, aws_error_text(exc))
                failed.append(f"{resource} ({aws_error_text(exc)})")
        if failed:
            raise DeployError(
                cause=f"Cleanup of {name!r} could not remove {len(failed)} resource(s).",
                fix="Check the delete permissions for them and run cleanup again.",
                left_behind=failed,
            )
        return removed
