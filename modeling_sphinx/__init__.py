"""sphinx-mllm: SPHINX multimodal LLMs native to Hugging Face transformers.

Importing the package registers the SPHINX classes with the transformers Auto classes, and marks them for
`register_for_auto_class` so that every saved folder carries the remote-code files and its `auto_map`. It also
keeps bitsandbytes from fetching a Hub kernel when PEFT or TRL import it (`modeling_sphinx.hub_kernels`).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_sphinx import SPHINX_VARIANTS, SphinxConfig, SphinxVisionEncoderConfig
from .hub_kernels import refuse_on_bitsandbytes_import
from .modeling_sphinx import SphinxForConditionalGeneration, SphinxModel, SphinxPreTrainedModel
from .processing.image_processing_sphinx import SphinxImageProcessor, SphinxImageProcessorPil
from .processing.processing_sphinx import SphinxProcessor

refuse_on_bitsandbytes_import()
AutoConfig.register("sphinx", SphinxConfig, exist_ok=True)
AutoConfig.register("sphinx_vision_encoder", SphinxVisionEncoderConfig, exist_ok=True)
AutoModel.register(SphinxConfig, SphinxModel, exist_ok=True)
AutoModelForImageTextToText.register(SphinxConfig, SphinxForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    SphinxConfig,
    image_processor_classes={"torchvision": SphinxImageProcessor, "pil": SphinxImageProcessorPil},
    exist_ok=True,
)
AutoProcessor.register(SphinxConfig, SphinxProcessor, exist_ok=True)

SphinxConfig.register_for_auto_class()
SphinxForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
SphinxImageProcessor.register_for_auto_class()
SphinxImageProcessorPil.register_for_auto_class()
SphinxProcessor.register_for_auto_class()

__all__ = [
    "SPHINX_VARIANTS",
    "SphinxConfig",
    "SphinxVisionEncoderConfig",
    "SphinxPreTrainedModel",
    "SphinxModel",
    "SphinxForConditionalGeneration",
    "SphinxImageProcessor",
    "SphinxImageProcessorPil",
    "SphinxProcessor",
]
