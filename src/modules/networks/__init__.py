"""Network architectures, one file per method."""

from src.modules.networks.dcgan import WebtoonDiscriminator, WebtoonGenerator, dcgan_init_

__all__ = ["WebtoonDiscriminator", "WebtoonGenerator", "dcgan_init_"]
