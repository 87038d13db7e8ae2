"""synth: plan prompts from a recipe and collect teacher answers as distillery records."""
