"""The trained network of a bundle folder through MONAI's ``monai.bundle.load``, without running a workflow.

``monai.bundle.load(name, bundle_dir=...)`` builds ``network_def`` by creating the bundle's workflow and running its
whole ``initialize`` list, then copies ``models/model.pt`` into it with ``copy_model_state``. Two things of this
bundle's design stand in its way, and the second no bundle setting can change:

- the ``initialize`` lists check and claim what a run needs (the image folder, the datalist, the output or
  checkpoint folder, which they lock); loading a network must not need a data folder or leave a folder locked;
- ``copy_model_state`` compares the ``.shape`` of every entry of the state dict, and ``model.pt``'s settings record
  (``_extra_state``, see :mod:`scripts.adapters`) is a dict: ``copy_model_args={"exclude_vars": "_extra_state"}``
  skips it. Nothing is lost, as the network is built from that record.

:class:`TrainedNetworkWorkflow`, given as ``workflow_name``, parses ``inference.json`` (which builds the network the
model file records, whatever ``workflow_type`` names) with ``bundle_root`` at the bundle folder, and runs none of
its ``initialize`` list. docs/distribution.md shows the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow
from monai.utils import ensure_tuple

__all__ = ["TrainedNetworkWorkflow"]


class TrainedNetworkWorkflow(ConfigWorkflow):
    """A workflow that only builds the trained network: ``monai.bundle.load``'s ``workflow_name`` for this bundle.

    Args:
        config_file: the config ``monai.bundle.load`` found (``configs/<workflow_type>.json``); its folder's
            ``inference.json`` is read instead, so that any ``workflow_type`` gives the trained network.
        workflow_type: ignored (the network is inference's); kept for ``monai.bundle.load``'s call.
        override: config overrides (``load``'s ``net_override`` arrives as ``network_def#<key>``); ``bundle_root``
            defaults to the folder holding ``configs/``.

    Raises:
        FileNotFoundError: the configs folder holds no ``inference.json``.
    """

    def __init__(self, config_file: str | Sequence[str], workflow_type: str | None = "infer", **override: Any) -> None:
        configs = Path(ensure_tuple(config_file)[0]).parent
        # inference.json reads the network's settings from models/model.pt under bundle_root: the folder the configs
        # are in, not the current directory ("." in the config), which is wherever the caller happens to be.
        override.setdefault("bundle_root", str(configs.parent if configs.name == "configs" else configs))
        super().__init__(config_file=str(configs / "inference.json"), workflow_type="infer", **override)

    def initialize(self) -> list[Any]:
        """Parse the config, running none of its ``initialize`` list (no folder check or lock).

        Returns:
            an empty list (what the list's expressions would have returned).
        """
        self.parser.parse(reset=True)
        self._is_initialized = True
        return []

    def _get_property(self, name: str, property: dict) -> Any:
        """A property as ``ConfigWorkflow`` gives it; the network in eval mode, as it is loaded to predict.

        Args:
            name: the property's name.
            property: its definition (MONAI's ``InferProperties``).

        Returns:
            the parsed property.
        """
        value = super()._get_property(name, property)
        return value.eval() if name == "network_def" else value
