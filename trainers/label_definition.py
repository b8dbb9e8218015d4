"""The label definition check the trainer runs before nnU-Net's ``__init__`` (one-line errors naming the key)."""
from __future__ import annotations

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medflowseg_nn.errors import UserError


def check_label_definition(plans: dict, dataset_json: dict) -> None:
    """Build nnU-Net's label manager for ``dataset_json`` (as nnU-Net's trainer will) and turn its assertion
    into a one-line :class:`UserError` naming the dataset.json key (e.g. an ``ignore`` label that is not the
    highest label, regions without ``regions_class_order``). Every combination nnU-Net's label manager accepts
    — plain labels, regions, the ignore label, regions with the ignore label — is trained."""
    try:
        PlansManager(plans).get_label_manager(dataset_json)
    except AssertionError as e:
        message = " ".join(str(e).split())
        key = "ignore" if "ignore" in message.lower() else "regions_class_order"
        raise UserError(f"dataset.json key {key!r} is not usable: {message}") from None
