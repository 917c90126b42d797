"""fusion: learned model merging (AdaMerging, WEMoE/SMEAR routers, Concrete masks) and static merges."""


def _register_resolvers() -> None:
    """``${fusion_device:${trainer.accelerator}}`` in conf/: the run's device (see fusion.utils.resolve_device)."""
    from omegaconf import OmegaConf

    def device(accelerator: str) -> str:
        from fusion.utils import resolve_device

        return str(resolve_device(accelerator))

    OmegaConf.register_new_resolver("fusion_device", device, replace=True)


_register_resolvers()
