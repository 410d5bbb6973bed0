"""Application Auto Scaling of an endpoint's variant: async endpoints scale on their backlog (to
zero and back through a CloudWatch alarm), real-time ones on invocations per instance."""

from __future__ import annotations

from .base import DeployerBase
from .options import TAG_KEY, AutoscalingOptions, EndpointOptions
from .resources import SAGEMAKER_METRICS, SCALABLE_DIMENSION, Resource, Undo, deployment_tags, policy_names, resource_id, tag_list


class AutoscalingMixin(DeployerBase):
    """Register, configure and remove the scaling of an endpoint."""

    def configure_autoscaling(
        self,
        endpoint_name: str,
        scaling: AutoscalingOptions,
        *,
        variant_name: str | None = None,
        deployment: str | None = None,
    ) -> list[Resource]:
        """Register the endpoint's variant with Application Auto Scaling; async or real-time policies
        are chosen from the endpoint config. All or nothing."""
        description = self._describe_endpoint(endpoint_name)
        variant = variant_name or description["ProductionVariants"][0]["VariantName"]
        # describe_endpoint does not always carry AsyncInferenceConfig; the endpoint config does
        config = self.aws.sagemaker.describe_endpoint_config(EndpointConfigName=description["EndpointConfigName"])
        is_async = bool(config.get("AsyncInferenceConfig"))
        problems: list = []
        self._check_autoscaling(scaling, is_async, EndpointOptions(), problems)
        self._raise(problems)
        if deployment is None:  # the scaling belongs to the endpoint's deployment, so cleanup finds it
            endpoint_tags = self.aws.sagemaker.list_tags(ResourceArn=description["EndpointArn"]).get("Tags", [])
            deployment = next((t["Value"] for t in endpoint_tags if t["Key"] == TAG_KEY), endpoint_name)
        tags = deployment_tags(deployment, {})
        with self._transaction(f"Configuring autoscaling for {endpoint_name}") as undo:
            self._add_autoscaling(endpoint_name, variant, scaling, is_async, tags, undo)
            return undo.created

    def _add_autoscaling(
        self, endpoint: str, variant: str, scaling: AutoscalingOptions, is_async: bool, tags: dict[str, str], undo: Undo
    ) -> None:
        aas, cw = self.aws.autoscaling, self.aws.cloudwatch
        rid = resource_id(endpoint, variant)
        names = policy_names(endpoint)
        minimum = scaling.min_capacity if scaling.min_capacity is not None else (0 if is_async else 1)
        target = {"ServiceNamespace": "sagemaker", "ResourceId": rid, "ScalableDimension": SCALABLE_DIMENSION}
        response = self._step(
            f"Registering {rid} for autoscaling ({minimum}-{scaling.max_capacity} instances)",
            "Check your application-autoscaling:RegisterScalableTarget permission (and the service-linked role).",
            aas.register_scalable_target,
            **target,
            MinCapacity=minimum,
            MaxCapacity=scaling.max_capacity,
            Tags=tags,
        )
        undo.add(
            Resource("scalable-target", rid, response.get("ScalableTargetARN")),
            lambda: aas.deregister_scalable_target(**target),
        )
        dimensions = [{"Name": "EndpointName", "Value": endpoint}]
        if is_async:
            self._put_policy(undo, target, names["backlog"], {
                "PolicyType": "TargetTrackingScaling",
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": float(scaling.target_backlog_per_instance),
                    "CustomizedMetricSpecification": {
                        "MetricName": "ApproximateBacklogSizePerInstance",
                        "Namespace": SAGEMAKER_METRICS,
                        "Dimensions": dimensions,
                        "Statistic": "Average",
                    },
                    "ScaleInCooldown": scaling.scale_in_cooldown_s,
                    "ScaleOutCooldown": scaling.scale_out_cooldown_s,
                },
            })
            step_arn = self._put_policy(undo, target, names["scale_from_zero"], {
                "PolicyType": "StepScaling",
                "StepScalingPolicyConfiguration": {
                    "AdjustmentType": "ChangeInCapacity",
                    "MetricAggregationType": "Average",
                    "Cooldown": scaling.scale_from_zero_cooldown_s,
                    "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}],
                },
            })
            alarm = names["alarm"]
            self._step(
                f"Creating CloudWatch alarm {alarm}",
                "Check your cloudwatch:PutMetricAlarm permission.",
                cw.put_metric_alarm,
                AlarmName=alarm,
                AlarmDescription=f"Scale {endpoint} up from zero when requests wait without an instance.",
                MetricName="HasBacklogWithoutCapacity",
                Namespace=SAGEMAKER_METRICS,
                Statistic="Average",
                Dimensions=dimensions,
                Period=scaling.alarm_period_s,
                EvaluationPeriods=scaling.alarm_evaluation_periods,
                DatapointsToAlarm=scaling.alarm_evaluation_periods,
                Threshold=1.0,
                ComparisonOperator="GreaterThanOrEqualToThreshold",
                TreatMissingData="missing",
                AlarmActions=[step_arn],
                Tags=tag_list(tags),
            )
            undo.add(Resource("alarm", alarm), lambda: cw.delete_alarms(AlarmNames=[alarm]))
        else:
            self._put_policy(undo, target, names["invocations"], {
                "PolicyType": "TargetTrackingScaling",
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": float(scaling.target_invocations_per_instance),
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                    "ScaleInCooldown": scaling.scale_in_cooldown_s,
                    "ScaleOutCooldown": scaling.scale_out_cooldown_s,
                },
            })
        self.progress(f"autoscaling on {rid}: {minimum}-{scaling.max_capacity} instances ({'async' if is_async else 'real-time'})")

    def _put_policy(self, undo: Undo, target: dict, name: str, policy: dict) -> str:
        aas = self.aws.autoscaling
        response = self._step(
            f"Creating scaling policy {name}",
            "Check your application-autoscaling:PutScalingPolicy permission.",
            aas.put_scaling_policy,
            PolicyName=name,
            **target,
            **policy,
        )
        undo.add(
            Resource("scaling-policy", name, response.get("PolicyARN")),
            lambda: aas.delete_scaling_policy(PolicyName=name, **target),
        )
        return response["PolicyARN"]

    def _remove_autoscaling(self, endpoint: str, variants: list[str]) -> list[Resource]:
        aas, cw = self.aws.autoscaling, self.aws.cloudwatch
        removed: list[Resource] = []
        alarm = policy_names(endpoint)["alarm"]
        if cw.describe_alarms(AlarmNames=[alarm]).get("MetricAlarms"):
            cw.delete_alarms(AlarmNames=[alarm])
            removed.append(Resource("alarm", alarm))
        for variant in variants:
            rid = resource_id(endpoint, variant)
            target = {"ServiceNamespace": "sagemaker", "ResourceId": rid, "ScalableDimension": SCALABLE_DIMENSION}
            policies = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid).get("ScalingPolicies", [])
            for policy in policies:
                aas.delete_scaling_policy(PolicyName=policy["PolicyName"], **target)
                removed.append(Resource("scaling-policy", policy["PolicyName"], policy.get("PolicyARN")))
            found = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid]).get("ScalableTargets", [])
            if found:
                aas.deregister_scalable_target(**target)
                removed.append(Resource("scalable-target", rid, found[0].get("ScalableTargetARN")))
        return removed
