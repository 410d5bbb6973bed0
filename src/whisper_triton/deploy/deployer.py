"""Create, update, scale, batch-run and remove a whisper-triton SageMaker deployment with plain boto3.

Every call validates its input before it creates anything, and every multi-step operation is a
transaction: when a step fails midway, what the operation created so far is removed again, so no
half-created deployment is left behind. Everything created is tagged
`whisper-triton:deployment=<name>`; `cleanup(name)` finds and removes it by that tag.

The steps live in one module per concern, composed here into the one `Deployer` class:
`validation` (inputs, before anything is created), `endpoints` (model, endpoint config, endpoint:
deploy / update / delete), `autoscaling`, `transform` (batch transform jobs) and `inventory`
(find and clean up by tag); `base` holds the clients, transactions and look-ups they share, and
`resources` the resource records and tag helpers.
"""

from __future__ import annotations

from .autoscaling import AutoscalingMixin
from .components import ComponentsMixin
from .endpoints import ASYNC_ENVIRONMENT, EndpointMixin
from .inventory import InventoryMixin
from .resources import DeploymentResult, Resource, policy_names, resource_id
from .transform import TransformMixin
from .validation import ValidationMixin

__all__ = ["ASYNC_ENVIRONMENT", "Deployer", "DeploymentResult", "Resource", "policy_names", "resource_id"]


class Deployer(ValidationMixin, EndpointMixin, AutoscalingMixin, TransformMixin, InventoryMixin, ComponentsMixin):
    """Plain-boto3 deployment steps. `progress` receives one line per status change while waiting."""
