"""Custom components of the SAM2-LoRA fundus bundle, referenced from the bundle configs as ``scripts.<module>.<Name>``."""
