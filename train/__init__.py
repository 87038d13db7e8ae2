"""LoRA trainer: `python -m train run|generate|eval|merge`.

The plugin, for any HF Trainer / TRL script:
    rows = build_dataset(load_release("dataset/releases/v3"), tok, "deepseek")     # tokenized, labels masked
    peft_model = get_peft_model(model, lora_config("fast"))
    Trainer(..., train_dataset=rows, data_collator=collator("fast", tok),
            callbacks=[PassRateCallback(load_eval_records("dataset/releases/v3")[:32], 50, tokenizer=tok)])
"""
from train.data import TEMPLATES, Release, TrainError, build_dataset, encode, load_release, prompt_text
from train.core import (PRESETS, PassRateCallback, TrainConfig, collator, generate, generate_outputs, generate_texts,
                        lora_config, plot_loss, preset_config, run)
from train.eval import curate_outputs, load_eval_records

__all__ = ["TEMPLATES", "PRESETS", "Release", "TrainError", "TrainConfig", "build_dataset", "encode", "load_release",
           "load_eval_records", "prompt_text", "PassRateCallback", "collator", "curate_outputs", "generate",
           "generate_outputs", "generate_texts", "lora_config", "plot_loss", "preset_config", "run"]
