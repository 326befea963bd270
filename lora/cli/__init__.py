"""The command-line programs: ``lora-train``, ``lora-predict``, ``lora-search``, ``lora-inspect``
(also ``python train.py`` etc. at the top of the repository). Each reads flags and makes one call
into ``lora``."""
