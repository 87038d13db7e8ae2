"""LoRA trainer: `python -m train run|generate`. Library API below."""
from train.data import TEMPLATES, Release, TrainError, build_dataset, encode, load_release, prompt_text
from train.core import (PRESETS, PassRateCallback, TrainConfig, collator, generate, generate_texts, lora_config,
                        pass_check_chars, plot_loss, preset_config, run)

__all__ = ["TEMPLATES", "PRESETS", "Release", "TrainError", "TrainConfig", "build_dataset", "encode", "load_release",
           "prompt_text", "PassRateCallback", "collator", "generate", "generate_texts", "lora_config",
           "pass_check_chars", "plot_loss", "preset_config", "run"]
